"""CBLR and MCLR: curvature-based layer-wise learning rates (Gao & Zhong 2020).

Each layer is modelled as a quadratic with curvature ``C_l`` along the step; its optimal
step is ``1/C_l``, so layer l moves with rate ``η_l = η·κ/(Ĉ_l + ε)`` (clipped), where
``Ĉ_l`` is an EMA of a per-layer estimate. LARS is the instance whose estimate is the
weight ratio ``(‖g‖+β‖w‖)/‖w‖`` (see :class:`lbopt.LARS`). MCLR uses one rate for all
adapted layers, from the median curvature.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from lbopt.layout import segment_view
from lbopt.optim.base import (
    ExcludeSpec,
    LayerGrouping,
    LayerwiseOptimizer,
    StepPlan,
    check_clip,
    check_range,
)
from lbopt.rules.direction import add_scaled_, descend, momentum_update
from lbopt.rules.scale import (
    curvature_rate,
    ema_update,
    median_of,
    secant_curvature,
    weight_ratio_curvature,
)
from lbopt.stats import Quantity, sq_norm, sq_norm_now

__all__ = ["CBLR", "CURVATURE_ESTIMATORS", "MCLR"]

CURVATURE_ESTIMATORS = ("secant", "weight_ratio", "hvp")
DIRECTIONS = ("momentum", "adam")
_DEFAULT_EMA = {"secant": 0.9, "weight_ratio": 0.0, "hvp": 0.9}


class CBLR(LayerwiseOptimizer):
    r"""Curvature-based learning rate (Gao & Zhong 2020), layer-wise.

    Per adapted layer l (by default every parameter with ``ndim > 1``)::

        C_l  = secant:       ‖h_t − h_{t−1}‖ / ‖w_t − w_{t−1}‖,   h = g + βw
               weight_ratio: (‖g‖ + β‖w‖) / ‖w‖
               hvp:          ĝ_lᵀ H_ll ĝ_l,  ĝ_l = g_l/‖g_l‖   (every ``hvp_interval`` steps)
        Ĉ_l ← ρ Ĉ_l + (1 − ρ) C_l                       (first estimate initialises Ĉ)
        λ_l  = clip(κ / (Ĉ_l + ε), lo, hi)              (1 if no usable estimate)

    Excluded layers (biases, norms) get ``λ_l = 1`` and no decay. Direction, with
    ``α_l = η λ_l``:

    - ``momentum`` (default): ``v ← μv + α_l (g + βw)``; ``w ← w − v`` (Nesterov optional);
    - ``adam``: ``w ← w − α_l (m̂/(√v̂ + ε_adam) + βw)``.

    The secant needs two steps; on the first (and whenever a layer did not move) it falls
    back to the previous EMA, else to ``weight_ratio``. With ``curvature="weight_ratio"``
    and the defaults, CBLR *is* LARS: same hyperparameter names and defaults, same numbers.

    ``hvp`` needs ``step(closure)`` with the usual PyTorch closure (zero the gradients,
    forward, backward, return the loss). The layer-diagonal Hessian block along the
    gradient is probed by a forward difference, one closure call per adapted layer:
    ``ĝ_lᵀ(∇_l L(w + δ_l ĝ_l) − ∇_l L(w))/δ_l`` with ``δ_l = hvp_delta·max(‖w_l‖, 1)``
    (exact for quadratics; the weights and gradients are restored bit-exactly). It works
    on one process and under DDP (the closure's backward averages the probe gradients);
    sharded layouts (ZeRO) are refused.

    Args:
        params: parameters, ``(name, param)`` pairs (enables name-based ``exclude`` and
            ``layer_grouping="module"``) or param-group dicts.
        lr: base learning rate η (read from each group every step, so schedulers work).
        momentum: μ ∈ [0, 1).
        weight_decay: β ≥ 0, applied to adapted layers only.
        trust_coefficient: κ > 0.
        eps: ε ≥ 0 in the rate's denominator.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        trust_clip: ``(lo, hi)`` bounds on λ (so on ``η_l/η``), or None.
        curvature: ``"secant"`` (default) or ``"weight_ratio"``.
        hvp_interval: with ``curvature="hvp"``, re-estimate every this many steps (the EMA
            carries the estimate in between).
        hvp_delta: relative probe size δ for the ``hvp`` finite difference.
        curvature_ema: ρ ∈ [0, 1); None picks 0.9 for ``secant``/``hvp`` (noisy) and 0
            for ``weight_ratio`` (a closed form of the current weights and gradient).
        direction: ``"momentum"`` or ``"adam"``; ``betas`` and ``adam_eps`` for the latter.
        exclude: which parameters are not adapted and not decayed (default: ``ndim <= 1``);
            a regex or list of regexes on names, a predicate ``(name, p) -> bool``, or False.
        layer_grouping: ``"tensor"`` (one layer per parameter), ``"module"`` (adapted
            parameters of one module share a layer), or a callable name -> layer key.
        on_nonfinite: ``"skip"`` (default: warn, leave all state untouched) or ``"raise"``.

    Reference: W. Gao, L. Zhong, "Curvature-based learning rate for large-batch training"
    (2020); Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional
    Networks" (2017).
    """

    uses_median: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: tuple[float, float] | None = None,
        *,
        curvature: str = "secant",
        curvature_ema: float | None = None,
        hvp_interval: int = 10,
        hvp_delta: float = 1e-3,
        direction: str = "momentum",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        exclude: ExcludeSpec = None,
        layer_grouping: LayerGrouping = "tensor",
        on_nonfinite: str = "skip",
    ) -> None:
        check_range("lr", lr, 0.0, float("inf"))
        check_range("momentum", momentum, 0.0, 1.0)
        if momentum >= 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r}; expected a number in [0, 1)")
        check_range("weight_decay", weight_decay, 0.0, float("inf"))
        check_range("trust_coefficient", trust_coefficient, 0.0, float("inf"), lo_open=True)
        check_range("eps", eps, 0.0, float("inf"))
        check_clip("trust_clip", trust_clip)
        if nesterov and momentum <= 0:
            raise ValueError("Invalid nesterov=True with momentum=0; Nesterov needs momentum > 0")
        if curvature not in CURVATURE_ESTIMATORS:
            raise ValueError(f"Invalid curvature: {curvature!r}; expected one of {CURVATURE_ESTIMATORS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"Invalid direction: {direction!r}; expected one of {DIRECTIONS}")
        if curvature_ema is None:
            curvature_ema = _DEFAULT_EMA[curvature]
        check_range("curvature_ema", curvature_ema, 0.0, 1.0)
        if curvature_ema >= 1.0:
            raise ValueError(f"Invalid curvature_ema: {curvature_ema!r}; expected a number in [0, 1)")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid betas[{i}]: {b!r}; expected a number in [0, 1)")
        check_range("adam_eps", adam_eps, 0.0, float("inf"))
        if not (isinstance(hvp_interval, int) and hvp_interval >= 1):
            raise ValueError(f"Invalid hvp_interval: {hvp_interval!r}; expected an integer >= 1")
        check_range("hvp_delta", hvp_delta, 0.0, float("inf"), lo_open=True)
        self.curvature = curvature
        self.curvature_ema = float(curvature_ema)
        self.hvp_interval = hvp_interval
        self.hvp_delta = float(hvp_delta)
        self._hvp_calls = 0
        self.direction = direction
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, nesterov=nesterov, trust_clip=trust_clip, betas=tuple(betas), adam_eps=adam_eps,
        )
        super().__init__(
            params, defaults, exclude=exclude, layer_grouping=layer_grouping, on_nonfinite=on_nonfinite
        )

    # ------------------------------------------------------------------ statistics
    def _layer_curvature(
        self, plan: StepPlan, params, grads, wd_l: torch.Tensor, wd_seg: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One all-reduce: ‖w‖², ‖g‖² (and ‖Δh‖², ‖Δw‖² for the secant) per layer.

        Returns ``(curvature used, present mask)`` or None when
        the step must be skipped (non-finite gradient).
        """
        layout = plan.layout
        quantities = [sq_norm(params), sq_norm(grads)]
        secant = self.curvature == "secant"
        if secant:
            # Segments whose tensor has no history yet contribute nothing to Δ (→ fallback).
            history = [t in self.state and "prev_param" in self.state[t] for t in layout.tensors]
            known = [i for i, s in enumerate(layout.segments) if history[s.tensor]]
            quantities += self._secant_quantities(layout, known, params, grads, wd_seg)
        sums = plan.stats.sums(quantities)
        present = sums[-1] > 0
        if self.nonfinite(torch.where(present, sums[1], 0.0)):
            return None
        w_norm, g_norm = sums[0].sqrt(), sums[1].sqrt()
        ratio = weight_ratio_curvature(w_norm, g_norm, wd_l)
        if secant:
            estimate = secant_curvature(sums[2].sqrt(), sums[3].sqrt())
        elif self.curvature == "hvp":
            estimate = self._hvp_curvature(layout, params, g_norm, present)
        else:
            estimate = ratio
        ema, has = self._curvature_ema(sums.device)
        ema, has = ema_update(ema, has, estimate, self.curvature_ema, present)
        self.layer_state["curvature"], self.layer_state["has_curvature"] = ema, has
        if secant:
            # Remember w_t and h_t for the next secant (after the guard: no NaN gets in).
            torch._foreach_copy_(layout.views([self.buffer(t, "prev_param") for t in layout.tensors]), params)
            prev_h = layout.views([self.buffer(t, "prev_grad") for t in layout.tensors])
            torch._foreach_copy_(prev_h, grads)
            add_scaled_(prev_h, params, wd_seg)
            used = torch.where(has, ema, ratio)
        elif self.curvature == "hvp":
            used = torch.where(has, ema, ratio)
        else:
            used = ema if self.curvature_ema > 0 else estimate
        return used, present

    def _hvp_curvature(self, layout, params, g_norm: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``ĝ_lᵀ H_ll ĝ_l`` per adapted layer by forward differences (NaN where not probed)."""
        estimate = torch.full_like(g_norm, float("nan"))
        due = self._hvp_calls % self.hvp_interval == 0
        self._hvp_calls += 1
        if not due:
            return estimate
        if layout.sharded:
            raise RuntimeError(
                "CBLR(curvature='hvp') needs whole parameters (one process or DDP); under ZeRO use "
                "curvature='secant' (the default), which is exact on partitions"
            )
        if self._closure is None:
            raise RuntimeError(
                "CBLR(curvature='hvp') needs step(closure): a closure that zeroes the gradients, runs "
                "forward and backward, and returns the loss"
            )
        held = [t.grad for t in layout.tensors]
        saved = [g.detach().clone() for g in held]
        grads = layout.views(saved)
        adapt = self.layer_mask("adapt", g_norm.device)
        for layer in torch.nonzero(adapt & present & (g_norm > 0)).flatten().tolist():
            segs = [i for i, s in enumerate(layout.segments) if s.layer == layer]
            w_norm = float(torch.stack([params[i].norm() for i in segs]).norm())
            delta = self.hvp_delta * max(w_norm, 1.0)
            scale = delta / float(g_norm[layer])
            originals = [params[i].detach().clone() for i in segs]
            for i in segs:
                params[i].add_(grads[i], alpha=scale)
            with torch.enable_grad():
                self._closure()
            for i, orig in zip(segs, originals):
                params[i].copy_(orig)
            probe = layout.views([t.grad for t in layout.tensors])
            dot = sum(float(torch.dot((probe[i] - grads[i]).reshape(-1).double(), grads[i].reshape(-1).double()))
                      for i in segs)
            estimate[layer] = dot / (float(g_norm[layer]) * delta)
        # The closure may have zeroed the step's gradient tensors in place or replaced them.
        for t, grad, copy in zip(layout.tensors, held, saved):
            grad.copy_(copy)
            t.grad = grad
        return estimate

    def _secant_quantities(self, layout, known: list[int], params, grads, wd_seg) -> list[Quantity]:
        """``‖Δh‖²`` and ``‖Δw‖²`` over the ``known`` segments, through one reusable workspace.

        Nothing in the optimizer state changes here (the non-finite guard has not run yet).
        """
        if not known:
            return [sq_norm([], known), sq_norm([], known)]
        work = [
            segment_view(self.workspace(layout.tensors[layout.segments[i].tensor]), layout.segments[i]).view_as(
                params[i]
            )
            for i in known
        ]
        torch._foreach_copy_(work, [grads[i] for i in known])
        add_scaled_(work, [params[i] for i in known], [wd_seg[i] for i in known])
        torch._foreach_sub_(work, [self._history_view(layout, i, "prev_grad") for i in known])
        dh = sq_norm_now(work, known)
        torch._foreach_copy_(work, [params[i] for i in known])
        torch._foreach_sub_(work, [self._history_view(layout, i, "prev_param") for i in known])
        return [dh, sq_norm_now(work, known)]

    def _history_view(self, layout, segment: int, name: str) -> torch.Tensor:
        seg = layout.segments[segment]
        return segment_view(self.state[layout.tensors[seg.tensor]][name], seg)

    def _curvature_ema(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.table.num_layers
        ema = self.layer_state.get("curvature")
        if ema is None or ema.numel() != n:
            ema = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
            self.layer_state["has_curvature"] = torch.zeros(n, dtype=torch.bool, device=device)
        return ema.to(device), self.layer_state["has_curvature"].to(device)

    def _layer_factors(self, used: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``λ_l`` for every layer: the curvature rate where adapted, 1 elsewhere."""
        dev = used.device
        adapt = self.layer_mask("adapt", dev)
        kappa = self.layer_hparam("trust_coefficient", dev, default=1.0)
        eps = self.layer_hparam("eps", dev)
        clip = self.trust_clip()
        if self.uses_median:
            median = median_of(used, adapt & present)
            used = median.expand_as(used)
        rate = curvature_rate(used, kappa, eps, clip)
        return torch.where(adapt, rate, torch.ones_like(rate))

    # ------------------------------------------------------------------ the step
    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        dev = plan.stats.device
        wd_l = self.layer_weight_decay(dev)
        wd_seg = plan.seg_values(wd_l)
        result = self._layer_curvature(plan, params, grads, wd_l, wd_seg)
        if result is None:
            return
        used, present = result
        factors = self._layer_factors(used, present)
        lr_l = self.layer_hparam("lr", dev)
        self.record_layer_stats(present, lr=lr_l * factors, curvature=used)
        step_sizes = plan.seg_values(lr_l * factors)
        self._bump_step()
        if self.direction == "momentum":
            bufs = layout.views([self.buffer(t, "momentum_buffer") for t in layout.tensors])
            momentum_update(
                params, grads, bufs, step_sizes, wd_seg,
                plan.seg_values(self.layer_hparam("momentum", dev)),
                [bool(v) for v in plan.seg_values(self.layer_hparam("nesterov", dev))],
            )
        else:
            self._adam_step(plan, params, grads, step_sizes, wd_seg)

    def _adam_step(self, plan: StepPlan, params, grads, step_sizes, wd_seg) -> None:
        descend(params, self.adam_direction(plan, grads, "adam_eps", params, wd_seg), step_sizes)


class MCLR(CBLR):
    r"""Median-curvature learning rate: one rate for all adapted layers.

    The per-layer estimates ``Ĉ_l`` are those of :class:`CBLR`; the rate is
    ``η_t = η·clip(κ / (median_l Ĉ_l + ε), lo, hi)`` for every adapted layer (median over
    the adapted layers present in the step; the mean of the two middle values for an even
    count), ``η`` for excluded ones. Cheaper to tune and more robust to single-layer noise
    than CBLR; reported on a par with LARS (Gao & Zhong 2020). The median spans all
    parameter groups, so engine adapters hand MCLR every group in one ``step()`` call.
    """

    uses_median = True
    needs_all_groups = True
