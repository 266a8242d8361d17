"""Evaluation metrics that work offline (recipe support, not part of the optimizer library).

``accuracy`` and ``f1`` ship here as ``evaluate`` metric modules (``lbopt/metrics/<name>/<name>.py``),
so recipes score models on machines with no access to the Hugging Face hub.
:func:`load_metric` prefers the hub's module when the hub may be used and falls back to the
shipped script otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHIPPED_METRICS", "load_metric", "metric_script"]

_HERE = Path(__file__).resolve().parent
SHIPPED_METRICS: tuple[str, ...] = ("accuracy", "f1")
_TRUE = {"1", "true", "yes", "on"}


def _hub_allowed() -> bool:
    return not any(
        os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
    )


def metric_script(name: str) -> Path:
    """Path of the shipped ``evaluate`` module for ``name`` (one of :data:`SHIPPED_METRICS`)."""
    if name not in SHIPPED_METRICS:
        raise ValueError(f"metric {name!r} is not shipped with lbopt; shipped: {', '.join(SHIPPED_METRICS)}")
    return _HERE / name / f"{name}.py"


def load_metric(name: str, **kwargs):
    """Return an ``evaluate.EvaluationModule`` for ``name``.

    Online (``HF_HUB_OFFLINE`` unset) the hub's module is tried first; offline, or if the hub
    load fails, the shipped script is used. A name that is neither shipped nor loadable from the
    hub raises ``ValueError``.
    """
    try:
        import evaluate  # recipe dependency: imported only when a metric is wanted
    except ImportError as err:
        raise ImportError("lbopt.metrics needs the 'evaluate' package: pip install 'lbopt[recipes]'") from err

    if _hub_allowed():
        try:
            return evaluate.load(name, **kwargs)
        except Exception as err:  # noqa: BLE001 - any hub failure falls back to the shipped script
            if name not in SHIPPED_METRICS:
                raise ValueError(f"cannot load metric {name!r} from the hub ({err}) and it is not shipped") from err
    return evaluate.load(str(metric_script(name)), **kwargs)
