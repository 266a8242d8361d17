"""Sharpness monitor: the top Hessian eigenvalue of the training loss, against 2/η (edge of stability).

Gradient descent with rate η on a quadratic is stable only while the curvature stays below 2/η;
Cohen et al. (2021) and Sun et al. (2022) observe that training drives the top Hessian
eigenvalue λ_max up to about 2/η and holds it there ("edge of stability"). This monitor
measures, every ``every`` optimizer steps, on a fixed probe batch:

- ``λ_max``: power iteration on Hessian-vector products ``v ← Hv/‖Hv‖``, ``λ = vᵀHv``
  (each ``Hv`` one double-backward), until ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|`` or ``iters``;
  warm-started from the previous probe's eigenvector. It converges to the eigenvalue of largest
  magnitude — the top one whenever it dominates the most negative one, as near the edge of
  stability;
- per layer ``l`` (by default each parameter with ``ndim > 1``, CBLR's adapted layers), the
  Rayleigh quotient of its diagonal Hessian block along its gradient,
  ``C_l = g_lᵀ H_ll g_l / ‖g_l‖²`` — the quantity CBLR's ``hvp`` estimator measures and its
  ``secant`` estimator approximates, so the two can be compared (one backward per layer);
- ``gᵀHg/‖g‖²`` over the whole model;
- the thresholds ``2/η`` (η: the first param group's lr) and, when the optimizer publishes
  per-layer rates (``last_layer_stats["lr/<name>"]``, every lbopt optimizer), ``2/η_l``.

The probe never changes training: it runs the unwrapped module in eval mode (no dropout,
no batch-norm statistics update; attention through its math kernel, which has a double
backward) inside a forked RNG, takes gradients with
``torch.autograd.grad`` (``.grad`` and engine gradient hooks untouched) and restores every
module's mode.

Engines: one process; DDP and DeepSpeed ZeRO-1/2 (parameters are whole on every rank): each
rank gives its part of the probe batch, Hessian-vector products and quadratic forms are
averaged over the data-parallel group (as DDP averages gradients), so every rank gets the
numbers of one process on the concatenated probe batch. ZeRO-3 and FSDP partition the
parameters themselves: refused with an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SharpnessMonitor", "SharpnessReport", "top_hessian_eigenvalue"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class SharpnessReport:
    """One probe. ``layer_rayleigh[name] = g_lᵀH_llg_l/‖g_l‖²``; ``layer_lr`` from the optimizer, if any."""

    step: int
    lambda_max: float
    iterations: int
    loss: float
    lr: float | None
    gradient_rayleigh: float
    layer_rayleigh: dict[str, float] = field(default_factory=dict)
    layer_lr: dict[str, float] = field(default_factory=dict)
    layer_curvature: dict[str, float] = field(default_factory=dict)  # the optimizer's own estimates
    seconds: float = 0.0

    @property
    def two_over_lr(self) -> float | None:
        return 2.0 / self.lr if self.lr else None

    def as_dict(self) -> dict[str, float]:
        """Scalars for trackers: ``sharpness/lambda_max``, ``sharpness/two_over_lr``, per layer ..."""
        out = {
            "sharpness/lambda_max": self.lambda_max,
            "sharpness/gradient_rayleigh": self.gradient_rayleigh,
            "sharpness/probe_loss": self.loss,
            "sharpness/iterations": float(self.iterations),
            "sharpness/seconds": self.seconds,
        }
        if self.two_over_lr is not None:
            out["sharpness/two_over_lr"] = self.two_over_lr
        out.update({f"sharpness/layer/{k}": v for k, v in self.layer_rayleigh.items()})
        out.update({f"sharpness/layer_two_over_lr/{k}": 2.0 / v for k, v in self.layer_lr.items() if v > 0})
        out.update({f"sharpness/optimizer_curvature/{k}": v for k, v in self.layer_curvature.items()})
        return out


def _check_unpartitioned(params: list[torch.Tensor]) -> None:
    for p in params:
        if hasattr(p, "ds_tensor") or hasattr(p, "ds_status"):
            raise NotImplementedError(
                "SharpnessMonitor needs whole parameters on every rank, but DeepSpeed ZeRO-3 partitions them; "
                "probe sharpness under ZeRO-1/2 or DDP (same model, same numbers), or on one process"
            )
        if type(p).__name__ in ("DTensor", "FlatParameter") or getattr(p, "_is_flat_param", False):
            raise NotImplementedError(
                "SharpnessMonitor needs whole parameters on every rank, but FSDP shards them; "
                "probe sharpness under DDP or DeepSpeed ZeRO-1/2, or on one process"
            )


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine")


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / a DeepSpeed engine (what Accelerate's ``prepare`` returns)."""
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


