"""Optimizer names, as used by recipes, DeepSpeed configs and the HF Trainer route.

Names are case-insensitive. Entries are ``"module:attribute"`` strings so that looking up
one optimizer imports only what it needs.
"""

from __future__ import annotations

import importlib

__all__ = ["OPTIMIZERS", "get_optimizer_class", "optimizer_names"]

OPTIMIZERS: dict[str, str] = {
    "lars": "lbopt.optim.lars:LARS",
    "lamb": "lbopt.optim.lamb:LAMB",
    "cblr": "lbopt.optim.curvature:CBLR",
    "mclr": "lbopt.optim.curvature:MCLR",
    "adagradnorm": "lbopt.optim.adagrad:AdaGradNorm",
    "adadagrad": "lbopt.optim.adagrad:AdAdaGrad",
    "adadagradnorm": "lbopt.optim.adagrad:AdAdaGradNorm",
}


def optimizer_names() -> list[str]:
    """Registered names, in their canonical (class) spelling."""
    return [target.rpartition(":")[2] for target in OPTIMIZERS.values()]


def get_optimizer_class(name: str) -> type:
    """The optimizer class registered as ``name`` (case-insensitive).

    Raises ``ValueError`` listing the valid names for an unknown one.
    """
    target = OPTIMIZERS.get(str(name).lower())
    if target is None:
        raise ValueError(f"Unknown lbopt optimizer {name!r}; valid names: {', '.join(optimizer_names())}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
