"""lbopt: large-batch optimizers with exact per-layer statistics under any sharding.

``LARS``, ``LAMB``, ``CBLR``, ``MCLR``, ``AdaGradNorm`` and ``AdAdaGrad(Norm)`` are
``torch.optim.Optimizer`` subclasses. Their per-layer norms and curvatures come from one
statistics engine (:mod:`lbopt.stats`) over a layout of local tensor slices
(:mod:`lbopt.layout`), so they give the dense single-process numbers under DDP and
DeepSpeed ZeRO 1/2/3 alike.
"""

from lbopt._post_import import install_integration_hooks as _install_integration_hooks
from lbopt.batch import BatchDecision, BatchSizeController, PerSampleGradients
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

# DeepSpeed (if and when it is imported) learns lbopt's config names and partition layouts;
# nothing is imported here.
_install_integration_hooks()

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
