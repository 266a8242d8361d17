"""lbopt optimizers: thin ``torch.optim.Optimizer`` shells over :mod:`lbopt.rules`."""

from lbopt.optim.adagrad import AdAdaGrad, AdAdaGradNorm, AdaGrad, AdaGradNorm
from lbopt.optim.base import LayerwiseOptimizer, NonFiniteGradientError
from lbopt.optim.curvature import CBLR, MCLR
from lbopt.optim.lamb import LAMB
from lbopt.optim.lars import LARS

__all__ = [
    "CBLR",
    "LAMB",
    "LARS",
    "MCLR",
    "AdAdaGrad",
    "AdAdaGradNorm",
    "AdaGrad",
    "AdaGradNorm",
    "LayerwiseOptimizer",
    "NonFiniteGradientError",
]
