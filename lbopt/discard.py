"""Small-loss discarding (Gao & Zhong 2020): each step's gradient is the mean over the kept samples.

Of the ``B`` samples of one optimizer step (all micro-batches of the step, on all data-parallel
ranks) the ``n = ⌊ρ·B⌋`` with the smallest loss are dropped and the step's gradient is

    g = (1/K) Σ_{i ∈ kept} ∇ℓ_i,        K = B − n.

**Which set is kept, exactly.** The step's losses are put in one global order: micro-batch ``j``
of the step (0 … A−1), then rank ``r`` (0 … W−1), then position ``i`` inside the micro-batch. The
dropped samples are the first ``n`` of that order after a *stable* ascending sort by loss, so
equal losses are dropped in global order. Every rank all-gathers the losses and computes the
same sort, so all ranks agree without further communication. The threshold is therefore global
over micro-batches and ranks, never per micro-batch or per rank.

**With gradient accumulation** the whole step's losses must be known before the first backward.
:meth:`SmallLossDiscard.accumulate` does it in two passes: a no-grad forward of every
micro-batch of the step (the *scouting* pass, inside a forked RNG so that dropout draws the very
same masks in the second pass) gives the losses, one all-gather gives the kept set, then each
micro-batch is forwarded again and back-propagated with per-sample 0/1 weights scaled by the
global kept count ``K``. Cost: one extra forward per micro-batch. Without accumulation (one
micro-batch per step) the losses of the step's own forward are used (:meth:`SmallLossDiscard.__call__`,
or :meth:`~SmallLossDiscard.accumulate` with one micro-batch): no extra forward.

Engines average micro-batch losses: Accelerate, DeepSpeed and the HF Trainer divide each
micro-batch loss by the accumulation ``A``, DDP and ZeRO average gradients over the ``W`` ranks.
The loss handed to the engine for micro-batch ``j`` on rank ``r`` is therefore

    L_{j,r} = (A·W / K) · Σ_{i ∈ kept ∩ (j, r)} ℓ_i,

so that the engine's ``(1/(A·W)) Σ_{j,r} ∇L_{j,r}`` is exactly ``g``. ``ρ = 0`` returns
``losses.mean()`` untouched (no gather, no scouting): bit-identical to not discarding.

Reference: W. Gao, L. Zhong, "Curvature-based learning rate for large-batch training" (2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DiscardPlan", "SmallLossDiscard", "dropped_count", "per_sample_cross_entropy"]


def dropped_count(fraction: float, total: int) -> int:
    """``n = ⌊ρ·B⌋`` samples dropped of ``B`` (a 1e-9 guard keeps e.g. 0.29·100 at 29, not 28)."""
    return min(total - 1, int(math.floor(fraction * total + 1e-9))) if total > 0 else 0


def per_sample_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, causal: bool = False, ignore_index: int = -100
) -> torch.Tensor:
    """One cross-entropy per sample, shape ``[batch]``.

    Classification (``logits [B, C]``, ``labels [B]``): ``ℓ_i = CE(logits_i, y_i)``.
    Causal LM (``causal=True``, ``logits [B, T, V]``, ``labels [B, T]``): labels are shifted
    by one (token t predicts t+1) and ``ℓ_i`` is the mean over sample i's tokens whose label is
    not ``ignore_index`` (0 for a sample without any).
    """
    if not causal:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignore_index)
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none", ignore_index=ignore_index
    ).view(labels.shape)
    counts = (labels != ignore_index).sum(dim=1)
    return token.sum(dim=1) / counts.clamp(min=1)


@dataclass
class DiscardPlan:
    """The kept set of one optimizer step.

    Attributes:
        masks: per local micro-batch, a bool tensor (True = kept) of its samples.
        kept: K, samples kept over the whole step (all micro-batches, all ranks).
        total: B, samples of the whole step.
        threshold: the smallest kept loss (every dropped loss is ≤ it).
        scale: ``A·W/K``, the factor applied to each micro-batch's sum of kept losses.
        mean_loss: mean loss over all B samples; kept_mean_loss: over the K kept ones.
    """

    masks: list[torch.Tensor]
    kept: int
    total: int
    threshold: float
    scale: float
    mean_loss: float
    kept_mean_loss: float

    def micro_batch_loss(self, index: int, losses: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate for local micro-batch ``index`` (engine divides by A·W).

        ``(A·W/K) · Σ_{kept i} ℓ_i`` over this micro-batch's per-sample ``losses``.
        """
        mask = self.masks[index]
        if losses.shape != mask.shape:
            raise ValueError(
                f"micro-batch {index} has {tuple(losses.shape)} per-sample losses but the plan selected from "
                f"{tuple(mask.shape)}: give the same micro-batches in the same order to both passes"
            )
        return (losses * mask.to(losses.dtype)).sum() * self.scale

    def as_dict(self) -> dict[str, float]:
        """Figures for trackers: ``discard/kept``, ``discard/threshold``, ``discard/kept_mean_loss``, ..."""
        return {
            "discard/kept": float(self.kept),
            "discard/total": float(self.total),
            "discard/threshold": self.threshold,
            "discard/mean_loss": self.mean_loss,
            "discard/kept_mean_loss": self.kept_mean_loss,
        }


