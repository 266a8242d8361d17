"""Shared by the FSDP tests and their worker processes: network, data, optimizers, dense runs.

The widths are odd on purpose: under FSDP2 with 2 ranks every weight matrix splits unevenly
(11 + 10 rows, 7 + 6, 2 + 1); with 4 ranks the last layer's 3 rows leave one rank an empty
shard, and FSDP pads every shard to ⌈rows / world⌉.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import lbopt

IN, H1, H2, OUT = 12, 21, 13, 3
GLOBAL_BATCH = 16
STEPS = 12

# name -> (registry class, constructor kwargs, layer grouping)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "LARS": ("LARS", {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02}, "tensor"),
    "LAMB": ("LAMB", {"lr": 0.02, "weight_decay": 0.01}, "tensor"),
    # CBLR/MCLR with their default model step (κ = 1): 6% of the weights' norm in 12 steps
    "CBLR": ("CBLR", {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3}, "tensor"),
    # weight and bias of each Linear form one layer: the bias' shard joins the matrix's sums
    "CBLR-module": ("CBLR", {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "exclude": False}, "module"),
    "MCLR": ("MCLR", {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3}, "tensor"),
    "AdaGrad": ("AdaGrad", {"lr": 0.05, "weight_decay": 1e-3}, "tensor"),
    "AdaGradNorm": ("AdaGradNorm", {"lr": 0.5, "weight_decay": 1e-3}, "tensor"),
    "AdAdaGrad": ("AdAdaGrad", {"lr": 0.05, "weight_decay": 1e-3, "batch_controller": False}, "tensor"),
    "AdAdaGradNorm": ("AdAdaGradNorm", {"lr": 0.5, "weight_decay": 1e-3, "batch_controller": False}, "tensor"),
}
# Statistics rounds (all-reduces) per sharded step: LAMB checks ‖g‖ for NaN/Inf before its
# moments change, then reduces the trust-ratio norms; every other optimizer needs one.
ALL_REDUCES = {name: 2 if name == "LAMB" else 1 for name in OPTIMIZERS}
NAIVE = "ShardLocalLAMB"
# resumed from a checkpoint in the tests: Adam moments, momentum + curvature EMAs, the median, b²
RESUMED = ("LAMB", "CBLR", "MCLR", "AdaGradNorm")


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, H1), torch.nn.Tanh(), torch.nn.Linear(H1, H2), torch.nn.Tanh(), torch.nn.Linear(H2, OUT)
    )


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Named groups (decayed matrices, undecayed vectors), so exclusions and module grouping see names."""
    named = list(model.named_parameters())
    mats = [(n, p) for n, p in named if p.ndim > 1]
    vecs = [(n, p) for n, p in named if p.ndim <= 1]
    return [
        {"params": [p for _, p in mats], "param_names": [n for n, _ in mats], "weight_decay": weight_decay},
        {"params": [p for _, p in vecs], "param_names": [n for n, _ in vecs], "weight_decay": 0.0},
    ]


def build_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == NAIVE:
        return ShardLocalLAMB(model.parameters(), **OPTIMIZERS["LAMB"][1])
    cls_name, kwargs, grouping = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    wd = kwargs.pop("weight_decay")
    if grouping == "module":  # one group: a layer's weight and bias must share their group
        return getattr(lbopt, cls_name)(model.named_parameters(), weight_decay=wd,
                                                   layer_grouping="module", **kwargs)
    return getattr(lbopt, cls_name)(param_groups(model, wd), **kwargs)


def dense_run(name: str, steps: int = STEPS) -> torch.Tensor:
    """The single-process trajectory on the full global batch."""
    model = make_model()
    opt = build_optimizer(name, model)
    for step in range(steps):
        x, y = data(step)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def initial_params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).norm().item()
    n = b.double().norm().item()
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class ShardLocalLAMB(torch.optim.Optimizer):
    """LAMB that treats each rank's local shard as the layer: what sharding breaks (the control).

    (A per-tensor LAMB written with DTensor ops is exact under FSDP2, paying one collective
    per norm; this one computes its norms on the local shards, as a sharding-unaware engine
    would.)
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                p, g = _local(param), _local(param.grad)
                st = self.state[param]
                if not st:
                    st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + group["eps"])
                u.add_(p, alpha=group["weight_decay"])
                wn, un = p.norm(), u.norm()
                r = (wn / un).item() if wn > 0 and un > 0 else 1.0
                p.sub_(u, alpha=group["lr"] * r)
