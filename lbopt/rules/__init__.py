"""Pure per-layer arithmetic: update directions and layer-wise scales.

Nothing here knows about shards: directions act elementwise on lists of segment views,
scales are functions of per-layer sums produced by :mod:`lbopt.stats`.
"""

from lbopt.rules.direction import adam_direction, add_scaled_, descend
from lbopt.rules.scale import (
    curvature_rate,
    ema_update,
    median_of,
    secant_curvature,
    trust_ratio,
    weight_ratio_curvature,
)
from lbopt.rules.sweeps import heavy_ball_ as momentum_update  # LARS-style heavy ball, one implementation

__all__ = [
    "adam_direction",
    "add_scaled_",
    "descend",
    "curvature_rate",
    "ema_update",
    "median_of",
    "momentum_update",
    "secant_curvature",
    "trust_ratio",
    "weight_ratio_curvature",
]
