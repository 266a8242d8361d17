"""Shared by the distributed SharpnessMonitor test and its worker: a network and fixed batches."""

from __future__ import annotations

import torch
from torch import nn

IN, HID, CLASSES, MICRO, PROBE = 6, 10, 3, 8, 16
STEPS, EVERY, ITERS, TOL, LR = 4, 2, 200, 1e-9, 0.5


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, CLASSES))


def _data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def train_part(step: int, rank: int):
    return _data(100 * step + rank, MICRO)


def probe_batch():
    """The whole probe batch; rank r holds rows [r·PROBE/2, (r+1)·PROBE/2)."""
    return _data(7, PROBE)


def probe_part(rank: int, world: int = 2):
    x, y = probe_batch()
    n = PROBE // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])
