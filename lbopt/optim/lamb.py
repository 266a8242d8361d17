"""LAMB: the Adam direction, decoupled weight decay, and a layer-wise trust ratio."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lbopt.optim.base import (
    ExcludeSpec,
    LayerGrouping,
    LayerwiseOptimizer,
    StepPlan,
    check_clip,
    check_range,
)
from lbopt.rules.direction import descend
from lbopt.rules.scale import trust_ratio
from lbopt.stats import sq_norm

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
        lr: η. betas: (β₁, β₂) in [0, 1). eps: ε > 0. weight_decay: β ≥ 0 (decoupled).
        trust_clip: ``(lo, hi)`` bounds on ``r_l`` or None.
        bias_correction: divide the moments by ``1 − βᵗ`` (default True).
        exclude, layer_grouping, on_nonfinite: as in :class:`lbopt.CBLR`.

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
    ) -> None:
        check_range("lr", lr, 0.0, float("inf"))
        check_range("eps", eps, 0.0, float("inf"), lo_open=True)
        check_range("weight_decay", weight_decay, 0.0, float("inf"))
        for i, b in enumerate(betas):
            if not (isinstance(b, int | float) and 0.0 <= b < 1.0):
                raise ValueError(f"Invalid betas[{i}]: {b!r}; expected a number in [0, 1)")
        check_clip("trust_clip", trust_clip)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_clip=trust_clip,
            bias_correction=bias_correction,
        )
        super().__init__(
            params, defaults, exclude=exclude, layer_grouping=layer_grouping, on_nonfinite=on_nonfinite
        )

    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        guard = plan.stats.sums([sq_norm(grads)])
        present = guard[-1] > 0
        if self.nonfinite(torch.where(present, guard[0], 0.0)):
            return
        self._bump_step()
        dev = guard.device
        u = self.adam_direction(plan, grads, "eps", params, plan.seg_values(self.layer_weight_decay(dev)))
        norms = plan.stats.sums([sq_norm(params), sq_norm(u)], with_count=False).sqrt()
        ratio = trust_ratio(norms[0], norms[1])
        lo_hi = self.trust_clip()
        if lo_hi is not None:
            ratio = ratio.clamp(lo_hi[0], lo_hi[1])
        factors = torch.where(self.layer_mask("adapt", dev), ratio, torch.ones_like(ratio))
        lr_l = self.layer_hparam("lr", dev)
        self.record_layer_stats(present, lr=lr_l * factors, trust_ratio=factors)
        descend(params, u, plan.seg_values(lr_l * factors))
