"""LARS as the weight-ratio instance of CBLR."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lbopt.optim.base import ExcludeSpec, LayerGrouping
from lbopt.optim.curvature import CBLR

__all__ = ["LARS"]


class LARS(CBLR):
    r"""Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017).

    Per adapted layer l::

        λ_l = κ‖w_l‖ / (‖g_l‖ + β‖w_l‖ + ε‖w_l‖)     (1 if a norm is 0; clipped by trust_clip)
        v  ← μv + η λ_l (g_l + βw_l);   w ← w − v

    This is exactly :class:`CBLR` with ``curvature="weight_ratio"``: the curvature of a
    quadratic centred at the origin, ``C_l = (‖g_l‖ + β‖w_l‖)/‖w_l‖``, gives the rate
    ``κ/(C_l + ε) = λ_l``. The class only fixes that estimator (no EMA) and the momentum
    direction; every other hyperparameter has CBLR's name and default. Excluded layers
    (default: ``ndim <= 1``) use ``λ = 1`` and no weight decay.

    ``trust_coefficient=None`` means κ = 0.001 (LARS's value), as in CBLR's plain step.

    Args: see :class:`CBLR` (``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient``,
    ``eps``, ``nesterov``, ``trust_clip``, ``exclude``, ``layer_grouping``, ``on_nonfinite``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float | None = None,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: tuple[float, float] | None = None,
        *,
        exclude: ExcludeSpec = None,
        layer_grouping: LayerGrouping = "tensor",
        on_nonfinite: str = "skip",
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, trust_clip=trust_clip,
            curvature="weight_ratio", curvature_ema=0.0, direction="momentum",
            exclude=exclude, layer_grouping=layer_grouping, on_nonfinite=on_nonfinite,
        )
