"""AdaGrad, AdaGradNorm and their adaptive-batch versions AdAdaGrad / AdAdaGradNorm.

AdaGradNorm needs one global number per step, ``‖g_t‖²`` over *all* parameters and all
shards: it comes from the statistics engine (per-layer sums, one all-reduce when sharded),
so the step is the dense one under DDP and DeepSpeed ZeRO alike. AdaGrad is elementwise.
AdAdaGrad* add a :class:`lbopt.BatchSizeController` that the optimizer feeds with the same
global norms at every ``step()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from lbopt.batch.controller import BatchSizeController
from lbopt.optim.base import ExcludeSpec, LayerwiseOptimizer, StepPlan, check_range
from lbopt.stats import dot, sq_norm

__all__ = ["AdAdaGrad", "AdAdaGradNorm", "AdaGrad", "AdaGradNorm"]


def _check_common(lr: float, initial_accumulator_value: float, eps: float, weight_decay: float) -> None:
    check_range("lr", lr, 0.0, float("inf"))
    check_range("initial_accumulator_value", initial_accumulator_value, 0.0, float("inf"))
    check_range("eps", eps, 0.0, float("inf"))
    check_range("weight_decay", weight_decay, 0.0, float("inf"))


class _AdaGradBase(LayerwiseOptimizer):
    """Shared plumbing: L2 weight decay, the optional batch controller, its checkpointing."""

    batch_controller: BatchSizeController | None = None

    def _decayed_grads(self, plan: StepPlan, params, grads) -> tuple[list[torch.Tensor], bool]:
        dev = plan.stats.device
        wd_seg = plan.seg_values(self.layer_weight_decay(dev))
        if any(wd_seg):
            return torch._foreach_add(grads, torch._foreach_mul(params, wd_seg)), True
        return grads, False

    def _lr_seg(self, plan: StepPlan) -> list[float]:
        factor = self.batch_controller.lr_factor if self.batch_controller is not None else 1.0
        return plan.seg_values(self.layer_hparam("lr", plan.stats.device) * factor)

    def _feed_controller(self, grad_sq_norm: float, grad_sq_norm_metric: float | None = None) -> None:
        if self.batch_controller is not None:
            self.batch_controller.step(grad_sq_norm=grad_sq_norm, grad_sq_norm_metric=grad_sq_norm_metric)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.batch_controller is not None:
            sd["batch_controller"] = self.batch_controller.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ctrl = state_dict.pop("batch_controller", None)
        super().load_state_dict(state_dict)
        if ctrl is not None and self.batch_controller is not None:
            self.batch_controller.load_state_dict(ctrl)


class AdaGradNorm(_AdaGradBase):
    r"""AdaGrad-Norm: one adaptive step size from the global gradient norm.

    ::

        h_t   = g_t + β w_t                       (β: L2 weight decay, decayed layers only)
        b_t²  = b_{t−1}² + ‖h_t‖²                 (global: all layers, groups and shards)
        w_{t+1} = w_t − η h_t / (b_t + ε)

    ``b_0² = initial_accumulator_value``. ``‖h_t‖²`` is an exact global sum under any
    sharding (one small all-reduce under ZeRO), so the run equals the dense one. The norm
    spans all parameter groups (``needs_all_groups``); η may differ per group.

    Args:
        params: parameters, ``(name, param)`` pairs or param-group dicts.
        lr: η (per group; schedulers work). initial_accumulator_value: b_0² ≥ 0.
        eps: ε ≥ 0. weight_decay: β ≥ 0 (L2, added to the gradient).
        exclude: which parameters are not decayed (default: ``ndim <= 1``).
        on_nonfinite: ``"skip"`` (warn, leave state untouched) or ``"raise"``.

    Reference: R. Ward, X. Wu, L. Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes" (ICML 2019); M. Streeter, H. B. McMahan (2010).
    """

    needs_all_groups: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        exclude: ExcludeSpec = None,
        on_nonfinite: str = "skip",
    ) -> None:
        _check_common(lr, initial_accumulator_value, eps, weight_decay)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, exclude=exclude, on_nonfinite=on_nonfinite)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.layer_state["b_sq"] = torch.tensor(self.initial_accumulator_value, dtype=torch.float64)

    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        h, decayed = self._decayed_grads(plan, params, grads)
        sums = plan.stats.sums([sq_norm(grads)] + ([sq_norm(h)] if decayed else []))
        present = sums[-1] > 0
        if self.nonfinite(torch.where(present, sums[0], 0.0)):
            self._feed_controller(float("nan"))
            return
        g_sq = float(sums[0][present].sum())
        h_sq = float(sums[1][present].sum()) if decayed else g_sq
        b_sq = float(self.layer_state["b_sq"]) + h_sq
        self.layer_state["b_sq"] = torch.tensor(b_sq, dtype=torch.float64)
        self._bump_step()
        b = b_sq**0.5
        dev = plan.stats.device
        eps_l = self.layer_hparam("eps", dev)
        denom = plan.seg_values(b + eps_l)
        lr = self._lr_seg(plan)
        steps = [-a / d if d > 0 else 0.0 for a, d in zip(lr, denom)]
        self.record_layer_stats(present, lr=self.layer_hparam("lr", dev) / (b + eps_l))
        torch._foreach_add_(params, torch._foreach_mul(h, steps))
        self._feed_controller(g_sq)

    @property
    def accumulator(self) -> float:
        """``b_t²``."""
        return float(self.layer_state["b_sq"])


class AdaGrad(_AdaGradBase):
    r"""Coordinate-wise AdaGrad (Duchi, Hazan, Singer 2011), as ``torch.optim.Adagrad``.

    ::

        h_t = g_t + β w_t,   s_t = s_{t−1} + h_t²,   w_{t+1} = w_t − η h_t / (√s_t + ε)

    elementwise, ``s_0 = initial_accumulator_value``. Same numbers as ``torch.optim.Adagrad``
    (``lr_decay=0``) when weight decay is 0 or ``exclude=False``; by default biases and norm
    weights are not decayed. The accumulators are elementwise state, so they live on the
    local shard under ZeRO; the only global statistic is the non-finite guard.

    Args: as :class:`AdaGradNorm`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        exclude: ExcludeSpec = None,
        on_nonfinite: str = "skip",
    ) -> None:
        _check_common(lr, initial_accumulator_value, eps, weight_decay)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, exclude=exclude, on_nonfinite=on_nonfinite)
        self.initial_accumulator_value = float(initial_accumulator_value)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        state = self.state[tensor]
        if "sum" not in state:
            state["sum"] = torch.full_like(tensor, self.initial_accumulator_value, memory_format=torch.preserve_format)
        return state["sum"]

    def metric(self, param: torch.Tensor) -> torch.Tensor | None:
        """AdaGrad metric ``P = 1/(√s_{t−1} + ε)`` of a (dense) parameter; None if unknown."""
        if id(param) not in self._original_index:
            return None
        state = self.state.get(param)
        if state is None and any(id(k) not in self._original_index for k in self.state):
            return None  # accumulators live on engine partitions (ZeRO): no dense metric here
        eps = self.defaults["eps"]
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                eps = group["eps"]
                break
        if state is None or "sum" not in state:
            return torch.full_like(param, 1.0 / (self.initial_accumulator_value**0.5 + eps), dtype=torch.float32)
        return 1.0 / (state["sum"].float().sqrt() + eps)

    def _wants_metric(self) -> bool:
        c = self.batch_controller
        return c is not None and c.config.test == "coordinate"

    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        sums_q = [sq_norm(grads)]
        dev = plan.stats.device
        eps_seg = plan.seg_values(self.layer_hparam("eps", dev))
        sums_views = layout.views([self._sum(t) for t in layout.tensors])
        if self._wants_metric():
            denom = torch._foreach_sqrt(sums_views)
            torch._foreach_add_(denom, eps_seg)
            sums_q.append(dot(torch._foreach_div(grads, denom), grads))
        sums = plan.stats.sums(sums_q)
        present = sums[-1] > 0
        if self.nonfinite(torch.where(present, sums[0], 0.0)):
            self._feed_controller(float("nan"))
            return
        self._bump_step()
        h, decayed = self._decayed_grads(plan, params, grads)
        torch._foreach_addcmul_(sums_views, h, h)
        denom = torch._foreach_sqrt(sums_views)
        torch._foreach_add_(denom, eps_seg)
        lr = self._lr_seg(plan)
        torch._foreach_addcdiv_(params, h, denom, [-a for a in lr])
        self.record_layer_stats(present, lr=self.layer_hparam("lr", dev))
        g_sq = float(sums[0][present].sum())
        self._feed_controller(g_sq, float(sums[1][present].sum()) if len(sums_q) > 1 else None)


