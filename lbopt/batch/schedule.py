"""A planned global batch over training (Gao & Zhong 2020's batch-size scheduling).

Syntax of a schedule string (also the recipes' ``--batch_schedule``)::

    [epoch: | step:]AT:BATCH,AT:BATCH,...

- ``AT``: where the entry starts, in epochs (default; may be fractional, e.g. ``1.5``) or in
  optimizer steps (``step:`` prefix; integers). The first ``AT`` must be 0; ``AT`` strictly
  increases.
- ``BATCH``: the global batch (all ranks, all micro-batches) from there on; a multiple of
  ``micro_batch_size × world_size``. It may grow or shrink.

Examples: ``"0:256,1:1024,3:4096"`` (256 in epoch 0, 1024 in epochs 1-2, 4096 from epoch 3);
``"step:0:256,500:1024"``.

*Where exactly the batch changes.* The schedule is asked after every optimizer step for the
batch of the next one. By steps: step ``t`` (0-based) uses the entry with the largest
``AT ≤ t``. By epochs: the position is ``samples_seen / samples_per_epoch``; a step that
straddles an epoch boundary (recipes stream micro-batches across epochs) keeps its batch,
and the first step that *starts* at or after ``AT`` epochs uses the new batch. Every sample
is still seen once per epoch: only the number of micro-batches per step changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from lbopt.batch.controller import BatchDecision
from lbopt.batch.policy import LR_RULES, BatchSizePolicy
from lbopt.validation import check_choice, check_int

__all__ = ["BatchSizeSchedule", "parse_batch_schedule"]

BY = ("epoch", "step")


def parse_batch_schedule(text: str) -> tuple[str, list[tuple[float, int]]]:
    """``"[epoch:|step:]AT:B,AT:B,..."`` → ``(by, [(at, batch), ...])``; ValueError naming the bad entry."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"Invalid batch schedule: {text!r}; expected e.g. '0:256,1:1024,3:4096' or 'step:0:256,500:1024'"
        )
    body, by = text.strip(), "epoch"
    for prefix in BY:
        if body.startswith(prefix + ":"):
            body, by = body[len(prefix) + 1:], prefix
    entries: list[tuple[float, int]] = []
    for item in body.split(","):
        parts = item.strip().split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            at = float(parts[0]) if by == "epoch" else int(parts[0])
            batch = int(parts[1])
        except ValueError:
            raise ValueError(
                f"Invalid batch schedule entry {item.strip()!r} in {text!r}; expected AT:BATCH with AT an "
                f"{'epoch (a number)' if by == 'epoch' else 'optimizer step (an integer)'} and BATCH an integer"
            ) from None
        entries.append((at, batch))
    check_entries(text, by, entries)
    return by, entries


def check_entries(schedule: Any, by: str, entries: Sequence[tuple[float, int]]) -> None:
    """The first start is 0, starts increase, step starts are integers (ValueError naming the schedule)."""
    if not entries or entries[0][0] != 0:
        raise ValueError(f"Invalid batch schedule {schedule!r}: the first entry must start at 0 (e.g. '0:256,...')")
    for (a0, _), (a1, _) in zip(entries, entries[1:]):
        if not a1 > a0:
            raise ValueError(f"Invalid batch schedule {schedule!r}: starts must increase ({a0} then {a1})")
    if by == "step" and any(not float(a).is_integer() for a, _ in entries):
        raise ValueError(f"Invalid batch schedule {schedule!r}: step starts must be integers")


@dataclass
class _ScheduleConfig:
    initial_batch_size: int
    micro_batch_size: int
    world_size: int
    lr_coupling: str
    by: str
    entries: list[tuple[float, int]]
    samples_per_epoch: int | None


