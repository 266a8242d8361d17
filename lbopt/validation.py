"""One vocabulary for validating arguments: every check names the argument, the bad value and
what would be valid, and raises ``ValueError`` before anything is built.

Numbers must be finite (``inf`` and ``nan`` are refused everywhere: an infinite learning rate or
decay is never meant); ``bool`` is not a number here. Each check returns the value it accepted,
so ``self.eta = check_range("eta", eta, 0.0, lo_open=True)`` validates and assigns in one line.
Used by the optimizers, the batch-size controller and the integrations alike.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any, TypeVar

import torch

__all__ = ["check_betas", "check_choice", "check_clip", "check_int", "check_range"]

T = TypeVar("T")


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or math.isinf(hi) else ']'}"


def _real(value: Any, tensor_ok: bool) -> float | None:
    """``value`` as a float when it is a real number (or an allowed one-element tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Real):
        return float(value)
    if tensor_ok and isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.detach().reshape(()).cpu())
    return None


def check_range(
    name: str,
    value: Any,
    lo: float = 0.0,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    tensor_ok: bool = False,
) -> Any:
    """Accept a finite real number in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude the bounds).

    ``hi = inf`` means "no upper bound", never "infinity allowed". With ``tensor_ok`` a
    one-element floating-point tensor is accepted too (``torch.optim``'s Tensor ``lr``) and
    returned as is.
    """
    x = _real(value, tensor_ok)
    ok = (
        x is not None
        and math.isfinite(x)
        and (x > lo if lo_open else x >= lo)
        and (x < hi if hi_open else x <= hi)
    )
    if not ok:
        kind = "a finite number" + (" (or a one-element float tensor)" if tensor_ok else "")
        raise ValueError(f"Invalid {name}: {value!r}; expected {kind} in {_interval(lo, hi, lo_open, hi_open)}")
    return value


def check_int(name: str, value: Any, lo: int = 1) -> int:
    """Accept an integer ``>= lo`` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < lo:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {lo}")
    return int(value)


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """Accept one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {tuple(choices)}")
    return value


def check_clip(name: str, clip: Any) -> tuple[float, float] | None:
    """Accept ``None`` or a pair ``(lo, hi)`` with ``0 <= lo <= hi`` (``hi`` may be ``inf``: no upper bound)."""
    if clip is None:
        return None
    ok = (
        isinstance(clip, tuple | list)
        and len(clip) == 2
        and all(_real(c, False) is not None and not math.isnan(c) for c in clip)
        and math.isfinite(clip[0])
        and 0 <= clip[0] <= clip[1]
    )
    if not ok:
        raise ValueError(f"Invalid {name}: {clip!r}; expected None or a pair (lo, hi) with 0 <= lo <= hi")
    return (float(clip[0]), float(clip[1]))


def check_betas(name: str, betas: Any) -> tuple[float, float]:
    """Accept a pair ``(β₁, β₂)`` of numbers in ``[0, 1)``."""
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"Invalid {name}: {betas!r}; expected a pair (beta1, beta2) of numbers in [0, 1)")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, hi_open=True)
    return (float(betas[0]), float(betas[1]))
