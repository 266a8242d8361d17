"""Update directions: elementwise rules on lists of (segment) tensors.

Per-segment scalars (step sizes, decays) are Python lists aligned with the tensor lists, so
one segment of a flat ZeRO partition can be decayed and another not. Results are written in
place into the caller's tensors and buffers. Temporaries: where one scalar serves every
segment (``_foreach_add_(alpha=)``, ``_foreach_mul_``) there are none; where scalars differ
per segment, :func:`add_scaled_` on accelerators forms ``s_i · src_i`` in a temporary as
large as ``src`` before adding it (one batched ``torch._foreach_*`` kernel instead of a
launch per segment), while on CPU, where foreach is a loop anyway, per-tensor
``add_(alpha=...)`` needs none. Both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "CPU_BLOCK",
    "adam_direction",
    "add_scaled_",
    "blocks",
    "descend",
    "scaled_adam_direction",
]

Tensors = list[torch.Tensor]
Scalars = Sequence[float] | Sequence[torch.Tensor]

# Elements per cache block on CPU: the five fp32 arrays one Adam block touches (g, w, m, v and
# the work buffer) take 5 x 2 MiB, so a block stays in the L3 cache between the
# chained elementwise ops, and DRAM sees each array once per sweep.
CPU_BLOCK = 1 << 19


def blocks(tensor: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """Consecutive flat views of at most ``size`` elements (``[tensor]`` when ``size`` is None)."""
    if size is None or tensor.numel() <= size or not tensor.is_contiguous():
        return [tensor]
    flat = tensor.view(-1)
    return [flat[i : i + size] for i in range(0, flat.numel(), size)]


def add_scaled_(dst: Tensors, src: Tensors, scalars: Sequence[float]) -> None:
    """``dst_i += s_i · src_i`` in place.

    Equal scalars: one ``_foreach_add_(alpha=)``, no temporary. Differing scalars: per-tensor
    ``add_(alpha=)`` on CPU (no temporary); on accelerators ``_foreach_mul`` then
    ``_foreach_add_``, which allocates a temporary the size of ``src``.
    """
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


def descend(params: Tensors, updates: Tensors, step_sizes: Scalars) -> None:
    """``w ← w − α u`` per segment.

    ``step_sizes`` are Python floats, or 0-dim tensors on the parameters' device: then the
    rates never cross to the host (``addcmul_`` broadcasts the scalar tensor, one sweep).
    """
    if step_sizes and isinstance(step_sizes[0], torch.Tensor):
        for p, u, a in zip(params, updates, step_sizes):
            p.addcmul_(u, a, value=-1.0)
        return
    add_scaled_(params, updates, [-a for a in step_sizes])  # type: ignore[operator]


def _adam_block(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, d: torch.Tensor, w: torch.Tensor | None,
    beta1: float, beta2: float, eps: float, ratio: float,
) -> None:
    """One block: moments in place, then ``d = √v + eps`` → ``d = w + ratio·m/d`` (or ``m/d``)."""
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    torch.sqrt(v, out=d)
    d.add_(eps)
    if w is None:
        torch.div(m, d, out=d)
    else:
        torch.addcdiv(w, m, d, value=ratio, out=d)


def scaled_adam_direction(
    grads: Tensors,
    exp_avg: Tensors,
    exp_avg_sq: Tensors,
    work: Tensors,
    beta1: Sequence[float],
    beta2: Sequence[float],
    bias_correction1: Sequence[float],
    bias_correction2: Sequence[float],
    eps: Sequence[float],
    params: Tensors,
    weight_decays: Sequence[float],
    block: int | None = None,
    param_sq: list[torch.Tensor] | None = None,
) -> tuple[list[float], torch.Tensor]:
    """Adam moments in place and the direction ``u = m̂/(√v̂+ε) + βw``, stored scaled.

    Writes ``d_i`` into ``work[i]`` with ``u_i = k_i·d_i`` and returns ``(k, ‖d_i‖²)`` (the
    squared norms per segment, float64). With ``c = √(1−β₂ᵗ)/(1−β₁ᵗ)``,
    ``m̂/(√v̂+ε) = c·m/(√v + ε√(1−β₂ᵗ))``, so ``d = w + (c/β)·m/(√v + ε')`` and ``k = β``
    where the segment decays (``k = c``, ``d = m/(√v + ε')`` where it does not): the whole
    direction is four in-place kernels over one work buffer. With ``block`` (CPU) every
    segment is processed in cache-sized blocks, so each array crosses the memory bus once.
    With a list ``param_sq``, ``‖w_i‖²`` per segment (float64) is appended to it, from the
    same read of ``w`` where the segment decays (LAMB's trust ratio then needs no other pass).
    """
    scales: list[float] = []
    norms: list[torch.Tensor] = []
    owner: list[int] = []
    w_norms: list[torch.Tensor] = []
    for i, (g, m, v, d, w) in enumerate(zip(grads, exp_avg, exp_avg_sq, work, params)):
        c = bias_correction2[i] ** 0.5 / bias_correction1[i]
        beta = weight_decays[i]
        decays = beta > 0.0 and c / beta < 1e30
        scales.append(beta if decays else c)
        parts = zip(*(blocks(x, block) for x in (g, m, v, d, w)))
        for gb, mb, vb, db, wb in parts:
            _adam_block(gb, mb, vb, db, wb if decays else None, beta1[i], beta2[i],
                        eps[i] * bias_correction2[i] ** 0.5, c / beta if decays else 1.0)
            norms.append(torch.linalg.vector_norm(db, dtype=torch.promote_types(db.dtype, torch.float32)))
            if param_sq is not None:
                w_norms.append(torch.linalg.vector_norm(wb, dtype=torch.promote_types(wb.dtype, torch.float32)))
            owner.append(i)
    if not norms:
        if param_sq is not None:
            param_sq.append(torch.zeros(0, dtype=torch.float64))
        return scales, torch.zeros(0, dtype=torch.float64)
    index = torch.tensor(owner, device=norms[0].device)

    def per_segment(parts: list[torch.Tensor]) -> torch.Tensor:
        squares = torch.stack([n.to(torch.float64) for n in parts]).square()
        return torch.zeros(len(grads), dtype=torch.float64, device=squares.device).index_add_(0, index, squares)

    if param_sq is not None:
        param_sq.append(per_segment(w_norms))
    return scales, per_segment(norms)
