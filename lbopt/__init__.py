"""lbopt: large-batch optimizers with exact per-layer statistics under any sharding.

``LARS``, ``LAMB``, ``CBLR``, ``MCLR``, ``AdaGradNorm`` and ``AdAdaGrad(Norm)`` are
``torch.optim.Optimizer`` subclasses. Their per-layer norms and curvatures come from one
statistics engine (:mod:`lbopt.stats`) over a layout of local tensor slices
(:mod:`lbopt.layout`), so they give the dense single-process numbers under DDP and
DeepSpeed ZeRO 1/2/3 alike.
"""

from lbopt.batch import BatchDecision, BatchSizeController, BatchSizeSchedule, PerSampleGradients
from lbopt.discard import DiscardPlan, SmallLossDiscard
from lbopt.optim import (
    CBLR,
    LAMB,
    LARS,
    MCLR,
    AdAdaGrad,
    AdAdaGradNorm,
    AdaGrad,
    AdaGradNorm,
    LayerwiseOptimizer,
    NonFiniteGradientError,
)
from lbopt.registry import get_optimizer_class, optimizer_names
from lbopt.sharpness import SharpnessMonitor, SharpnessReport

__version__ = "0.1.0"

__all__ = [
    "CBLR",
    "LAMB",
    "LARS",
    "MCLR",
    "AdAdaGrad",
    "AdAdaGradNorm",
    "AdaGrad",
    "AdaGradNorm",
    "BatchDecision",
    "BatchSizeController",
    "BatchSizeSchedule",
    "DiscardPlan",
    "SmallLossDiscard",
    "SharpnessMonitor",
    "SharpnessReport",
    "PerSampleGradients",
    "LayerwiseOptimizer",
    "NonFiniteGradientError",
    "get_optimizer_class",
    "optimizer_names",
]
