"""LAMB: the Adam direction, decoupled weight decay, and a layer-wise trust ratio."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lbopt.optim.base import ExcludeSpec, LayerGrouping, LayerwiseOptimizer, StepPlan, StepStatistics
from lbopt.rules.direction import descend
from lbopt.rules.scale import trust_ratio
from lbopt.stats import Quantity, sq_norm
from lbopt.validation import check_betas, check_clip, check_range

__all__ = ["LAMB"]


class LAMB(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (You et al. 2019).

    Per adapted layer l (by default every parameter with ``ndim > 1``)::

        m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
        u_l = m̂_l / (√v̂_l + ε) + β w_l
        r_l = clip(‖w_l‖ / ‖u_l‖, lo, hi)               (1 if a norm is 0)
        w_l ← w_l − η r_l u_l

    Excluded layers (biases, norms) use ``r = 1`` and no decay. ``‖w_l‖`` and ``‖u_l‖``
    are exact global per-layer norms under any sharding. Two small all-reduces per
    sharded step: the first carries ``‖g_l‖²`` so that a non-finite gradient is caught on
    every rank *before* the moments change; the second the norms of the trust ratio.

    Args:
        params: parameters, ``(name, param)`` pairs or param-group dicts.
        lr: η ≥ 0, finite (a float or a one-element tensor). betas: (β₁, β₂) in [0, 1).
        eps: ε > 0. weight_decay: β ≥ 0 (decoupled).
        trust_clip: ``(lo, hi)`` bounds on ``r_l`` or None.
        bias_correction: divide the moments by ``1 − βᵗ`` (default True).
        exclude: which parameters are not adapted and not decayed: None (default,
            ``ndim <= 1``), False, regexes on names (``"+regex"`` adds to the default), or a
            predicate; see :class:`lbopt.optim.base.Exclusion`.
        layer_grouping, on_nonfinite: as in :class:`lbopt.CBLR`.
        maximize, foreach: as in ``torch.optim`` (see :class:`lbopt.LayerwiseOptimizer`).

    Reference: Y. You et al., "Large Batch Optimization for Deep Learning: Training BERT
    in 76 minutes" (ICLR 2020).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        trust_clip: tuple[float, float] | None = None,
        bias_correction: bool = True,
        *,
        exclude: ExcludeSpec = None,
        layer_grouping: LayerGrouping = "tensor",
        on_nonfinite: str = "skip",
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_range("lr", lr, tensor_ok=True)
        check_range("eps", eps, lo_open=True)
        check_range("weight_decay", weight_decay)
        defaults = dict(
            lr=lr, betas=check_betas("betas", betas), eps=eps, weight_decay=weight_decay,
            trust_clip=check_clip("trust_clip", trust_clip), bias_correction=bool(bias_correction),
        )
        super().__init__(
            params, defaults, exclude=exclude, layer_grouping=layer_grouping, on_nonfinite=on_nonfinite,
            maximize=maximize, foreach=foreach,
        )

    def _statistics(self, plan: StepPlan) -> StepStatistics:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        # Only the guard's ‖g‖ here: ‖w‖ comes from the direction's sweep, which reads w anyway.
        sums = plan.stats.sums([sq_norm(grads)])
        present = sums[-1] > 0
        guard = torch.where(present, sums[0], 0.0)
        return StepStatistics(guard, values={"present": present, "params": params, "grads": grads})

    def _update(self, plan: StepPlan, stats: StepStatistics, host: list[float]) -> None:
        params, grads, present = stats.values["params"], stats.values["grads"], stats.values["present"]
        self._bump_step()
        dev = stats.guard.device
        w_seg: list[torch.Tensor] = []
        work, k, d_sq = self.scaled_adam_direction(plan, grads, "eps", params, param_sq=w_seg)
        k_sq = torch.tensor(k, dtype=d_sq.dtype, device=d_sq.device).square()
        u_sq, w_sq = plan.stats.sums([Quantity((), values=d_sq * k_sq), Quantity((), values=w_seg[0].to(d_sq.device))],
                                     with_count=False)
        ratio = trust_ratio(w_sq.sqrt(), u_sq.sqrt())
        lo_hi = self.trust_clip()
        if lo_hi is not None:
            ratio = ratio.clamp(lo_hi[0], lo_hi[1])
        factors = torch.where(self.layer_mask("adapt", dev), ratio, torch.ones_like(ratio))
        lr_l = self.layer_hparam("lr", dev)
        self.record_layer_stats(present, lr=lr_l * factors, trust_ratio=factors)
        # w ← w − η r_l k_i d_i with the rates kept on the device (no second sync).
        descend(params, work, plan.seg_tensors(lr_l * factors, scale=k))
