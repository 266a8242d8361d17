"""Update directions: elementwise rules on lists of (segment) tensors.

Per-segment scalars (step sizes, decays) are Python lists aligned with the tensor lists, so
one segment of a flat ZeRO partition can be decayed and another not. Everything is in
place: no model-sized temporaries on the common paths. On accelerators the batched
``torch._foreach_*`` kernels are used; on CPU, where foreach is a loop anyway, per-tensor
``add_(alpha=...)`` avoids the temporary a per-tensor scalar list would need. Both give
the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["adam_direction", "add_scaled_", "descend", "momentum_update", "projected_momentum_step"]

Tensors = list[torch.Tensor]


def add_scaled_(dst: Tensors, src: Tensors, scalars: Sequence[float]) -> None:
    """``dst_i += s_i · src_i`` in place."""
    if not dst:
        return
    first = scalars[0]
    if all(s == first for s in scalars):
        if first != 0.0:
            torch._foreach_add_(dst, src, alpha=first)
        return
    if dst[0].device.type == "cpu":
        for d, s, a in zip(dst, src, scalars):
            if a != 0.0:
                d.add_(s, alpha=a)
    else:
        torch._foreach_add_(dst, torch._foreach_mul(src, list(scalars)))


def _scale_(tensors: Tensors, scalars: Sequence[float]) -> None:
    if all(s == 1.0 for s in scalars):
        return
    first = scalars[0]
    if all(s == first for s in scalars):
        torch._foreach_mul_(tensors, first)
    else:
        torch._foreach_mul_(tensors, list(scalars))


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
    _scale_(buffers, momentum)
    add_scaled_(buffers, grads, step_sizes)
    add_scaled_(buffers, params, [a * b for a, b in zip(step_sizes, weight_decays)])
    plain = [i for i, n in enumerate(nesterov) if not n]
    if len(plain) == len(params):
        torch._foreach_sub_(params, buffers)
        return
    if plain:
        torch._foreach_sub_([params[i] for i in plain], [buffers[i] for i in plain])
    nest = [i for i, n in enumerate(nesterov) if n]
    p, g, v = ([x[i] for i in nest] for x in (params, grads, buffers))
    a, b, mu = ([x[i] for i in nest] for x in (step_sizes, weight_decays, momentum))
    # w − (μv + α(g + βw)) = (1 − αβ)w − μv − αg, with the old w on the right
    _scale_(p, [1.0 - ai * bi for ai, bi in zip(a, b)])
    add_scaled_(p, v, [-m for m in mu])
    add_scaled_(p, g, [-ai for ai in a])


def adam_direction(
    grads: Tensors,
    exp_avg: Tensors,
    exp_avg_sq: Tensors,
    denom: Tensors,
    update: Tensors,
    beta1: Sequence[float],
    beta2: Sequence[float],
    bias_correction1: Sequence[float],
    bias_correction2: Sequence[float],
    eps: Sequence[float],
    params: Tensors | None = None,
    weight_decays: Sequence[float] | None = None,
) -> Tensors:
    """Adam moments in place and the bias-corrected direction (Kingma & Ba 2015).

    ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``; writes ``u = m̂ / (√v̂ + ε) + βw`` with
    ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)`` into ``update`` and returns it (decoupled decay
    ``βw`` only when ``params`` and ``weight_decays`` are given). ``denom`` and ``update``
    are caller-provided work buffers: ``u = βw``, then one ``addcdiv`` adds
    ``(1/(1−β₁ᵗ))·m/(√v̂+ε)``.
    """
    torch._foreach_lerp_(exp_avg, grads, [1.0 - b for b in beta1])
    _scale_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, [1.0 - b for b in beta2])
    torch._foreach_copy_(denom, exp_avg_sq)
    torch._foreach_sqrt_(denom)
    _scale_(denom, [1.0 / c**0.5 for c in bias_correction2])
    torch._foreach_add_(denom, list(eps))
    if params is not None and weight_decays is not None and any(weight_decays):
        torch._foreach_copy_(update, params)
        torch._foreach_mul_(update, list(weight_decays))
    else:
        torch._foreach_zero_(update)
    torch._foreach_addcdiv_(update, exp_avg, denom, [1.0 / c for c in bias_correction1])
    return update


def descend(params: Tensors, updates: Tensors, step_sizes: Sequence[float]) -> None:
    """``w ← w − α u`` per segment."""
    add_scaled_(params, updates, [-a for a in step_sizes])


def projected_momentum_step(
    params: Tensors,
    grads: Tensors,
    buffers: Tensors,
    step_sizes: Sequence[float],
    weight_decays: Sequence[float],
    momentum: Sequence[float],
    nesterov: Sequence[bool],
) -> None:
    """Momentum with the step size outside the buffer, in place (CBLR's model step).

    ``h = g + βw``; ``m ← μm + h``; ``d = m`` (Nesterov: ``d = h + μm``); ``w ← w − s d``,
    where ``s`` is the segment's step size (the quadratic model's step along ``d``).
    Keeping ``s`` out of the buffer makes ``m`` a pure direction, whose scale the model's
    projection ``⟨h, d⟩/‖d‖²`` cancels.
    """
    _scale_(buffers, momentum)
    add_scaled_(buffers, grads, [1.0] * len(buffers))
    add_scaled_(buffers, params, weight_decays)
    nest = [i for i, n in enumerate(nesterov) if n]
    if nest:
        # w − s(h + μm) = (1 − sβ)w − s g − sμ m, with the old w on the right
        p, g, v = ([x[i] for i in nest] for x in (params, grads, buffers))
        s, b, mu = ([x[i] for i in nest] for x in (step_sizes, weight_decays, momentum))
        _scale_(p, [1.0 - si * bi for si, bi in zip(s, b)])
        add_scaled_(p, g, [-si for si in s])
        add_scaled_(p, v, [-si * mi for si, mi in zip(s, mu)])
    plain = [i for i, n in enumerate(nesterov) if not n]
    if plain:
        add_scaled_([params[i] for i in plain], [buffers[i] for i in plain], [-step_sizes[i] for i in plain])
