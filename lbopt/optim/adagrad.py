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
import torch.distributed as dist

from lbopt.batch.controller import BatchSizeController
from lbopt.layout import LayerTable, Layout
from lbopt.optim.base import ExcludeSpec, LayerwiseOptimizer, StepPlan, full_shape
from lbopt.stats import Quantity, dot, sq_norm
from lbopt.validation import check_range

__all__ = ["AdAdaGrad", "AdAdaGradNorm", "AdaGrad", "AdaGradNorm"]


def _check_common(lr: float, initial_accumulator_value: float, eps: float, weight_decay: float,
                  max_grad_norm: float | None = None) -> None:
    if max_grad_norm is not None:
        check_range("max_grad_norm", max_grad_norm, lo_open=True)
    check_range("lr", lr, tensor_ok=True)
    check_range("initial_accumulator_value", initial_accumulator_value)
    check_range("eps", eps)
    check_range("weight_decay", weight_decay)


def clip_coefficient(grad_sq_norm: float, max_grad_norm: float | None) -> float:
    """``min(1, C / (‖g‖ + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` (1 when ``C`` is None)."""
    if max_grad_norm is None:
        return 1.0
    return min(1.0, max_grad_norm / (grad_sq_norm**0.5 + 1e-6))


def dense_from_segments(table: LayerTable, layout: Layout, seg_views: list[torch.Tensor],
                        device: torch.device | None = None) -> list[torch.Tensor]:
    """Whole fp32 tensors, one per original parameter, assembled from per-segment values.

    Segment ``s`` writes elements ``[param_offset, param_offset + length)`` of parameter
    ``s.param``; elements no segment covers are 0. A sharded layout (ZeRO partitions) is
    completed by one all-reduce (SUM) of the concatenation over the layout's group: every
    element is held by exactly one rank, so the sum is the dense tensor on every rank.
    """
    numels = [r.numel for r in table.params]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    where = layout.comm_device or (seg_views[0].device if seg_views else torch.device("cpu"))
    flat = torch.zeros(offsets[-1], dtype=torch.float32, device=where)
    for seg, view in zip(layout.segments, seg_views):
        start = offsets[seg.param] + seg.param_offset
        flat[start:start + seg.length].copy_(view.reshape(-1))
    if layout.sharded:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=layout.process_group)
    if device is not None:
        flat = flat.to(device)
    shapes = [full_shape(p) for p in table.originals]  # type: ignore[attr-defined]
    return [flat[offsets[i]:offsets[i + 1]].view(shapes[i]) for i in range(len(table.params))]


