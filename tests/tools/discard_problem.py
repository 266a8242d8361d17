"""Shared by the small-loss discarding tests and their workers: a classifier and a fixed sample stream."""

from __future__ import annotations

import torch
from torch import nn

from lbopt.discard import dropped_count, per_sample_cross_entropy

IN, HID, CLASSES = 8, 16, 4
MICRO, ACCUM, WORLD = 4, 2, 2
GLOBAL = MICRO * ACCUM * WORLD  # 16 samples per optimizer step
STEPS, LR, RHO = 4, 0.5, 0.25


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, CLASSES))


def samples(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples with these global ids: (x, y, ids). Sample k is the same wherever it is drawn."""
    xs, ys = [], []
    for k in ids.tolist():
        g = torch.Generator().manual_seed(1000 + k)
        x = torch.randn(IN, generator=g)
        xs.append(x)
        ys.append(int(torch.randint(0, CLASSES, (1,), generator=g)))
    return torch.stack(xs), torch.tensor(ys), ids


def micro_batch(step: int, j: int, rank: int, world: int = WORLD, accum: int = ACCUM, micro: int = MICRO):
    """Rank ``rank``'s micro-batch ``j`` of ``step``: global order is (micro-batch, rank, position)."""
    start = step * micro * accum * world + (j * world + rank) * micro
    return samples(torch.arange(start, start + micro))


def per_sample_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y, _ = batch
    return per_sample_cross_entropy(model(x), y)


def reference(steps: int = STEPS, rho: float = RHO) -> tuple[torch.Tensor, list[list[int]]]:
    """One process, the whole global batch at once, kept set by an explicit sort: (params, kept ids per step)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    kept_ids = []
    for step in range(steps):
        x, y, ids = samples(torch.arange(step * GLOBAL, (step + 1) * GLOBAL))
        losses = per_sample_cross_entropy(model(x), y)
        n = dropped_count(rho, GLOBAL)
        order = sorted(range(GLOBAL), key=lambda i: (float(losses[i].detach()), i))
        keep = sorted(order[n:])
        kept_ids.append(sorted(int(ids[i]) for i in keep))
        opt.zero_grad()
        losses[keep].mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), kept_ids
