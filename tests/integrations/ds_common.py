"""Shared by the DeepSpeed tests and their worker processes: network, data, optimizers, dense runs."""

from __future__ import annotations

import math
from typing import Any

import torch

import lbopt

IN, H1, H2, OUT = 12, 20, 16, 6
GLOBAL_BATCH = 16
STEPS = 12

# Config-route hyperparameters (JSON-able), one entry per optimizer under test.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "LARS": {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02},
    "LAMB": {"lr": 0.02, "weight_decay": 0.01},
    "CBLR": {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02},
    "MCLR": {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02},
}
# Other registry names, checked in fewer configurations (tests/integrations/test_deepspeed.py).
EXTRA_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "AdaGradNorm": {"lr": 0.5, "weight_decay": 1e-3},
    # the batch-size controller is exercised by the adaptive-batch tests; here: the update maths
    "AdAdaGradNorm": {"lr": 0.5, "weight_decay": 1e-3, "batch_controller": False},
    "AdAdaGrad": {"lr": 0.05, "weight_decay": 1e-3, "batch_controller": False},
}
NAIVE = "NaiveLAMB"


def make_model() -> torch.nn.Module:
    """Sizes chosen so that two-rank ZeRO partitions cut through the middle weight matrix."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, H1), torch.nn.Tanh(), torch.nn.Linear(H1, H2), torch.nn.Tanh(), torch.nn.Linear(H2, OUT)
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed matrices, undecayed biases (the usual decay / no-decay split)."""
    # ds_shape: the full shape of a parameter zero.Init has already partitioned
    mats = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) > 1]
    vecs = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) <= 1]
    return [{"params": mats, "weight_decay": weight_decay}, {"params": vecs, "weight_decay": 0.0}]


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=g)
    return x, y


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


class NaiveLAMB(torch.optim.Optimizer):
    """LAMB that treats every tensor it is handed as a layer: what ZeRO breaks."""

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + group["eps"])
                u.add_(p, alpha=group["weight_decay"])
                wn, un = p.norm(), u.norm()
                r = (wn / un).item() if wn > 0 and un > 0 else 1.0
                p.sub_(u, alpha=group["lr"] * r)


def build_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if name == NAIVE:
        return NaiveLAMB(groups, **OPTIMIZERS["LAMB"])
    return lbopt.get_optimizer_class(name)(groups, **hparams(name))


def hparams(name: str) -> dict[str, Any]:
    return OPTIMIZERS[name] if name in OPTIMIZERS else EXTRA_OPTIMIZERS[name]


def group_weight_decay(name: str) -> float:
    return hparams("LAMB" if name == NAIVE else name)["weight_decay"]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def dense_run(name: str, steps: int = STEPS) -> torch.Tensor:
    """The single-process trajectory on the full global batch."""
    model = make_model()
    opt = build_optimizer(name, param_groups(model, group_weight_decay(name)))
    for step in range(steps):
        x, y = data(step)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return flat_params(model)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).norm().item()
    n = b.double().norm().item()
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)
