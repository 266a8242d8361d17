"""What every global-batch policy shares: accumulation arithmetic, the LR rule, change callbacks.

A *policy* decides the global batch ``B`` of each optimizer step; engines only read it
(:mod:`lbopt.integrations.adaptive_batch`). Two policies ship: the adaptive
:class:`lbopt.BatchSizeController` (gradient-noise tests) and the planned
:class:`lbopt.BatchSizeSchedule`. Both keep the micro-batch fixed::

    B = micro_batch_size × accumulation_steps × world_size

**The LR rule** (one rule for the recipes' ``--lr_scaling`` and the policies'
``lr_coupling``)::

    lr_scale(B, B_ref, rule) = (B / B_ref)^p,   p = 0 ("none"), ½ ("sqrt"), 1 ("linear")

A policy's ``lr_factor`` is ``lr_scale(B, B₀, rule)`` with ``B₀`` its first batch, so a base
rate already scaled to ``B₀`` by the same rule follows ``lr·(B/B_ref)^p`` at every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lbopt.validation import check_choice, check_int

__all__ = ["LR_RULES", "BatchSizePolicy", "lr_scale"]

LR_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def lr_scale(batch_size: float, reference_batch_size: float, rule: str) -> float:
    """``(batch_size / reference_batch_size)^p`` with ``p`` = 0, ½, 1 for ``"none"``, ``"sqrt"``, ``"linear"``."""
    check_choice("lr rule", rule, tuple(LR_RULES))
    p = LR_RULES[rule]
    return (batch_size / reference_batch_size) ** p if p else 1.0


class BatchSizePolicy:
    """Base of the batch-size policies: holds ``batch_size`` and derives everything engines need.

    Subclasses set ``self.config`` (with ``micro_batch_size``, ``world_size``,
    ``initial_batch_size``, ``lr_coupling``), call :meth:`_init_policy`, and change the
    batch only through :meth:`_change_batch`.
    """

    config: Any
    batch_size: int
    steps: int
    history: list[tuple[int, int]]

    def _init_policy(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.steps = 0
        self.history = [(0, batch_size)]
        self._callbacks: list[Callable[[int, int], None]] = []

    @property
    def unit(self) -> int:
        """Granularity of the global batch: ``micro_batch_size × world_size``."""
        return self.config.micro_batch_size * self.config.world_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank per optimizer step at the current batch."""
        return self.batch_size // self.unit

    @property
    def lr_factor(self) -> float:
        """``lr_scale(B, B₀, lr_coupling)`` (1.0 for ``"none"``)."""
        return lr_scale(self.batch_size, self.config.initial_batch_size, self.config.lr_coupling)

    @property
    def owns_gradients(self) -> bool:
        """True when the policy needs gradient statistics (hooks, the optimizer's norms)."""
        return False

    def attach(self, params: Any) -> BatchSizePolicy:  # noqa: ARG002 - a schedule watches nothing
        """Watch these parameters (a no-op for policies that need no gradients)."""
        return self

    def on_change(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(new_batch, old_batch)`` whenever the batch size changes."""
        self._callbacks.append(callback)

    def _change_batch(self, new: int) -> None:
        old = self.batch_size
        if new == old:
            return
        self.batch_size = new
        self.history.append((self.steps, new))
        for cb in self._callbacks:
            cb(new, old)

    @contextmanager
    def scaled_lr(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Multiply every group's ``lr`` by :attr:`lr_factor` for the duration of the block."""
        f = self.lr_factor
        saved = [g["lr"] for g in optimizer.param_groups]
        if f != 1.0:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * f
        try:
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    def _check_multiple(self, name: str, value: int) -> int:
        check_int(name, value)
        unit = self.unit
        if value % unit:
            lo, hi = max(unit, value // unit * unit), (value // unit + 1) * unit
            raise ValueError(
                f"Invalid {name}: {value} is not a multiple of micro_batch_size × world_size = "
                f"{self.config.micro_batch_size} × {self.config.world_size} = {unit}; use {lo} or {hi}"
            )
        return value
