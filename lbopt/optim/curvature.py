"""CBLR and MCLR: curvature-based layer-wise learning rates (Gao & Zhong 2020).

Each layer is modelled as a quadratic with curvature ``C_l`` along the step. Along an update
direction ``d_l`` (momentum or Adam) the model's optimal step is ``⟨h_l, d_l⟩ / (C_l ‖d_l‖²)``
with ``h = g + βw``; CBLR takes that step per layer, with a robust secant estimate of
``C_l``, a small first step and a bounded growth of the rate. LARS is the instance whose
"curvature" is the weight ratio ``(‖g‖+β‖w‖)/‖w‖`` with LARS's plain rate ``κ/C`` (see
:class:`lbopt.LARS`). MCLR uses one rate for the whole model, from the median curvature.
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
    StepStatistics,
    check_clip,
    check_range,
)
from lbopt.rules.direction import CPU_BLOCK, add_scaled_, descend
from lbopt.rules.scale import (
    curvature_rate,
    limit_growth,
    median_of,
    model_projection,
    ratio_ema_update,
    weight_ratio_curvature,
)
from lbopt.rules.sweeps import heavy_ball_, layer_sums, projected_heavy_ball_
from lbopt.stats import Quantity, dot, sq_norm

__all__ = ["CBLR", "CURVATURE_ESTIMATORS", "MCLR"]

CURVATURE_ESTIMATORS = ("rayleigh", "secant", "weight_ratio", "hvp")
DIRECTIONS = ("momentum", "adam")
_DEFAULT_EMA = {"rayleigh": 0.9, "secant": 0.9, "weight_ratio": 0.0, "hvp": 0.9}
_HISTORY = ("rayleigh", "secant")  # estimators that keep w_{t-1} and h_{t-1}


class CBLR(LayerwiseOptimizer):
    r"""Curvature-based learning rate (Gao & Zhong 2020), layer-wise.

    Per adapted layer l (by default every parameter with ``ndim > 1``), with ``h = g + βw``::

        C_l  = rayleigh:     ⟨Δh, Δw⟩ / ‖Δw‖²            (Δ: change since the last step)
               secant:       ‖Δh‖ / ‖Δw‖
               hvp:          ĝ_lᵀ H_ll ĝ_l,  ĝ_l = g_l/‖g_l‖   (every ``hvp_interval`` steps)
               weight_ratio: (‖g‖ + β‖w‖) / ‖w‖             (LARS; not a curvature)
        Ĉ_l  = EMA_ρ(numerator) / EMA_ρ(denominator)        (first estimate initialises)

    **Model step** (``model_step=True``, the default for real curvatures). The layer's
    quadratic model ``L(w − s d) ≈ L − s⟨h, d⟩ + ½ s² C ‖d‖²`` along the update direction
    ``d_l`` is minimised by ``s = ⟨h, d⟩ / (C ‖d‖²)``, so::

        r_l  = min(κ / (Ĉ_l + ε), growth · r_l,prev)       (first step: r_l = κ τ₀ ‖w_l‖ / ‖h_l‖)
        λ_l  = r_l · max(⟨h_l, d_l⟩, 0) / ‖d_l‖²,   clipped by ``trust_clip``
        w_l ← w_l − η λ_l d_l

    ``κ = 1`` (the default here) is exactly the model's step; η (the group's ``lr``, default
    1) is left to schedules (warm-up, decay). Directions: ``momentum`` keeps the step size
    out of the buffer, ``m ← μm + h``, ``d = m`` (Nesterov: ``d = h + μm``); ``adam`` uses
    ``d = m̂/(√v̂ + ε_adam) + βw``. Safeguards: the first step (no curvature yet) moves each
    layer by ``κτ₀‖w_l‖`` (``initial_step`` τ₀, a relative trust region instead of a
    ``‖w‖``-sized jump); the rate rises by at most ``rate_growth`` per step but falls at
    once; a layer without a usable estimate (it did not move, or ``Ĉ ≤ 0``) keeps its
    previous rate. Excluded layers (biases, norms) are not decayed and take the median rate
    of the adapted layers (with their own projection).

    **Heavy ball** (``model_step=False`` with a real curvature): ``η r_l`` (same safeguarded
    rate) is the model's step along ``h`` itself and momentum accumulates it, ``v ← μv + η r_l h``,
    ``w ← w − v``, with the trust region on the whole step (``‖v‖ ≤ τ_max‖w‖``: μ and ``η r``
    shrink together). Better at 32× the small batch on ``bench/large_batch.py`` (test accuracy
    96.9 vs 95.6 on the digits CNN, 76.9 vs 76.4 on MiniLM, at its default lr 1 where the
    projected step needed lr 3), but less stable at a constant LR on small noisy batches: on
    the MLP/transformer of ``tests/optim/test_defaults_train.py`` over 4 seeds it reached
    0.32–0.39 / 0.12–0.49 of the initial loss (MCLR up to 0.68, a fail) where the projected step
    reaches 0.07–0.10 on the MLP and ≤ 0.01 on the transformer (4 seeds); so it is an
    option, and the main job's choice, not the default.

    **LARS's plain step** (``curvature="weight_ratio"``, ``model_step`` False by default): the
    LARS rule ``λ_l = clip(κ / (Ĉ_l + ε))`` (1 for excluded layers), heavy ball with the step
    inside the buffer, ``v ← μv + ηλ_l h``, ``w ← w − v`` (or Adam: ``w ← w − ηλ_l d``). With
    the defaults (κ = 0.001) CBLR *is* LARS: same hyperparameter names and defaults, same
    numbers.

    **State.** Along (non-Nesterov) momentum the Rayleigh secant needs no copies of
    ``w_{t-1}``, ``h_{t-1}``: the last move is a multiple of the buffer (see
    :meth:`_implicit_history`), so the default keeps one parameter-sized buffer, as LARS does.
    Nesterov, ``curvature="secant"`` and ``direction="adam"`` keep the two copies.

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
        trust_coefficient: κ > 0; None picks 1.0 for a real curvature (the model's own step)
            and 0.001 for LARS's weight-ratio rule.
        eps: ε ≥ 0 in the rate's denominator.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        trust_clip: ``(lo, hi)`` bounds on λ (so on ``η_l/η``), or None.
        curvature: ``"rayleigh"`` (default), ``"secant"``, ``"hvp"`` or ``"weight_ratio"``.
        curvature_ema: ρ ∈ [0, 1); None picks 0.9 for ``rayleigh``/``secant``/``hvp``
            (noisy) and 0 for ``weight_ratio`` (a closed form of the current weights).
        model_step: take the quadratic model's step along the direction (see above); None
            picks True for ``rayleigh``/``secant``/``hvp`` and False (LARS) for ``weight_ratio``;
            False with a real curvature is the heavy-ball form.
        initial_step: τ₀ > 0, the first step's relative size ``‖Δw_l‖/‖w_l‖`` (model step).
        rate_growth: the most a layer's rate may rise per step (≥ 1; model step).
        hvp_interval: with ``curvature="hvp"``, re-estimate every this many steps (the EMA
            carries the estimate in between).
        hvp_delta: relative probe size δ for the ``hvp`` finite difference.
        direction: ``"momentum"`` or ``"adam"``; ``betas`` and ``adam_eps`` for the latter.
        exclude: which parameters are not adapted and not decayed (default: ``ndim <= 1``);
            a regex or list of regexes on names, a predicate ``(name, p) -> bool``, or False.
        layer_grouping: ``"tensor"`` (one layer per parameter), ``"module"`` (adapted
            parameters of one module share a layer), or a callable name -> layer key.
        on_nonfinite: ``"skip"`` (default: warn, leave all state untouched) or ``"raise"``.
        maximize, foreach: as in ``torch.optim`` (see :class:`lbopt.LayerwiseOptimizer`).

    Defaults were chosen on the large-batch benchmark (``bench/large_batch.py``; numbers in
    the README and ``bench/results/large_batch.md``).

    Reference: W. Gao, L. Zhong, "Curvature-based learning rate for large-batch training"
    (2020); J. Barzilai, J. Borwein, "Two-point step size gradient methods" (1988);
    Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional Networks" (2017).
    """

    uses_median: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float | None = None,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: tuple[float, float] | None = None,
        *,
        curvature: str = "rayleigh",
        curvature_ema: float | None = None,
        model_step: bool | None = None,
        initial_step: float = 1e-2,
        rate_growth: float = 2.0,
        max_update: float | None = 0.1,
        hvp_interval: int = 10,
        hvp_delta: float = 1e-3,
        direction: str = "momentum",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        exclude: ExcludeSpec = None,
        layer_grouping: LayerGrouping = "tensor",
        on_nonfinite: str = "skip",
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if curvature not in CURVATURE_ESTIMATORS:
            raise ValueError(f"Invalid curvature: {curvature!r}; expected one of {CURVATURE_ESTIMATORS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"Invalid direction: {direction!r}; expected one of {DIRECTIONS}")
        if model_step is None:
            model_step = curvature != "weight_ratio"
        if trust_coefficient is None:  # LARS's rule keeps LARS's κ; a real curvature means the model's step
            trust_coefficient = 0.001 if curvature == "weight_ratio" and not model_step else 1.0
        check_range("lr", lr, tensor_ok=True)
        check_range("momentum", momentum, 0.0, 1.0)
        if momentum >= 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r}; expected a number in [0, 1)")
        check_range("weight_decay", weight_decay, 0.0, float("inf"))
        check_range("trust_coefficient", trust_coefficient, 0.0, float("inf"), lo_open=True)
        check_range("eps", eps, 0.0, float("inf"))
        check_clip("trust_clip", trust_clip)
        check_range("initial_step", initial_step, 0.0, float("inf"), lo_open=True)
        check_range("rate_growth", rate_growth, 1.0, float("inf"))
        if max_update is not None:
            check_range("max_update", max_update, 0.0, float("inf"), lo_open=True)
        if nesterov and momentum <= 0:
            raise ValueError("Invalid nesterov=True with momentum=0; Nesterov needs momentum > 0")
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
        self.model_step = bool(model_step)
        self.initial_step = float(initial_step)
        self.rate_growth = float(rate_growth)
        self.max_update = None if max_update is None else float(max_update)
        # Excluded layers take the median rate of the adapted ones (model step): that spans groups,
        # so engine adapters must hand every group to one step() call.
        self.needs_all_groups = self.model_step or self.uses_median
        self.hvp_interval = hvp_interval
        self.hvp_delta = float(hvp_delta)
        self._hvp_calls = 0
        self.direction = direction
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, nesterov=nesterov, trust_clip=trust_clip, betas=tuple(betas), adam_eps=adam_eps,
        )
        super().__init__(
            params, defaults, exclude=exclude, layer_grouping=layer_grouping, on_nonfinite=on_nonfinite,
            maximize=maximize, foreach=foreach,
        )

    def _config(self) -> dict[str, Any]:
        """Adds the estimator and the step's form: a secant state does not load into a weight-ratio CBLR."""
        return {
            **super()._config(), "curvature": self.curvature, "direction": self.direction,
            "model_step": self.model_step, "curvature_ema": self.curvature_ema,
        }

    # ------------------------------------------------------------------ statistics
    def _gather(self, plan: StepPlan, params, grads, wd_seg: list[float]) -> dict[str, torch.Tensor] | None:
        """All per-layer sums of the step in one all-reduce; None when the step must be skipped.

        Always ``w2`` = ‖w‖², ``g2`` = ‖g‖²; with the history estimators ``dh2`` = ‖Δh‖²,
        ``dhdw`` = ⟨Δh, Δw⟩, ``dw2`` = ‖Δw‖²; with the model step along momentum ``gm`` =
        ⟨g, m⟩, ``mm`` = ‖m‖² (and ``gw``, ``wm`` under weight decay), from which the new
        direction's ``⟨h, d⟩`` and ``‖d‖²`` follow in closed form; ``count`` last.
        """
        layout = plan.layout
        named: list[tuple[str, Quantity]] = [("w2", sq_norm(params)), ("g2", sq_norm(grads))]
        if self.direction == "momentum" and (self.model_step or self.curvature != "weight_ratio"):
            # Read, not create: the non-finite guard below must find the state untouched.
            held = [self.state[t].get("momentum_buffer") if t in self.state else None for t in layout.tensors]
            bufs = layout.views([torch.zeros_like(t) if b is None else b for t, b in zip(layout.tensors, held)])
            named += [("gm", dot(grads, bufs)), ("mm", sq_norm(bufs))]
            if any(wd_seg):
                named += [("gw", dot(grads, params)), ("wm", dot(params, bufs))]
        if self.curvature in _HISTORY:
            history = [t in self.state and "prev_param" in self.state[t] for t in layout.tensors]
            known = [i for i, s in enumerate(layout.segments) if history[s.tensor]]
            named += zip(("dh2", "dhdw", "dw2"), self._secant_quantities(layout, known, params, grads, wd_seg))
        sums = plan.stats.sums([q for _, q in named])
        out = {name: sums[i] for i, (name, _) in enumerate(named)}
        out["count"] = sums[-1]
        present = out["count"] > 0
        if self.nonfinite(torch.where(present, out["g2"], 0.0)):
            return None
        return out

    def _secant_quantities(self, layout, known: list[int], params, grads, wd_seg) -> list[Quantity]:
        """``‖Δh‖²``, ``⟨Δh, Δw⟩`` and ``‖Δw‖²`` over the ``known`` segments, in two reusable workspaces.

        Nothing in the optimizer state changes here (the non-finite guard has not run yet).
        """
        if not known:
            return [sq_norm([], known)] * 3
        def work(slot: str) -> list[torch.Tensor]:
            return [
                segment_view(self.workspace(layout.tensors[layout.segments[i].tensor], slot), layout.segments[i])
                .view_as(params[i])
                for i in known
            ]
        dh, dw = work("secant_dh"), work("secant_dw")
        torch._foreach_copy_(dh, [grads[i] for i in known])
        add_scaled_(dh, [params[i] for i in known], [wd_seg[i] for i in known])
        torch._foreach_sub_(dh, [self._history_view(layout, i, "prev_grad") for i in known])
        torch._foreach_copy_(dw, [params[i] for i in known])
        torch._foreach_sub_(dw, [self._history_view(layout, i, "prev_param") for i in known])
        return [sq_norm(dh, known), Quantity(dh, dw, known), sq_norm(dw, known)]

    def _remember(self, layout, params, grads, wd_seg) -> None:
        """Keep ``w_t`` and ``h_t`` for the next secant (after the guard: no NaN gets in)."""
        torch._foreach_copy_(layout.views([self.buffer(t, "prev_param") for t in layout.tensors]), params)
        prev_h = layout.views([self.buffer(t, "prev_grad") for t in layout.tensors])
        torch._foreach_copy_(prev_h, grads)
        add_scaled_(prev_h, params, wd_seg)

    def _estimate(self, plan: StepPlan, params, sums: dict[str, torch.Tensor], wd_l: torch.Tensor):
        """``(Ĉ_l, fallback_l)``: the averaged curvature (NaN where unusable) and the first-step one."""
        present = sums["count"] > 0
        w_norm, g_norm = sums["w2"].sqrt(), sums["g2"].sqrt()
        ratio = weight_ratio_curvature(w_norm, g_norm, wd_l)
        if self.curvature == "weight_ratio":
            num, den = ratio, torch.ones_like(ratio)
        elif self.curvature == "secant":
            num, den = sums["dh2"].sqrt(), sums["dw2"].sqrt()
        elif self.curvature == "rayleigh":
            num, den = sums["dhdw"], sums["dw2"]
        else:
            num = self._hvp_curvature(plan.layout, params, g_norm, present)
            den = torch.ones_like(num)
        if self.curvature == "weight_ratio" and self.curvature_ema == 0.0:
            curvature = ratio
        else:
            n_ema, d_ema, has = self._ratio_state(ratio.device)
            n_ema, d_ema, has = ratio_ema_update(n_ema, d_ema, has, num, den, self.curvature_ema, present)
            self.layer_state.update(curvature_num=n_ema, curvature_den=d_ema, has_curvature=has)
            ok = has & (d_ema > 0)
            curvature = torch.where(ok, n_ema / torch.where(ok, d_ema, 1.0), torch.nan)
        usable = torch.isfinite(curvature) & (curvature > 0)
        curvature = torch.where(usable, curvature, torch.nan)
        self.layer_state["curvature"] = torch.where(present, curvature, self.layer_state.get(
            "curvature", torch.full_like(curvature, float("nan"))).to(curvature.device))
        lars = self.curvature == "weight_ratio" and not self.model_step
        fallback = ratio if lars else ratio / self.initial_step
        return curvature, fallback

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
                "curvature='rayleigh' (the default), which is exact on partitions"
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
            dot_ = sum(float(torch.dot((probe[i] - grads[i]).reshape(-1).double(), grads[i].reshape(-1).double()))
                       for i in segs)
            estimate[layer] = dot_ / (float(g_norm[layer]) * delta)
        # The closure may have zeroed the step's gradient tensors in place or replaced them.
        for t, grad, copy in zip(layout.tensors, held, saved):
            grad.copy_(copy)
            t.grad = grad
        return estimate

    def _history_view(self, layout, segment: int, name: str) -> torch.Tensor:
        seg = layout.segments[segment]
        return segment_view(self.state[layout.tensors[seg.tensor]][name], seg)

    def _ratio_state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.table.num_layers
        num = self.layer_state.get("curvature_num")
        if num is None or num.numel() != n:
            nan = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
            none = torch.zeros(n, dtype=torch.bool, device=device)
            self.layer_state.update(curvature_num=nan, curvature_den=nan.clone(), has_curvature=none)
        ls = self.layer_state
        return ls["curvature_num"].to(device), ls["curvature_den"].to(device), ls["has_curvature"].to(device)

    # ------------------------------------------------------------------ rates
    def _plain_factors(self, curvature: torch.Tensor, fallback: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """LARS's rule: ``λ_l = clip(κ / (Ĉ_l + ε))`` where adapted (the fallback until Ĉ exists), 1 elsewhere."""
        dev = curvature.device
        used = torch.where(torch.isnan(curvature), fallback, curvature)
        adapt = self.layer_mask("adapt", dev)
        if self.uses_median:
            used = median_of(used, adapt & present).expand_as(used)
        kappa = self.layer_hparam("trust_coefficient", dev, default=1.0)
        rate = curvature_rate(used, kappa, self.layer_hparam("eps", dev), self.trust_clip())
        return torch.where(adapt, rate, torch.ones_like(rate))

    def _model_rates(self, curvature: torch.Tensor, fallback: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``r_l``: κ/(Ĉ_l + ε), growth-limited; the previous rate without an estimate; the first step's without one."""
        dev = curvature.device
        adapt = self.layer_mask("adapt", dev)
        kappa = self.layer_hparam("trust_coefficient", dev, default=1.0)
        eps = self.layer_hparam("eps", dev)
        if self.uses_median:
            curvature = median_of(curvature, adapt & present).expand_as(curvature)
            fallback = median_of(fallback, adapt & present).expand_as(fallback)
        prev = self.layer_state.get("rate")
        if prev is None or prev.numel() != curvature.numel():
            prev = torch.full_like(curvature, float("nan"))
        prev = prev.to(dev)
        has_prev = torch.isfinite(prev) & (prev > 0)
        model = limit_growth(kappa / (curvature + eps), prev, self.rate_growth)
        first = kappa / (fallback + eps)
        rate = torch.where(torch.isfinite(curvature), model, torch.where(has_prev, prev, first))
        rate = torch.where(torch.isfinite(rate) & (rate > 0), rate, torch.nan)
        # Excluded layers (biases, norms), and layers with no rate at all (zero weights on the
        # first step), borrow the median rate of the adapted ones.
        shared = median_of(rate, adapt & present).expand_as(rate)
        rate = torch.where(adapt & torch.isfinite(rate), rate, shared)
        self.layer_state["rate"] = torch.where(present & torch.isfinite(rate), rate, prev)
        return torch.where(torch.isfinite(rate), rate, torch.zeros_like(rate))

    def _clip(self, factors: torch.Tensor, sums: dict[str, torch.Tensor], d_sq: torch.Tensor,
              lr_l: torch.Tensor) -> torch.Tensor:
        """``trust_clip`` bounds, then the relative trust region ``η λ_l ‖d_l‖ ≤ τ_max ‖w_l‖``."""
        clip = self.trust_clip()
        if clip is not None:
            factors = factors.clamp(clip[0], clip[1])
        if self.max_update is not None:
            w_norm, d_norm = sums["w2"].sqrt(), d_sq.clamp(min=0).sqrt()
            ok = (w_norm > 0) & (d_norm > 0) & (lr_l > 0)
            cap = self.max_update * w_norm / torch.where(ok, lr_l * d_norm, 1.0)
            factors = torch.where(ok, torch.minimum(factors, cap), factors)
        return factors

    # ------------------------------------------------------------------ the two-phase step
    # Momentum direction with the rayleigh / secant / weight_ratio estimators: phase 1 reads
    # every array once for all sums (one all-reduce) and computes the rates without changing
    # state; ``step()`` takes the finiteness flag, the per-layer step sizes and μ to the host
    # in one transfer; phase 2 applies the update and records the secant history in one more
    # sweep. ``hvp`` (closure probes) and the Adam direction (its moments must change before
    # its projection) use ``_step`` below.
    def _statistics(self, plan: StepPlan) -> StepStatistics | None:
        if self.curvature == "hvp" or self.direction != "momentum":
            return None
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        dev = plan.stats.device
        wd_seg = self.seg_weight_decay(plan)
        wd_l = self.layer_weight_decay(dev)
        implicit = self._implicit_history()
        sums = self._swept_sums(plan, params, grads, wd_seg, implicit)
        present = sums["count"] > 0
        before = dict(self.layer_state)  # phase 1 computes the new per-layer state, phase 2 commits it
        if implicit:
            self._implicit_secant(sums, wd_l)
        curvature, fallback = self._estimate(plan, params, sums, wd_l)
        lr_l = self.layer_hparam("lr", dev)
        if self.model_step:
            rates = self._model_rates(curvature, fallback, present)
            h_dot_d, d_sq, mu = self._momentum_projection(sums, wd_l)
            step_l = lr_l * self._clip(rates * self._projection(h_dot_d, d_sq, present), sums, d_sq, lr_l)
            logged = dict(lr=step_l, curvature=curvature, rate=rates)
            # w' − w = −step·m' and ⟨h, m'⟩ = h_dot_d (no Nesterov on this path)
            self._remember_move(present, step_l, h_dot_d, implicit)
        elif self.curvature != "weight_ratio":
            step_l, mu, rates = self._heavy_ball_rates(sums, curvature, fallback, present, lr_l, wd_l)
            logged = dict(lr=step_l, curvature=curvature, rate=rates)
            hh, hb = self._h_sums(sums, wd_l)  # w' − w = −v' and ⟨h, v'⟩ = μ⟨h, v⟩ + η r ‖h‖²
            self._remember_move(present, torch.ones_like(step_l), mu * hb + step_l * hh, implicit)
        else:
            step_l = lr_l * self._plain_factors(curvature, fallback, present)
            mu = self.layer_hparam("momentum", dev)
            logged = dict(lr=step_l, curvature=torch.where(torch.isnan(curvature), fallback, curvature))
        after, self.layer_state = self.layer_state, before
        return StepStatistics(
            guard=torch.where(present, sums["g2"], 0.0),
            to_host=torch.cat([step_l, mu]),
            values=dict(params=params, grads=grads, wd_seg=wd_seg, present=present, logged=logged, layer_state=after),
        )

    def _update(self, plan: StepPlan, stats: StepStatistics, host: list[float]) -> None:
        v = stats.values
        layout = plan.layout
        self.layer_state = v["layer_state"]
        self._bump_step()
        self.record_layer_stats(v["present"], **v["logged"])
        n = self.table.num_layers
        step_sizes = [host[layer] for layer in plan.seg_layer]
        mu = [host[n + layer] for layer in plan.seg_layer]
        nesterov = [bool(x) for x in self.seg_hparam(plan, "nesterov")]
        bufs = layout.views([self.buffer(t, "momentum_buffer") for t in layout.tensors])
        history = None
        if self.curvature in _HISTORY and not self._implicit_history():
            history = (layout.views([self.buffer(t, "prev_param") for t in layout.tensors]),
                       layout.views([self.buffer(t, "prev_grad") for t in layout.tensors]))
        elif layout.tensors and "prev_param" in self.state.get(layout.tensors[0], {}):
            for t in layout.tensors:  # copies kept by an explicit-history step (or an older checkpoint)
                self.state[t].pop("prev_param", None)
                self.state[t].pop("prev_grad", None)
        sweep = projected_heavy_ball_ if self.model_step else heavy_ball_
        sweep(v["params"], v["grads"], bufs, step_sizes, v["wd_seg"], mu, nesterov, history=history,
              block=self._block(layout))

    @staticmethod
    def _block(layout) -> int | None:
        on_cpu = bool(layout.tensors) and layout.tensors[0].device.type == "cpu"
        return CPU_BLOCK if on_cpu else None

    def _swept_sums(self, plan: StepPlan, params, grads, wd_seg: list[float],
                    implicit: bool = False) -> dict[str, torch.Tensor]:
        """The sums of :meth:`_gather` from one read of every array (:func:`lbopt.rules.sweeps.layer_sums`).

        ``implicit``: the Rayleigh quantities come from :meth:`_implicit_secant` instead of copies of
        ``w_{t-1}`` and ``h_{t-1}``, so the sweep reads only ``w``, ``g`` and the momentum buffer.
        """
        layout = plan.layout

        def held(name: str) -> list[torch.Tensor | None]:
            out = []
            for seg in layout.segments:
                t = layout.tensors[seg.tensor]
                buf = self.state[t].get(name) if t in self.state else None
                out.append(None if buf is None else segment_view(buf, seg))
            return out

        bufs = held("momentum_buffer") if self.model_step or self.curvature != "weight_ratio" else None
        history = (held("prev_param"), held("prev_grad")) if self.curvature in _HISTORY and not implicit else None
        per_seg = layer_sums(params, grads, wd_seg, bufs, history, with_decay_dots=bufs is not None and any(wd_seg),
                             block=self._block(layout))
        names = list(per_seg)
        sums = plan.stats.sums([Quantity((), values=per_seg[k]) for k in names])
        out = {k: sums[i] for i, k in enumerate(names)}
        out["count"] = sums[-1]
        return out

    # ------------------------------------------------------------------ the one-phase step
    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        dev = plan.stats.device
        wd_l = self.layer_weight_decay(dev)
        wd_seg = plan.seg_values(wd_l)
        sums = self._gather(plan, params, grads, wd_seg)
        if sums is None:
            return
        present = sums["count"] > 0
        curvature, fallback = self._estimate(plan, params, sums, wd_l)
        if self.curvature in _HISTORY:
            self._remember(layout, params, grads, wd_seg)
        lr_l = self.layer_hparam("lr", dev)
        self._bump_step()
        if not self.model_step and self.curvature != "weight_ratio":
            self._heavy_ball(plan, params, grads, sums, curvature, fallback, present, lr_l, wd_l, wd_seg)
            return
        if not self.model_step:
            factors = self._plain_factors(curvature, fallback, present)
            self.record_layer_stats(present, lr=lr_l * factors, curvature=torch.where(
                torch.isnan(curvature), fallback, curvature))
            self._plain_update(plan, params, grads, plan.seg_values(lr_l * factors), wd_seg)
            return
        rates = self._model_rates(curvature, fallback, present)
        if self.direction == "momentum":
            h_dot_d, d_sq, mu = self._momentum_projection(sums, wd_l)
            factors = self._clip(rates * self._projection(h_dot_d, d_sq, present), sums, d_sq, lr_l)
            self.record_layer_stats(present, lr=lr_l * factors, curvature=curvature, rate=rates)
            projected_heavy_ball_(
                params, grads, layout.views([self.buffer(t, "momentum_buffer") for t in layout.tensors]),
                plan.seg_values(lr_l * factors), wd_seg, plan.seg_values(mu),
                [bool(v) for v in plan.seg_values(self.layer_hparam("nesterov", dev))], block=self._block(layout),
            )
        else:
            d = self.adam_direction(plan, grads, "adam_eps", params, wd_seg)
            quantities = [dot(grads, d), sq_norm(d)] + ([dot(params, d)] if any(wd_seg) else [])
            more = plan.stats.sums(quantities, with_count=False)
            h_dot_d = more[0] + (wd_l * more[2] if any(wd_seg) else 0.0)
            factors = self._clip(rates * self._projection(h_dot_d, more[1], present), sums, more[1], lr_l)
            self.record_layer_stats(present, lr=lr_l * factors, curvature=curvature, rate=rates)
            descend(params, d, plan.seg_values(lr_l * factors))

    def _heavy_ball(self, plan, params, grads, sums, curvature, fallback, present, lr_l, wd_l, wd_seg) -> None:
        """Heavy ball with the curvature rate: ``v ← μv + η r h``, ``w ← w − v``, ``r = κ/Ĉ`` (safeguarded).

        ``η r`` is the quadratic model's step along ``h``; momentum accumulates it, which the
        model tolerates up to ``η r < 2(1 + μ)/C``. Trust region on the whole step:
        where ``‖v'‖ > τ_max‖w‖`` both ``μ`` and ``η r`` shrink by the same factor, so the
        buffer itself is bounded (``‖v'‖² = μ²‖v‖² + 2μηr⟨h, v⟩ + (ηr)²‖h‖²`` from the sums).
        """
        layout = plan.layout
        dev = lr_l.device
        alpha, mu, rates = self._heavy_ball_rates(sums, curvature, fallback, present, lr_l, wd_l)
        self.record_layer_stats(present, lr=alpha, curvature=curvature, rate=rates)
        heavy_ball_(
            params, grads, layout.views([self.buffer(t, "momentum_buffer") for t in layout.tensors]),
            plan.seg_values(alpha), wd_seg, plan.seg_values(mu),
            [bool(v) for v in plan.seg_values(self.layer_hparam("nesterov", dev))], block=self._block(layout),
        )

    def _heavy_ball_rates(self, sums, curvature, fallback, present, lr_l, wd_l):
        """``(η r_l, μ_l, r_l)`` of :meth:`_heavy_ball`, after the whole-step trust region."""
        dev = lr_l.device
        rates = self._model_rates(curvature, fallback, present)
        clip = self.trust_clip()
        if clip is not None:
            rates = rates.clamp(clip[0], clip[1])
        mu = self.layer_hparam("momentum", dev)
        alpha = lr_l * rates
        hh, hv = self._h_sums(sums, wd_l)
        if self.max_update is not None:
            v_new = (mu**2 * sums["mm"] + 2 * mu * alpha * hv + alpha**2 * hh).clamp(min=0).sqrt()
            w_norm = sums["w2"].sqrt()
            ok = (w_norm > 0) & (v_new > 0)
            shrink = torch.where(ok, (self.max_update * w_norm / torch.where(ok, v_new, 1.0)).clamp(max=1.0), 1.0)
            alpha, mu = alpha * shrink, mu * shrink
        return alpha, mu, rates

    def _implicit_history(self) -> bool:
        """Whether the Rayleigh secant can do without copies of ``w_{t-1}`` and ``h_{t-1}``.

        Along (non-Nesterov) momentum the last move is a multiple of the momentum buffer,
        ``Δw = −σ b`` (model step: ``σ`` = the step size, ``b = m``; heavy ball: ``σ = 1``,
        ``b = v``), so with ``q = ⟨h_{t-1}, b⟩`` remembered from the last step::

            ⟨Δh, Δw⟩ = −σ (⟨h_t, b⟩ − q),   ‖Δw‖² = σ² ‖b‖²

        from sums the step computes anyway: two numbers per layer replace two parameter-sized
        copies (memory ``1×`` the parameters instead of ``3×``, and two fewer arrays in each
        sweep). Nesterov's move also holds ``h_{t-1}``, so it and the one-phase paths (Adam
        direction, ``hvp``) keep the copies. This assumes that only this optimizer moves the
        weights between its steps (as any momentum method does).
        """
        return (self.curvature == "rayleigh" and self.direction == "momentum"
                and not any(g["nesterov"] for g in self.param_groups))

    def _implicit_secant(self, sums: dict[str, torch.Tensor], wd_l: torch.Tensor) -> None:
        """Adds ``dhdw`` = ⟨Δh, Δw⟩ and ``dw2`` = ‖Δw‖² (0 without a last move) to ``sums``.

        See :meth:`_implicit_history`.
        """
        n = sums["w2"].numel()
        scale, dot_ = self.layer_state.get("move_scale"), self.layer_state.get("move_dot")
        if scale is None or scale.numel() != n:
            scale = dot_ = torch.full((n,), float("nan"), dtype=torch.float64, device=sums["w2"].device)
        scale, dot_ = scale.to(sums["w2"].device), dot_.to(sums["w2"].device)
        known = torch.isfinite(scale) & torch.isfinite(dot_)
        scale, dot_ = torch.where(known, scale, 0.0), torch.where(known, dot_, 0.0)
        _, hb = self._h_sums(sums, wd_l)
        sums["dhdw"] = -scale * (hb - dot_)
        sums["dw2"] = scale.square() * sums["mm"]

    def _remember_move(self, present: torch.Tensor, scale: torch.Tensor, dot_: torch.Tensor, implicit: bool) -> None:
        """Keeps ``σ`` and ``q = ⟨h_t, b_{t+1}⟩`` of this step's move for the next :meth:`_implicit_secant`.

        Layers not in this step keep theirs (their weights and buffers did not move); after an
        explicit-history step there is no valid last move.
        """
        nan = torch.full_like(scale, float("nan"), dtype=torch.float64)
        if not implicit:
            self.layer_state.update(move_scale=nan, move_dot=nan.clone())
            return
        old_s, old_q = self.layer_state.get("move_scale"), self.layer_state.get("move_dot")
        if old_s is None or old_s.numel() != scale.numel():
            old_s, old_q = nan, nan
        self.layer_state["move_scale"] = torch.where(present, scale.to(torch.float64), old_s.to(scale.device))
        self.layer_state["move_dot"] = torch.where(present, dot_.to(torch.float64), old_q.to(scale.device))

    @staticmethod
    def _h_sums(sums: dict[str, torch.Tensor], wd_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(‖h‖², ⟨h, b⟩)`` with ``h = g + βw`` and ``b`` the momentum buffer held before this step."""
        hh, hb = sums["g2"], sums["gm"]
        if "gw" in sums:
            hh = hh + 2 * wd_l * sums["gw"] + wd_l**2 * sums["w2"]
            hb = hb + wd_l * sums["wm"]
        return hh, hb

    def _momentum_projection(self, sums: dict[str, torch.Tensor], wd_l: torch.Tensor):
        """``⟨h, d⟩``, ``‖d‖²`` of the new momentum direction (from the old buffer's sums) and the μ used.

        ``h = g + βw``, ``m' = μm + h``: ``⟨h, m'⟩ = μ⟨h, m⟩ + ‖h‖²`` and
        ``‖m'‖² = μ²‖m‖² + 2μ⟨h, m⟩ + ‖h‖²``; Nesterov's ``d = h + μm'`` likewise.
        Adaptive restart (O'Donoghue & Candès 2015): where the new buffer no longer
        descends (``⟨h, m'⟩ ≤ 0``, momentum carried past a minimum) the layer drops its
        momentum for this step (μ = 0, ``m' = h``) instead of standing still.
        """
        dev = wd_l.device
        mu = self.layer_hparam("momentum", dev)
        hh, hm = self._h_sums(sums, wd_l)
        mu = torch.where(mu * hm + hh > 0, mu, torch.zeros_like(mu))
        h_m = mu * hm + hh
        m_m = mu**2 * sums["mm"] + 2 * mu * hm + hh
        nest = self.layer_hparam("nesterov", dev) > 0
        h_d = torch.where(nest, hh + mu * h_m, h_m)
        d_d = torch.where(nest, hh + 2 * mu * h_m + mu**2 * m_m, m_m)
        return h_d, d_d, mu

    def _projection(self, h_dot_d: torch.Tensor, d_sq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Per-layer ``max(⟨h,d⟩,0)/‖d‖²``; MCLR pools all layers into one projection (one rate)."""
        if self.uses_median:
            zero = torch.zeros_like(h_dot_d)  # masked sums without boolean indexing (no host sync)
            pooled = model_projection(torch.where(present, h_dot_d, zero).sum(), torch.where(present, d_sq, zero).sum())
            return pooled.expand_as(h_dot_d)
        return model_projection(h_dot_d, d_sq)

    def _plain_update(self, plan: StepPlan, params, grads, step_sizes, wd_seg) -> None:
        layout = plan.layout
        dev = plan.stats.device
        if self.direction == "momentum":
            bufs = layout.views([self.buffer(t, "momentum_buffer") for t in layout.tensors])
            heavy_ball_(
                params, grads, bufs, step_sizes, wd_seg,
                plan.seg_values(self.layer_hparam("momentum", dev)),
                [bool(v) for v in plan.seg_values(self.layer_hparam("nesterov", dev))], block=self._block(layout),
            )
        else:
            descend(params, self.adam_direction(plan, grads, "adam_eps", params, wd_seg), step_sizes)


class MCLR(CBLR):
    r"""Median-curvature learning rate: one rate for the whole model.

    The per-layer estimates ``Ĉ_l`` are those of :class:`CBLR`. With the model step (the
    default) every layer moves along the full direction ``d`` with one step::

        r   = min(κ / (median_l Ĉ_l + ε), growth · r_prev)
        λ   = r · max(Σ_l ⟨h_l, d_l⟩, 0) / Σ_l ‖d_l‖²,   w ← w − η λ d

    (median over the adapted layers present in the step; the mean of the two middle values
    for an even count). With the plain step it is ``λ = clip(κ / (median_l Ĉ_l + ε))`` for
    adapted layers, 1 for excluded ones. Cheaper to tune and more robust to single-layer
    noise than CBLR; reported on a par with LARS (Gao & Zhong 2020). The median spans all
    parameter groups, so engine adapters hand MCLR every group in one ``step()`` call.
    """

    uses_median = True
    needs_all_groups = True