def segments_of_dense(table: LayerTable, layout: Layout, dense: dict[int, torch.Tensor],
                      device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """Per-segment slices of whole per-parameter tensors ``{record index: tensor}`` (the inverse)."""
    views, segs = [], []
    for k, seg in enumerate(layout.segments):
        t = dense.get(seg.param)
        if t is not None:
            views.append(t.reshape(-1)[seg.param_offset:seg.param_offset + seg.length].to(device))
            segs.append(k)
    return views, segs


class _AdaGradBase(LayerwiseOptimizer):
    """Shared plumbing: L2 weight decay, clipping, the optional batch controller, its checkpointing.

    ``max_grad_norm`` (C): the *applied* gradient is ``g·min(1, C/‖g‖)`` with ``‖g‖`` the
    global norm over all layers and shards (exact under ZeRO), while the batch controller
    measures noise on the *unclipped* gradient (its micro-batch samples are unclipped, so
    their mean must be too). Engines must then not clip themselves (DeepSpeed
    ``gradient_clipping: 0``; :mod:`lbopt.integrations.adaptive_batch` checks).
    """

    batch_controller: BatchSizeController | None = None
    max_grad_norm: float | None = None

    def _decayed_grads(self, plan: StepPlan, params, grads) -> tuple[list[torch.Tensor], bool]:
        dev = plan.stats.device
        wd_seg = plan.seg_values(self.layer_weight_decay(dev))
        if any(wd_seg):
            return torch._foreach_add(grads, torch._foreach_mul(params, wd_seg)), True
        return grads, False

    def _lr_seg(self, plan: StepPlan) -> list[float]:
        factor = self.batch_controller.lr_factor if self.batch_controller is not None else 1.0
        return plan.seg_values(self.layer_hparam("lr", plan.stats.device) * factor)

    def _feed_controller(self, grad_sq_norm: float, grad_sq_norm_metric: float | None = None,
                         plan: StepPlan | None = None, grads: list[torch.Tensor] | None = None,
                         metric_square_sum: float | None = None) -> None:
        ctrl = self.batch_controller
        if ctrl is None:
            return
        direction = None
        if plan is not None and grads is not None and plan.layout.sharded and ctrl.wants_direction:
            direction = self._dense_direction(plan, grads)
        ctrl.step(grad_sq_norm=grad_sq_norm, grad_sq_norm_metric=grad_sq_norm_metric, direction=direction,
                  metric_square_sum=metric_square_sum)

    def _dense_direction(self, plan: StepPlan, grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """This step's mean gradient ḡ, whole, on every rank (the gather on test steps under ZeRO).

        The micro-batch hooks of the next test step take ``⟨h, ḡ⟩`` with whole micro-batch
        gradients ``h``, so each rank needs all of ḡ: one all-reduce of a model-sized fp32
        buffer, only before test steps of the inner-product tests.
        """
        ctrl = self.batch_controller
        dense = dense_from_segments(self.table, plan.layout, grads)
        by_id = {id(p): d for p, d in zip(self.table.originals, dense)}  # type: ignore[attr-defined]
        return [None if id(p) not in by_id else by_id[id(p)].to(p.device) for p in ctrl.params]  # type: ignore[union-attr]

    def _clip(self, grads: list[torch.Tensor], g_sq: float) -> list[torch.Tensor]:
        c = clip_coefficient(g_sq, self.max_grad_norm)
        return grads if c >= 1.0 else torch._foreach_mul(grads, c)

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
        max_grad_norm: C > 0 or None: the applied gradient is ``g·min(1, C/(‖g‖+1e-6))``
            (global norm, exact under ZeRO, as ``torch.nn.utils.clip_grad_norm_``); a batch
            controller still sees the unclipped gradient.
        maximize, foreach: as in ``torch.optim`` (see :class:`lbopt.optim.base.LayerwiseOptimizer`).

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
        max_grad_norm: float | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _check_common(lr, initial_accumulator_value, eps, weight_decay, max_grad_norm)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, exclude=exclude, on_nonfinite=on_nonfinite, maximize=maximize,
                         foreach=foreach)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.layer_state["b_sq"] = torch.tensor(self.initial_accumulator_value, dtype=torch.float64)

    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        dev = plan.stats.device
        wd_seg = plan.seg_values(self.layer_weight_decay(dev))
        decayed, clipping = any(wd_seg), self.max_grad_norm is not None
        quantities = [sq_norm(grads)]
        if decayed:
            bw = torch._foreach_mul(params, wd_seg)
            if clipping:  # ‖c·g + βw‖² = c²‖g‖² + 2c⟨g,βw⟩ + ‖βw‖², c known only after the reduce
                quantities += [dot(grads, bw), sq_norm(bw)]
            else:
                h = torch._foreach_add(grads, bw)
                quantities.append(sq_norm(h))
        sums = plan.stats.sums(quantities)
        present = sums[-1] > 0
        if self.nonfinite(torch.where(present, sums[0], 0.0)):
            self._feed_controller(float("nan"))
            return
        g_sq = float(sums[0][present].sum())
        c = clip_coefficient(g_sq, self.max_grad_norm)
        if decayed and clipping:
            cross, wsq = float(sums[1][present].sum()), float(sums[2][present].sum())
            h_sq = c * c * g_sq + 2 * c * cross + wsq
            h = torch._foreach_add(self._clip(grads, g_sq), bw)
        elif decayed:
            h_sq = float(sums[1][present].sum())
        else:
            h, h_sq = self._clip(grads, g_sq), c * c * g_sq if c < 1.0 else g_sq
        b_sq = float(self.layer_state["b_sq"]) + h_sq
        self.layer_state["b_sq"] = torch.tensor(b_sq, dtype=torch.float64)
        self._bump_step()
        b = b_sq**0.5
        eps_l = self.layer_hparam("eps", dev)
        denom = plan.seg_values(b + eps_l)
        lr = self._lr_seg(plan)
        steps = [-a / d if d > 0 else 0.0 for a, d in zip(lr, denom)]
        self.record_layer_stats(present, lr=self.layer_hparam("lr", dev) / (b + eps_l))
        torch._foreach_add_(params, torch._foreach_mul(h, steps))
        self._feed_controller(g_sq, plan=plan, grads=grads)

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
        max_grad_norm: float | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _check_common(lr, initial_accumulator_value, eps, weight_decay, max_grad_norm)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, exclude=exclude, on_nonfinite=on_nonfinite, maximize=maximize,
                         foreach=foreach)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)

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
        if state is None or "sum" not in state:  # s_0 everywhere: a constant (broadcast; no shape needed)
            return torch.full((), 1.0 / (self.initial_accumulator_value**0.5 + eps), dtype=torch.float32,
                              device=param.device)
        return 1.0 / (state["sum"].float().sqrt() + eps)

    def _wants_metric(self) -> bool:
        c = self.batch_controller
        return c is not None and c.config.test == "coordinate"

    def _step(self, plan: StepPlan) -> None:
        layout = plan.layout
        params = layout.views()
        grads = layout.views([t.grad for t in layout.tensors])
        quantities = [sq_norm(grads)]
        dev = plan.stats.device
        eps_seg = plan.seg_values(self.layer_hparam("eps", dev))
        sums_views = layout.views([self._sum(t) for t in layout.tensors])
        n_metric = n_square = 0
        if self._wants_metric():  # P = 1/(√s_{t−1}+ε), before this step's update
            metric = torch._foreach_sqrt(sums_views)
            torch._foreach_add_(metric, eps_seg)
            torch._foreach_reciprocal_(metric)
            quantities.append(dot(torch._foreach_mul(grads, metric), grads))
            n_metric = 1
            square = self._metric_square_quantity(plan, metric)
            if square is not None:
                quantities.append(square)
                n_square = 1
        sums = plan.stats.sums(quantities)
        present = sums[-1] > 0
        if self.nonfinite(torch.where(present, sums[0], 0.0)):
            self._feed_controller(float("nan"))
            return
        self._bump_step()
        g_sq = float(sums[0][present].sum())
        h, decayed = self._decayed_grads(plan, params, self._clip(grads, g_sq))
        torch._foreach_addcmul_(sums_views, h, h)
        denom = torch._foreach_sqrt(sums_views)
        torch._foreach_add_(denom, eps_seg)
        lr = self._lr_seg(plan)
        torch._foreach_addcdiv_(params, h, denom, [-a for a in lr])
        self.record_layer_stats(present, lr=self.layer_hparam("lr", dev))
        g_sq_metric = float(sums[1][present].sum()) if n_metric else None
        square_sum = float(sums[2].sum()) if n_square else None
        self._feed_controller(g_sq, g_sq_metric, plan=plan, grads=grads, metric_square_sum=square_sum)

    def _metric_square_quantity(self, plan: StepPlan, metric: list[torch.Tensor]) -> Quantity | None:
        """``Σ_j P_j S_j`` on this rank's partitions, with ``S = Σ_{k, ranks} h_k²`` all-reduced.

        Under ZeRO the hooks cannot weigh a micro-batch gradient by ``P`` (it lives on
        partitions), so they keep its squares ``S`` (see
        :meth:`lbopt.batch.MicrobatchSamples.square_sums`); the sum over ranks of ``S`` (one
        all-reduce of a model-sized buffer on test steps) meets ``P`` on each partition, and
        the statistics engine's reduce adds the partitions.
        """
        ctrl = self.batch_controller
        squares = ctrl.samples.square_sums() if ctrl is not None else {}
        if not squares:
            return None
        layout = plan.layout
        index = {id(p): i for i, p in enumerate(self.table.originals)}  # type: ignore[attr-defined]
        per_record = {index[k]: v for k, v in squares.items() if k in index}
        ordered = sorted(per_record)
        flat = torch.cat([per_record[i].reshape(-1).float() for i in ordered])
        if layout.sharded:
            where = layout.comm_device or flat.device
            buf = flat.to(where)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=layout.process_group)
            flat = buf
        whole = dict(zip(ordered, torch.split(flat, [per_record[i].numel() for i in ordered])))
        views, segs = segments_of_dense(self.table, layout, whole, plan.stats.device)
        return Quantity([metric[k] for k in segs], views, segs)


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
        params, lr, initial_accumulator_value, eps, weight_decay, exclude, on_nonfinite,
            max_grad_norm: as :class:`AdaGradNorm`.
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
        max_grad_norm: float | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **controller_kwargs: Any,
    ) -> None:
        super().__init__(params, lr, initial_accumulator_value, eps, weight_decay, exclude=exclude,
                         on_nonfinite=on_nonfinite, max_grad_norm=max_grad_norm, maximize=maximize, foreach=foreach)
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
        max_grad_norm: float | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        **controller_kwargs: Any,
    ) -> None:
        super().__init__(params, lr, initial_accumulator_value, eps, weight_decay, exclude=exclude,
                         on_nonfinite=on_nonfinite, max_grad_norm=max_grad_norm, maximize=maximize, foreach=foreach)
        self.batch_controller = _make_controller(self, batch_controller, controller_kwargs)
        if self.batch_controller is not None and self.batch_controller.config.test == "coordinate":
            self.batch_controller.set_metric(self.metric)
