"""Adaptive-batch runs compared across engines: one per batch-size test, plus clipping.

Each case names the optimizer, its test and constants chosen so that the batch grows within
``STEPS`` steps of the tiny regression problem (:mod:`tests.batch.problem`), and runs
densely in one process (:func:`dense_run`) with the same micro-batch stream a 2-rank run sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import lbopt.optim.adagrad as ada
from tests.batch import problem as P

STEPS = 10
CTRL = dict(initial_batch_size=8, max_batch_size=64, micro_batch_size=P.MICRO)


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: str  # "AdAdaGradNorm" | "AdAdaGrad" (DeepSpeed config names)
    test: str
    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)

    def params(self, world_size: int) -> dict[str, Any]:
        """Optimizer keyword arguments (also the DeepSpeed ``optimizer.params``)."""
        return dict(lr=self.lr, test=self.test, world_size=world_size, **CTRL, **self.kwargs)


CASES = [
    Case("norm", "AdAdaGradNorm", "norm", 0.3, dict(eta=0.8)),
    Case("inner_product", "AdAdaGradNorm", "inner_product", 0.3, dict(theta=0.15)),
    Case("orthogonality", "AdAdaGradNorm", "orthogonality", 0.3, dict(nu=0.5)),
    Case("augmented", "AdAdaGradNorm", "augmented", 0.3, dict(theta=0.3, nu=0.5)),
    Case("coordinate", "AdAdaGrad", "coordinate", 0.05, dict(eta=0.8)),
    # clipping + weight decay on the coordinate-wise optimizer with an inner-product test
    Case("clip_augmented", "AdAdaGrad", "augmented", 0.05,
         dict(theta=0.3, nu=0.5, max_grad_norm=0.5, weight_decay=0.01)),
    Case("clip_norm", "AdAdaGradNorm", "norm", 0.3, dict(eta=0.8, max_grad_norm=0.5, weight_decay=0.01)),
]
BY_NAME = {c.name: c for c in CASES}


def make_optimizer(case: Case, params: Any, world_size: int) -> ada.AdAdaGrad | ada.AdAdaGradNorm:
    return getattr(ada, case.optimizer)(params, **case.params(world_size))


def dense_run(case: Case, steps: int = STEPS, world_size: int = 2) -> dict[str, Any]:
    """One process, ``world_size``'s batch rounding, every micro-batch local: the reference."""
    model = P.make_model()
    opt = make_optimizer(case, model.parameters(), world_size)
    ctrl = opt.batch_controller
    sizes, reasons, j = [], [], 0
    for _ in range(steps):
        k_total = ctrl.batch_size // P.MICRO
        opt.zero_grad()
        for idx in range(j, j + k_total):
            (P.loss_fn(model, *P.micro_batch(idx)) / k_total).backward()
        sizes.append(ctrl.batch_size)
        opt.step()
        reasons.append(ctrl.last.reason)
        j += k_total
    return {"params": P.flat(model), "sizes": sizes, "reasons": reasons}


def to_cpu(flat: torch.Tensor) -> torch.Tensor:
    return flat.detach().cpu().clone()


def grew(sizes: list[int]) -> bool:
    return sizes[-1] > sizes[0]
