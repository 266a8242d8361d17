"""Shared by the adaptive-batch tests and their workers: network, micro-batch stream, dense runs."""

from __future__ import annotations

import torch
from torch import nn

from tests.support import flat, free_port, rel  # noqa: F401  (re-exported as P.*)

IN, HID, OUT = 6, 12, 3
MICRO = 4




def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))


def micro_batch(j: int, size: int = MICRO) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``j`` of a fixed stream: noisy regression, so the batch has to grow."""
    g = torch.Generator().manual_seed(10_000 + j)
    x = torch.randn(size, IN, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5, x[:, 3]], dim=1) + 0.8 * torch.randn(size, OUT, generator=g)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)






def train_stream(model: nn.Module, opt, ctrl, steps: int, rank: int = 0, world: int = 1,
                 start_micro: int = 0) -> tuple[list[int], int]:
    """Train ``steps`` optimizer steps on the micro-batch stream; rank r takes micro-batches k ≡ r (mod world).

    Returns the global batch of every step and the next micro-batch index.
    """
    j = start_micro
    sizes = []
    for _ in range(steps):
        k_total = ctrl.batch_size // MICRO
        mine = [j + k for k in range(k_total) if k % world == rank]
        opt.zero_grad()
        for i, idx in enumerate(mine):
            x, y = micro_batch(idx)
            ctx = model.no_sync() if (world > 1 and i < len(mine) - 1) else _null()
            with ctx:
                (loss_fn(model, x, y) / len(mine)).backward()
        sizes.append(ctrl.batch_size)
        opt.step()
        j += k_total
    return sizes, j


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
