"""Stop a run that has diverged, instead of training (and checkpointing) garbage.

A step counts as *skipped* when the optimizer made no update: DeepSpeed found an overflow
(NaN/Inf gradients; ZeRO then skips the step), the fp16 grad scaler did, or an lbopt optimizer
skipped on non-finite gradients (``on_nonfinite="skip"``). The run has *diverged* when

- the step's training loss (mean over ranks) is NaN or infinite,
- the loss exceeds ``loss_ratio`` x the first step's loss (``loss_ratio`` > 0), or
- more than ``max_skipped_steps`` steps in total were skipped.

:class:`DivergenceGuard` only decides; the loop stops, skips every later save and exits with
:data:`EXIT_DIVERGED` unless the user asked to keep going.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXIT_DIVERGED = 3

__all__ = ["EXIT_DIVERGED", "DivergenceGuard"]


@dataclass
class DivergenceGuard:
    """Counts skipped steps and names the first sign of divergence (see the module docstring)."""

    max_skipped_steps: int = 2
    loss_ratio: float = 0.0
    skipped_steps: int = 0
    first_loss: float | None = None
    reason: str | None = None  # the first divergence found, None while the run is healthy
    diverged_at: int | None = None

    def check(self, step: int, loss: float, skipped: bool) -> str | None:
        """Record step ``step``; return a message the first time the run is found diverged."""
        self.skipped_steps += int(skipped)
        if self.first_loss is None and math.isfinite(loss):
            self.first_loss = loss
        if self.reason is not None:
            return None
        if not math.isfinite(loss):
            reason = f"the training loss is {loss} at step {step}"
        elif self.loss_ratio > 0 and self.first_loss and loss > self.loss_ratio * self.first_loss:
            reason = (
                f"the training loss {loss:.4g} at step {step} is more than --divergence_loss_ratio "
                f"{self.loss_ratio:g} x the first step's {self.first_loss:.4g}"
            )
        elif self.skipped_steps > self.max_skipped_steps:
            reason = (
                f"{self.skipped_steps} optimizer steps were skipped by step {step} (non-finite gradients; "
                f"--max_skipped_steps {self.max_skipped_steps})"
            )
        else:
            return None
        self.reason, self.diverged_at = reason, step
        return reason

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.first_loss = state.get("first_loss")
