"""A small regression problem shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn

from tests.support import flat, rel  # noqa: F401  (re-exported for the optim tests)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def make_data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def batch(step: int, n: int = 32, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A different global batch each step, identical in every process."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)






def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