class _Averager:
    """Means over the data-parallel group (identity on one process)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            t.div_(self.world)
        return t


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(p) for part, p in zip(torch.split(vec, [p.numel() for p in like]), like)]


def top_hessian_eigenvalue(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iters: int = 20,
    tol: float = 1e-3,
) -> tuple[float, torch.Tensor, int]:
    """Power iteration: ``(λ, v, iterations)`` with ``λ = vᵀHv`` for the dominant eigenvector v.

    ``hvp(v)`` returns ``Hv`` for a flat vector ``v``; stops when ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|``.
    """
    v = start / start.norm()
    lam, prev = 0.0, math.nan
    for k in range(1, iters + 1):
        hv = hvp(v)
        lam = float(torch.dot(v.double(), hv.double()))
        norm = hv.norm()
        if norm == 0:
            return 0.0, v, k
        v = hv / norm
        if abs(lam - prev) <= tol * abs(lam):
            return lam, v, k
        prev = lam
    return lam, v, iters


class SharpnessMonitor:
    """Probe λ_max and per-layer curvatures every ``every`` steps (see the module docstring).

    Args:
        model: the trained model (plain, DDP, a DeepSpeed ZeRO-1/2 engine or Accelerate-prepared).
        loss_fn: ``loss_fn(module, probe_batch) -> scalar loss`` (a mean over the batch); called
            with the *unwrapped* module.
        probe_batch: a fixed batch (this rank's part under DDP/ZeRO), on the model's device.
        every: probe when ``step % every == 0`` in :meth:`maybe_probe`.
        iters, tol: power-iteration budget and relative stopping tolerance.
        layers: ``(name, param) -> bool``, which parameters get a per-layer Rayleigh quotient
            (default ``ndim > 1``); ``False`` skips them (saves one backward per layer).
        optimizer: for η (first group's lr) and, from an lbopt optimizer, per-layer η_l and
            curvature estimates to compare with.
        log: called as ``log(report.as_dict(), step)``, e.g. ``accelerator.log``.
        group: the data-parallel process group (default: the world when initialised).
        seed: of the first power-iteration start vector.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        probe_batch: Any,
        *,
        every: int = 100,
        iters: int = 20,
        tol: float = 1e-3,
        layers: Callable[[str, torch.Tensor], bool] | bool | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        log: Callable[[dict[str, float], int], Any] | None = None,
        group: Any = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r}; expected a positive integer (probe every N steps)")
        if not isinstance(iters, int) or iters < 1:
            raise ValueError(f"Invalid iters: {iters!r}; expected a positive integer")
        if not tol >= 0:
            raise ValueError(f"Invalid tol: {tol!r}; expected a number >= 0")
        self.model, self.loss_fn, self.probe_batch = model, loss_fn, probe_batch
        self.every, self.iters, self.tol = every, iters, tol
        if layers is None:
            layers = _default_layers
        self.layers = layers
        self.optimizer, self.log, self.group, self.seed = optimizer, log, group, seed
        self.history: list[SharpnessReport] = []
        self._vector: torch.Tensor | None = None

    def maybe_probe(self, step: int) -> SharpnessReport | None:
        """Probe if ``step % every == 0`` (call after the optimizer step ``step``)."""
        return self.probe(step) if step % self.every == 0 else None

    def probe(self, step: int = 0) -> SharpnessReport:
        """Measure now; append to :attr:`history`, log, and return the report."""
        t0 = time.perf_counter()
        module = _unwrap(self.model)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        _check_unpartitioned(params)
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with torch.random.fork_rng(devices=_rng_devices(params)), torch.enable_grad(), _math_attention():
                report = self._measure(step, module, named)
        finally:
            for m, training in modes.items():
                m.training = training
        report.seconds = time.perf_counter() - t0
        self.history.append(report)
        if self.log is not None:
            self.log(report.as_dict(), step)
        return report

    # ------------------------------------------------------------------ the measurement
    def _measure(self, step: int, module: nn.Module, named: list[tuple[str, torch.Tensor]]) -> SharpnessReport:
        params = [p for _, p in named]
        mean = _Averager(self.group)
        loss = self.loss_fn(module, self.probe_batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = mean(_flat([x.detach() for x in grads]).float())

        def hvp(v: torch.Tensor) -> torch.Tensor:
            parts = [x.to(p.dtype) for x, p in zip(_split(v, params), params)]
            hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
            return mean(_flat([h.detach() for h in hv]).float())

        start = self._vector
        if start is None or start.numel() != g.numel():
            gen = torch.Generator().manual_seed(self.seed)
            start = torch.randn(g.numel(), generator=gen).to(g.device)
        lam, self._vector, iterations = top_hessian_eigenvalue(hvp, start, self.iters, self.tol)
        g_sq = float(g.double().square().sum())
        gradient_rayleigh = float(torch.dot(g.double(), hvp(g).double())) / g_sq if g_sq > 0 else 0.0
        layer_rayleigh = self._layer_rayleigh(named, grads, _split(g, params), mean)
        loss_value = float(mean(loss.detach().float().reshape(1)))
        stats = dict(getattr(self.optimizer, "last_layer_stats", {}) or {}) if self.optimizer else {}
        return SharpnessReport(
            step=step,
            lambda_max=lam,
            iterations=iterations,
            loss=loss_value,
            lr=float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None,
            gradient_rayleigh=gradient_rayleigh,
            layer_rayleigh=layer_rayleigh,
            layer_lr={k[3:]: v for k, v in stats.items() if k.startswith("lr/") and k[3:] in layer_rayleigh},
            layer_curvature={k[10:]: v for k, v in stats.items() if k.startswith("curvature/")},
        )

    def _layer_rayleigh(self, named, grads, g_parts, mean) -> dict[str, float]:
        """``g_lᵀ H_ll g_l / ‖g_l‖²`` per selected layer: one backward each, one all-reduce in all."""
        if self.layers is False:
            return {}
        chosen = [i for i, (n, p) in enumerate(named) if self.layers(n, p)]
        if not chosen:
            return {}
        forms = []
        for i in chosen:
            p, gl = named[i][1], g_parts[i]
            (h,) = torch.autograd.grad((grads[i] * gl.to(grads[i].dtype)).sum(), p, retain_graph=True)
            forms.append(torch.dot(gl.reshape(-1).double(), h.detach().reshape(-1).double()))
        forms_t = mean(torch.stack(forms))
        out = {}
        for i, form in zip(chosen, forms_t.tolist()):
            sq = float(g_parts[i].double().square().sum())
            out[named[i][0]] = form / sq if sq > 0 else 0.0
        return out

    # ------------------------------------------------------------------ output
    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """PNG of λ_max (and each layer's Rayleigh quotient) against 2/η over the probed steps."""
        return plot_sharpness({title or "run": self.history}, path)


def _math_attention():
    """Scaled-dot-product attention by its math kernel: the fused ones have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _default_layers(_name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1


def _rng_devices(params: list[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def plot_sharpness(runs: dict[str, list[SharpnessReport]], path: str | Path) -> Path:
    """One panel per run: λ_max (solid) and 2/η (dashed) over steps, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (title, history) in zip(axes[0], runs.items()):
        steps = [r.step for r in history]
        ax.plot(steps, [r.lambda_max for r in history], "o-", color="C0", label="λ_max (top Hessian eigenvalue)")
        if any(r.two_over_lr for r in history):
            ax.plot(steps, [r.two_over_lr or math.nan for r in history], "--", color="C3", label="2/η")
        # a log axis: a non-positive quotient (g along negative curvature) is left out of the line
        rq = [r.gradient_rayleigh if r.gradient_rayleigh > 0 else math.nan for r in history]
        ax.plot(steps, rq, ":", color="C2", label="gᵀHg/‖g‖² (where > 0)")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("curvature")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