class SmallLossDiscard:
    """Drop the fraction ρ of each step's samples with the smallest loss (see the module docstring).

    Args:
        fraction: ρ ∈ [0, 1). ``0`` turns discarding off (the plain mean, bit-identical).
        group: the data-parallel process group whose ranks share one step's batch (default:
            the world, when ``torch.distributed`` is initialised; else one process).

    Two ways to use it:

    - one micro-batch per step: ``loss = discard(per_sample_losses)`` then the usual backward;
    - with accumulation: ``discard.accumulate(micro_batches, per_sample_loss_fn, backward)``.
    """

    def __init__(self, fraction: float, *, group: Any = None) -> None:
        if not isinstance(fraction, int | float) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"Invalid discard fraction: {fraction!r}; expected a number in [0, 1) (0 = keep all)")
        self.fraction = float(fraction)
        self.group = group
        self.last: DiscardPlan | None = None

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0

    # ------------------------------------------------------------------ selection
    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Each rank's 1-D tensor, in rank order (sizes may differ between ranks)."""
        world = self.world_size()
        if world == 1:
            return [local]
        count = torch.tensor([local.numel()], device=local.device, dtype=torch.long)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=self.group)
        sizes = [int(c.item()) for c in counts]
        padded = torch.zeros(max(sizes), device=local.device, dtype=local.dtype)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.group)
        return [part[:n] for part, n in zip(parts, sizes)]

    def select(self, losses: Sequence[torch.Tensor]) -> DiscardPlan:
        """The kept set of a step whose local micro-batches had these per-sample ``losses``.

        One all-gather (two tiny ones) over the group; every rank returns the same K and
        threshold, and the masks of its own micro-batches.
        """
        local = [loss.detach().reshape(-1).float() for loss in losses]
        if not local:
            raise ValueError("select() needs the per-sample losses of at least one micro-batch")
        sizes = [t.numel() for t in local]
        gathered = self._gather(torch.cat(local))  # [rank] -> this rank's micro-batches, concatenated
        world, rank = len(gathered), (dist.get_rank(self.group) if len(gathered) > 1 else 0)
        per_rank_sizes = self._gather(torch.tensor(sizes, dtype=torch.float32, device=local[0].device))
        # global order: micro-batch j, then rank r, then position i
        pieces, owner = [], []
        splits = [torch.split(g, [int(s) for s in per_rank_sizes[r].tolist()]) for r, g in enumerate(gathered)]
        if len({len(s) for s in splits}) != 1:
            raise ValueError(
                f"ranks disagree on the number of micro-batches of this step: {[len(s) for s in splits]}"
            )
        for j in range(len(local)):
            for r in range(world):
                pieces.append(splits[r][j])
                owner.append((j, r))
        everything = torch.cat(pieces)
        total = everything.numel()
        n_drop = dropped_count(self.fraction, total)
        order = torch.sort(everything, stable=True).indices
        keep = torch.ones(total, dtype=torch.bool, device=everything.device)
        keep[order[:n_drop]] = False
        kept = total - n_drop
        masks, offset = [], 0
        for (_j, r), piece in zip(owner, pieces):
            if r == rank:
                masks.append(keep[offset : offset + piece.numel()].clone())
            offset += piece.numel()
        masks = [m.view_as(loss.detach()) for m, loss in zip(masks, losses)]
        plan = DiscardPlan(
            masks=masks,
            kept=kept,
            total=total,
            threshold=float(everything[order[n_drop]]),
            scale=len(local) * world / kept,
            mean_loss=float(everything.mean()),
            kept_mean_loss=float(everything[keep].mean()),
        )
        self.last = plan
        return plan

    # ------------------------------------------------------------------ one micro-batch per step
    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        """Mean over the kept samples of this step's single micro-batch (per rank: scaled by W).

        ``losses``: per-sample losses with their graph. Returns ``losses.mean()`` when ρ = 0, else
        ``(W/K) Σ_{kept local} ℓ_i`` — the mean over the K globally kept samples once DDP/ZeRO
        average the gradient over the W ranks. For several micro-batches per step use
        :meth:`accumulate` (selecting per micro-batch would make the threshold per micro-batch).
        """
        if not self.enabled:
            return losses.mean()
        return self.select([losses]).micro_batch_loss(0, losses)

    # ------------------------------------------------------------------ gradient accumulation
    def accumulate(
        self,
        micro_batches: Iterable[Any],
        per_sample_loss: Callable[[Any], torch.Tensor],
        backward: Callable[[torch.Tensor, int], None],
        context: Callable[[int], AbstractContextManager[Any]] | None = None,
    ) -> DiscardPlan | None:
        """Run one optimizer step's forwards and backwards with the global kept set.

        ``per_sample_loss(batch)`` forwards one micro-batch and returns its per-sample losses;
        ``backward(loss, j)`` back-propagates micro-batch ``j``'s loss the way the engine wants
        it (``accelerator.backward``, ``engine.backward``, DDP's ``no_sync`` for all but the last,
        ...), dividing by the accumulation as usual. ``context(j)``, if given, wraps micro-batch
        ``j``'s forward *and* backward (e.g. ``accelerator.accumulate(model)`` or DDP's
        ``no_sync()``). With ρ = 0 each micro-batch is forwarded once and
        ``backward(losses.mean(), j)`` is called: the plain loop. Returns the plan (None when ρ = 0).
        """
        batches = list(micro_batches)
        wrap = context or (lambda _j: nullcontext())
        if not self.enabled:
            for j, batch in enumerate(batches):
                with wrap(j):
                    backward(per_sample_loss(batch).mean(), j)
            return None
        if len(batches) == 1:  # the step's only micro-batch: select from its own forward, no scouting
            with wrap(0):
                losses = per_sample_loss(batches[0])
                plan = self.select([losses])
                backward(plan.micro_batch_loss(0, losses), 0)
            return plan
        with torch.random.fork_rng(devices=_rng_devices()), torch.no_grad():
            scouted = [per_sample_loss(batch) for batch in batches]
        plan = self.select(scouted)
        for j, batch in enumerate(batches):
            with wrap(j):
                backward(plan.micro_batch_loss(j, per_sample_loss(batch)), j)
        return plan


def _rng_devices() -> list[int]:
    """The CUDA devices whose RNG the scouting pass must leave untouched (none on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []
