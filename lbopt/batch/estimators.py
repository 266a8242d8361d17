"""Where gradient samples come from: micro-batch hooks (cheap) or per-sample gradients (exact).

:class:`MicrobatchSamples` (default). Every backward pass over one micro-batch on one rank
produces that micro-batch's local mean gradient — an unbiased sample of the batch's mean
gradient at a known size (the micro-batch size). A tensor hook on each parameter sees
exactly this local gradient, *before* it is accumulated into ``.grad`` and before any
data-parallel reduction (DDP's reducer and DeepSpeed ZeRO 1/2/3 hook the gradient
accumulator, which runs after tensor hooks). The hook reduces it to scalars on the spot
(‖h‖², ‖h‖²_P, ⟨h, d⟩) and keeps nothing else; the controller all-reduces five numbers once
per test. Cost: one norm kernel per parameter and micro-batch (more only for the
coordinate/inner-product tests), no extra memory.

Scale convention: engines divide the loss by the number of accumulated micro-batches
(Accelerate, the HF Trainer, DeepSpeed, and the helpers in ``lbopt.integrations``), so
the hook sees ``g_k / M`` with ``M`` the local micro-batch count of the step; the
micro-batch gradient is recovered as ``M·h``. Pass ``microbatch_scale`` to the controller
when your loop scales differently (e.g. ``1.0`` if the loss is not divided). Mixed-precision
loss scaling must be undone by the caller (use :meth:`MicrobatchSamples.observe`).

:class:`PerSampleGradients`. Exact per-sample gradients with ``torch.func``
(``functional_call`` + ``vmap(grad)``), as in the reference implementation of Lau et al.;
memory ``n × num_params`` per call, so only for models where that is affordable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lbopt.batch.criteria import GradientSamples

__all__ = ["MicrobatchSamples", "PerSampleGradients"]

MetricFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class MicrobatchSamples:
    """Accumulates per-micro-batch scalars from tensor hooks or explicit observations."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self.active = True
        self.metric_fn: MetricFn | None = None
        self.direction: list[torch.Tensor | None] | None = None
        self._metric_cache: dict[int, torch.Tensor | None] = {}
        self.reset()

    # ------------------------------------------------------------------ hooks
    def attach(self, params: Iterable[torch.Tensor] | nn.Module) -> None:
        """Register a gradient hook on every trainable parameter (idempotent per parameter)."""
        if isinstance(params, nn.Module):
            params = params.parameters()
        known = {id(p) for p in self.params}
        for p in params:
            if isinstance(p, tuple):
                p = p[1]
            if isinstance(p, dict):
                for q in p["params"]:
                    self.attach([q])
                continue
            if not p.requires_grad or id(p) in known:
                continue
            idx = len(self.params)
            self.params.append(p)
            known.add(id(p))
            self._handles.append(p.register_hook(lambda g, i=idx: self._hook(i, g)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.params.clear()
        self.reset()

    def _metric(self, idx: int) -> torch.Tensor | None:
        """``√P`` of parameter ``idx`` (cached for the step): ‖h‖²_P = ‖h·√P‖²."""
        if idx not in self._metric_cache:
            w = None if self.metric_fn is None else self.metric_fn(self.params[idx])
            self._metric_cache[idx] = None if w is None else w.sqrt()
        return self._metric_cache[idx]

    def _hook(self, idx: int, grad: torch.Tensor) -> None:
        # Keep a reference only until this backward pass ends; the queued callback turns the
        # whole micro-batch into a few fused kernels. (AccumulateGrad sees the extra
        # reference and copies instead of stealing the tensor, so the reference stays this
        # micro-batch's gradient.)
        if not self.active:
            return None
        if not self._pending_idx:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        self._pending_idx.append(idx)
        self._pending.append(grad)
        return None

    def _flush(self) -> None:
        idx, grads = self._pending_idx, self._pending
        self._pending_idx, self._pending = [], []
        if not grads:
            return
        self._hook_count += 1
        self._sq.extend(torch._foreach_norm(grads, 2, dtype=torch.float32))
        if self.metric_fn is not None:
            w = [self._metric(i) for i in idx]
            known = [k for k, x in enumerate(w) if x is not None]
            if known:
                scaled = torch._foreach_mul([grads[k].float() for k in known], [w[k] for k in known])  # type: ignore[misc]
                self._sq_metric.append(torch.stack(torch._foreach_norm(scaled)).square().sum())
            if len(known) < len(w):
                self._keep_squares([(idx[k], grads[k]) for k in range(len(w)) if w[k] is None])
        if self.direction is not None:
            d = [self.direction[i] if i < len(self.direction) else None for i in idx]
            parts = [torch.dot(g.reshape(-1).float(), di.reshape(-1)) for g, di in zip(grads, d) if di is not None]
            if parts:
                self._dots.append(torch.stack(parts).sum())

    def _keep_squares(self, pairs: list[tuple[int, torch.Tensor]]) -> None:
        """``S_p += h²`` elementwise for parameters whose metric lives on engine partitions.

        Under ZeRO the AdaGrad accumulators (hence ``P``) are sharded, so ``‖h‖²_P`` cannot be
        formed here; ``Σ_k ‖g_k‖²_P = Σ_j P_j Σ_k g_kj²`` is linear in these squares, and the
        optimizer finishes it on its partitions (:meth:`square_sums`).
        """
        bufs, grads = [], []
        for i, g in pairs:
            buf = self._squares.get(i)
            if buf is None or buf.shape != g.shape:
                buf = self._squares[i] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            bufs.append(buf)
            grads.append(g.float())
        torch._foreach_addcmul_(bufs, grads, grads)

    def square_sums(self) -> dict[int, torch.Tensor]:
        """``{id(param): Σ_k h_k²}`` kept this step for parameters without a local metric (hook scale)."""
        return {id(self.params[i]): buf for i, buf in self._squares.items()}

    # ------------------------------------------------------------------ explicit path
    def observe(self, sq_norm: float | torch.Tensor, sq_norm_metric: float | torch.Tensor | None = None,
                dot: float | torch.Tensor | None = None) -> None:
        """Record one micro-batch's local gradient statistics computed elsewhere.

        ``sq_norm = ‖h‖²`` of the micro-batch's local gradient (as accumulated, i.e. under
        the same scale convention as the hooks); ``sq_norm_metric = ‖h‖²_P``; ``dot = ⟨h, d⟩``
        with the previous step's mean gradient ``d``.
        """
        self._explicit += 1
        self._sq.append(torch.as_tensor(sq_norm, dtype=torch.float64).sqrt())
        if sq_norm_metric is not None:
            self._sq_metric.append(torch.as_tensor(sq_norm_metric, dtype=torch.float64))
        if dot is not None:
            self._dots.append(torch.as_tensor(dot, dtype=torch.float64))

    # ------------------------------------------------------------------ results
    def local_count(self) -> int:
        return self._explicit + self._hook_count

    def reset(self) -> None:
        self._sq: list[torch.Tensor] = []
        self._sq_metric: list[torch.Tensor] = []
        self._dots: list[torch.Tensor] = []  # one ⟨g_k, d⟩ per micro-batch
        self._explicit = 0
        self._hook_count = 0
        self._pending: list[torch.Tensor] = []
        self._pending_idx: list[int] = []
        self._metric_cache = {}
        self._squares: dict[int, torch.Tensor] = {}

    def local_sums(self, scale: float | None) -> list[float]:
        """``[count, Σ‖g_k‖², Σ‖g_k‖²_P, Σ⟨g_k,d⟩, Σ⟨g_k,d⟩²]`` of this rank, then reset.

        ``scale``: factor from hook gradients to micro-batch gradients (None: the local
        micro-batch count). Missing quantities are NaN so they stay NaN after a SUM. One
        device-to-host transfer for all of them.
        """
        count = self.local_count()
        s = float(count if scale is None else scale)
        # One stack and one device-to-host copy for every partial sum; the rest in Python float64.
        parts = self._sq + self._sq_metric + self._dots
        values = torch.stack(parts).double().cpu().tolist() if parts else []
        n_sq, n_m = len(self._sq), len(self._sq_metric)
        sq = math.fsum(v * v for v in values[:n_sq])
        want_metric = self.metric_fn is not None or bool(self._sq_metric)
        sq_m = math.fsum(values[n_sq:n_sq + n_m]) if want_metric else math.nan
        dot = dot_sq = math.nan if count else 0.0
        if self._dots:
            per_mb = values[n_sq + n_m:]
            dot, dot_sq = math.fsum(per_mb), math.fsum(v * v for v in per_mb)
        self.reset()
        return [float(count), sq * s * s, sq_m * s * s, dot * s, dot_sq * s * s]


class PerSampleGradients:
    """Exact per-sample gradient statistics with ``torch.func``.

    ``loss_fn(output, target)`` must be the per-example loss averaged over its batch (so on
    a batch of one it is that example's loss; the mean of the per-sample gradients is then
    the batch gradient). ``metric``: optional per-parameter weight tensors ``P`` (same
    shapes as the parameters) for the coordinate test. Under ``torch.distributed`` the
    mean gradient and the sums are all-reduced over ``process_group``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], chunk_size: int | None = None):
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size

    def samples(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        metric: list[torch.Tensor | None] | None = None,
        process_group: Any = None,
    ) -> GradientSamples:
        from torch.func import functional_call, grad, vmap

        model = self.model
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
            return self.loss_fn(out, y.unsqueeze(0))

        per = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=self.chunk_size)(params, inputs, targets)
        flat = [per[n].reshape(per[n].shape[0], -1).to(torch.float64) for n in names]
        n_local = inputs.shape[0]
        total = torch.cat([f.sum(0) for f in flat] + [torch.tensor([float(n_local)], dtype=torch.float64)])
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        if distributed:
            dist.all_reduce(total, group=process_group)
        count = float(total[-1])
        gbar = torch.split(total[:-1] / count, [f.shape[1] for f in flat])
        dots = sum(f @ g for f, g in zip(flat, gbar))
        sums = [sum(f.square().sum() for f in flat), dots.sum(), dots.square().sum()]
        if metric is not None and all(m is not None for m in metric):
            w = [m.reshape(-1).to(torch.float64) for m in metric]  # type: ignore[union-attr]
            sums.append(sum((f.square() * wi).sum() for f, wi in zip(flat, w)))
            gp = sum((g.square() * wi).sum() for g, wi in zip(gbar, w))
        else:
            sums.append(torch.tensor(math.nan, dtype=torch.float64))
            gp = torch.tensor(math.nan, dtype=torch.float64)
        packed = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in sums])
        if distributed:
            dist.all_reduce(packed, group=process_group)
        gsq = float(sum(g.square().sum() for g in gbar))
        return GradientSamples(
            count=count, sample_size=1.0, sum_sq=float(packed[0]), sum_sq_metric=float(packed[3]),
            sum_dot=float(packed[1]), sum_dot_sq=float(packed[2]), dir_sq_norm=gsq,
            mean_sq_norm=gsq, mean_sq_norm_metric=float(gp),
        )
