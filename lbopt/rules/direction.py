"""Update directions: elementwise rules on lists of (segment) tensors, batched with foreach.

Per-segment scalars (learning rates, decays) are given as Python lists aligned with the
tensor lists, so one segment of a flat ZeRO partition can be decayed and another not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["adam_direction", "decayed_direction", "descend", "momentum_update"]

Tensors = list[torch.Tensor]


def _has_any(values: Sequence[float]) -> bool:
    return any(v != 0.0 for v in values)


def momentum_update(
    params: Tensors,
    grads: Tensors,
    buffers: Tensors,
    step_sizes: Sequence[float],
    weight_decays: Sequence[float],
    momentum: Sequence[float],
    nesterov: Sequence[bool],
) -> None:
    """LARS-style heavy ball, in place (You, Gitman, Ginsburg 2017).

    ``d = g + βw``; ``v ← μv + α d``; ``w ← w − v`` (Nesterov: ``w ← w − (μv + α d)``),
    where ``α`` is the segment's step size (base LR times its layer factor).
    """
    if _has_any(weight_decays):
        d = torch._foreach_add(grads, torch._foreach_mul(params, list(weight_decays)))
    else:
        d = [g.clone() for g in grads]
    torch._foreach_mul_(d, list(step_sizes))
    torch._foreach_mul_(buffers, list(momentum))
    torch._foreach_add_(buffers, d)
    if any(nesterov):
        mom_part = torch._foreach_mul(buffers, list(momentum))
        steps = [m + x if n else v for m, x, v, n in zip(mom_part, d, buffers, nesterov)]
    else:
        steps = buffers
    torch._foreach_sub_(params, steps)


def adam_direction(
    grads: Tensors,
    exp_avg: Tensors,
    exp_avg_sq: Tensors,
    beta1: Sequence[float],
    beta2: Sequence[float],
    bias_correction1: Sequence[float],
    bias_correction2: Sequence[float],
    eps: Sequence[float],
) -> Tensors:
    """Adam moments in place and the bias-corrected direction (Kingma & Ba 2015).

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``, returns ``m̂ / (√v̂ + ε)`` with
    ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)``.
    """
    torch._foreach_mul_(exp_avg, list(beta1))
    torch._foreach_add_(exp_avg, torch._foreach_mul(grads, [1.0 - b for b in beta1]))
    torch._foreach_mul_(exp_avg_sq, list(beta2))
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, [1.0 - b for b in beta2])
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, [b ** 0.5 for b in bias_correction2])
    torch._foreach_add_(denom, list(eps))
    direction = torch._foreach_div(exp_avg, denom)
    torch._foreach_div_(direction, list(bias_correction1))
    return direction


def decayed_direction(params: Tensors, direction: Tensors, weight_decays: Sequence[float]) -> Tensors:
    """``u = d + βw`` per segment (decoupled decay; ``direction`` is updated in place and returned)."""
    if _has_any(weight_decays):
        torch._foreach_add_(direction, torch._foreach_mul(params, list(weight_decays)))
    return direction


def descend(params: Tensors, updates: Tensors, step_sizes: Sequence[float]) -> None:
    """``w ← w − α u`` per segment (``updates`` is scaled in place)."""
    torch._foreach_mul_(updates, [-a for a in step_sizes])
    torch._foreach_add_(params, updates)