def _make_controller(
    opt: _AdaGradBase,
    batch_controller: BatchSizeController | bool | None,
    kwargs: dict[str, Any],
) -> BatchSizeController | None:
    if batch_controller is False:
        return None
    if isinstance(batch_controller, BatchSizeController):
        ctrl = batch_controller
    elif batch_controller is None or batch_controller is True:
        if kwargs.get("initial_batch_size") is None:
            raise ValueError(
                f"{type(opt).__name__} needs initial_batch_size (the global batch of the first step) to "
                "build its default BatchSizeController, e.g. initial_batch_size=64, max_batch_size=4096, "
                "micro_batch_size=32; or pass batch_controller=BatchSizeController(...), or "
                "batch_controller=False for plain AdaGrad"
            )
        kwargs = dict(kwargs)
        kwargs.setdefault("micro_batch_size", kwargs["initial_batch_size"])
        kwargs.setdefault("max_batch_size", kwargs["initial_batch_size"])
        ctrl = BatchSizeController(**kwargs)
    else:
        raise ValueError(
            f"Invalid batch_controller: {batch_controller!r}; expected None (build one), a "
            "BatchSizeController, or False"
        )
    ctrl.attach(opt.table.originals)  # type: ignore[attr-defined]
    return ctrl


class AdAdaGradNorm(AdaGradNorm):
    r"""AdaGradNorm with an adaptive batch size (Lau, Liu & Kolar 2024).

    The update is :class:`AdaGradNorm`'s, with η multiplied by the controller's
    ``lr_factor`` (1 unless ``lr_coupling`` is set). After each step the optimizer hands the
    global ``‖ḡ_t‖²`` (exact under any sharding) to ``self.batch_controller``, which runs its
    test (default: the norm test ``B ≥ Σ_j Var_j(∇f_i)/(η_b²‖ḡ‖²)``) and sets the global batch
    for the next step; engines read ``optimizer.batch_controller.batch_size`` (see
    :mod:`lbopt.integrations.adaptive_batch`). The controller watches the optimizer's
    parameters with gradient hooks (micro-batch variance estimator).

    Args:
        params, lr, initial_accumulator_value, eps, weight_decay, exclude, on_nonfinite:
            as :class:`AdaGradNorm`.
        batch_controller: a :class:`lbopt.BatchSizeController`, None (build one from the
            keyword arguments below) or False (none: plain AdaGradNorm).
        **controller_kwargs: ``initial_batch_size`` (required when building),
            ``max_batch_size`` (default: initial), ``micro_batch_size`` (default: initial),
            ``world_size``, ``test``, ``eta``, ``theta``, ``nu``, ``test_interval``,
            ``monotone``, ``lr_coupling``, ``estimator``: see :class:`lbopt.BatchSizeController`.

    Reference: T. T.-K. Lau, H. Liu, M. Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for
    Adaptive Gradient Methods" (arXiv:2402.11215, 2024).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        batch_controller: BatchSizeController | bool | None = None,
        exclude: ExcludeSpec = None,
        on_nonfinite: str = "skip",
        **controller_kwargs: Any,
    ) -> None:
        super().__init__(params, lr, initial_accumulator_value, eps, weight_decay,
                         exclude=exclude, on_nonfinite=on_nonfinite)
        self.batch_controller = _make_controller(self, batch_controller, controller_kwargs)


class AdAdaGrad(AdaGrad):
    r"""Coordinate-wise AdaGrad with an adaptive batch size (Lau, Liu & Kolar 2024).

    The update is :class:`AdaGrad`'s (η times the controller's ``lr_factor``). The
    controller's test defaults to the norm test; ``test="coordinate"`` runs it in the AdaGrad
    metric, ``B ≥ Σ_j P_j Var_j(∇f_i) / (η_b² Σ_j P_j ḡ_j²)`` with
    ``P_j = 1/(√s_{t−1,j} + ε)`` the preconditioner *before* this step's update (the
    optimizer provides ``P`` to the hooks and ``‖ḡ‖²_P`` from the statistics engine; the
    hook side needs dense parameters, i.e. not ZeRO partitions). Because the test statistic
    spans all groups, ``needs_all_groups`` is True.

    Args: as :class:`AdAdaGradNorm` (``lr`` default 1e-2).
    """

    needs_all_groups: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        batch_controller: BatchSizeController | bool | None = None,
        exclude: ExcludeSpec = None,
        on_nonfinite: str = "skip",
        **controller_kwargs: Any,
    ) -> None:
        super().__init__(params, lr, initial_accumulator_value, eps, weight_decay,
                         exclude=exclude, on_nonfinite=on_nonfinite)
        self.batch_controller = _make_controller(self, batch_controller, controller_kwargs)
        if self.batch_controller is not None and self.batch_controller.config.test == "coordinate":
            self.batch_controller.set_metric(self.metric)