class BatchSizeSchedule(BatchSizePolicy):
    """The global batch follows a fixed plan by epoch or by optimizer step.

    Drives the same engines as :class:`lbopt.BatchSizeController` (fixed micro-batch,
    growing accumulation; ``engine.set_train_batch_size`` under DeepSpeed; see
    :mod:`lbopt.integrations.adaptive_batch`), works with any optimizer and needs no gradient
    statistics. ``lr_factor = (B/B₀)^p`` by ``lr_coupling`` (:func:`lbopt.batch.policy.lr_scale`).

    Args:
        schedule: a string (module docstring) or a list of ``(at, batch)`` pairs.
        micro_batch_size: samples per forward/backward on one rank.
        world_size: data-parallel size (default: ``torch.distributed`` world size, else 1).
        samples_per_epoch: global samples in one epoch (required for a schedule by epoch):
            what the loaders yield over all ranks, e.g. ``len(loader) × micro × world``.
        lr_coupling: ``"none"`` (default), ``"sqrt"`` or ``"linear"``.
        by: ``"epoch"`` or ``"step"`` for a list schedule (a string carries its own).
    """

    def __init__(
        self,
        schedule: str | Sequence[tuple[float, int]],
        micro_batch_size: int,
        world_size: int | None = None,
        *,
        samples_per_epoch: int | None = None,
        lr_coupling: str = "none",
        by: str = "epoch",
    ) -> None:
        if isinstance(schedule, str):
            by, entries = parse_batch_schedule(schedule)
        else:
            entries = [(float(a) if by == "epoch" else a, b) for a, b in schedule]
        check_choice("by", by, BY)
        check_int("micro_batch_size", micro_batch_size)
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        check_int("world_size", world_size)
        check_choice("lr_coupling", lr_coupling, tuple(LR_RULES))
        check_entries(schedule, by, entries)
        if by == "epoch":
            if samples_per_epoch is None:
                raise ValueError(
                    "Invalid samples_per_epoch: None; a schedule by epoch needs the global samples of one epoch "
                    "(len(train_loader) × micro_batch_size × world_size), or use a schedule by step ('step:0:256,...')"
                )
            check_int("samples_per_epoch", samples_per_epoch)
        self.config = _ScheduleConfig(
            initial_batch_size=entries[0][1], micro_batch_size=micro_batch_size, world_size=world_size,
            lr_coupling=lr_coupling, by=by, entries=list(entries), samples_per_epoch=samples_per_epoch,
        )
        for i, (_, batch) in enumerate(entries):
            self._check_multiple(f"batch of schedule entry {i} ({entries[i][0]}:{batch})", batch)
        self._init_policy(entries[0][1])
        self.samples_seen = 0
        self.last = BatchDecision(step=0, batch_size=self.batch_size, previous_batch_size=self.batch_size)

    # ------------------------------------------------------------------ the plan
    def batch_at(self, steps: int, samples_seen: int) -> int:
        """The batch of the step that starts after ``steps`` steps and ``samples_seen`` samples."""
        cfg = self.config
        position = float(steps) if cfg.by == "step" else samples_seen / cfg.samples_per_epoch  # type: ignore[operator]
        batch = cfg.entries[0][1]
        for at, b in cfg.entries:
            if position + 1e-12 >= at:
                batch = b
        return batch

    @property
    def epoch(self) -> float:
        """Epochs of data seen so far (NaN for a schedule by step without ``samples_per_epoch``)."""
        spe = self.config.samples_per_epoch
        return self.samples_seen / spe if spe else math.nan

    def step(self, samples: int | None = None) -> BatchDecision:
        """Close one optimizer step of ``samples`` global samples (default: the current batch)."""
        previous = self.batch_size
        self.steps += 1
        self.samples_seen += previous if samples is None else int(samples)
        new = self.batch_at(self.steps, self.samples_seen)
        self.last = BatchDecision(step=self.steps, batch_size=new, previous_batch_size=previous, tested=False,
                                  reason="scheduled" if new != previous else "held")
        self._change_batch(new)
        return self.last

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "steps": self.steps, "samples_seen": self.samples_seen,
                "history": list(self.history), "entries": list(self.config.entries), "by": self.config.by}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [tuple(e) for e in state.get("entries", self.config.entries)]
        if saved != [tuple(e) for e in self.config.entries] or state.get("by", self.config.by) != self.config.by:
            raise ValueError(
                f"Invalid state: saved batch schedule {state.get('by')}:{state.get('entries')} differs from this "
                f"one {self.config.by}:{self.config.entries}; resume with the same schedule"
            )
        batch = int(state["batch_size"])
        self._check_multiple("state batch_size", batch)
        self.batch_size = batch
        self.steps = int(state["steps"])
        self.samples_seen = int(state["samples_seen"])
        self.history = [tuple(h) for h in state.get("history", [(0, batch)])]  # type: ignore[misc]
