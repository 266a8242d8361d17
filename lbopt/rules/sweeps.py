"""The momentum family (LARS, CBLR, MCLR) in two sweeps over memory.

A layer-wise step must read everything twice: once for the per-layer statistics (the rates
depend on them), once to apply the update. These functions make each of the two sweeps
cross the memory bus once per array. On CPU they walk every segment in cache-sized blocks
(:data:`lbopt.rules.direction.CPU_BLOCK` elements) and chain all the elementwise work of a
block while it is in cache; elsewhere ``block=None`` processes whole segments. The numbers
are the same either way up to the summation order of the norms.

Sweep 1, :func:`secant_sq_norms`: ``‖w‖², ‖g‖², ‖Δh‖², ‖Δw‖²`` per segment, with
``Δh = (g + βw) − h_prev`` and ``Δw = w − w_prev``, through one block-sized scratch
buffer and without touching any state (the non-finite guard has not run yet).

Sweep 2, :func:`heavy_ball_`: optionally remember ``w_prev ← w``, ``h_prev ← g + βw`` for the
next secant, then ``v ← μv + α(g + βw)``, ``w ← w − v`` (Nesterov: ``w ← w − (μv + α(g+βw))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lbopt.rules.direction import blocks

__all__ = ["BlockSums", "heavy_ball_", "layer_sums", "projected_heavy_ball_", "secant_sq_norms"]

Tensors = list[torch.Tensor]


class BlockSums:
    """Per-segment ``Σx²`` gathered block by block (partial norms in ≥ float32, sums in float64)."""

    def __init__(self) -> None:
        self._norms: list[torch.Tensor] = []
        self._owner: list[int] = []

    def add(self, segment: int, x: torch.Tensor) -> None:
        """``Σx²`` (taken as a norm, squared later in float64)."""
        self._norms.append(torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32)))
        self._owner.append(segment)

    def per_segment(self, num_segments: int, device: torch.device) -> torch.Tensor:
        out = torch.zeros(num_segments, dtype=torch.float64, device=device)
        if self._norms:
            parts = torch.stack([n.to(torch.float64) for n in self._norms]).square()
            out.index_add_(0, torch.tensor(self._owner, device=parts.device), parts.to(device))
        return out


class BlockDots(BlockSums):
    """Per-segment ``Σxy`` gathered block by block."""

    def add_dot(self, segment: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Products and block sum in ≥ float32 (float64 inputs: float64)."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        self._norms.append(torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)))
        self._owner.append(segment)

    def per_segment(self, num_segments: int, device: torch.device) -> torch.Tensor:
        out = torch.zeros(num_segments, dtype=torch.float64, device=device)
        if self._norms:
            parts = torch.stack([n.to(torch.float64) for n in self._norms])
            out.index_add_(0, torch.tensor(self._owner, device=parts.device), parts.to(device))
        return out


def layer_sums(
    params: Tensors,
    grads: Tensors,
    weight_decays: Sequence[float],
    buffers: Sequence[torch.Tensor | None] | None = None,
    history: tuple[Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]] | None = None,
    with_decay_dots: bool = False,
    block: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-segment sums for CBLR's step, in one read of every array (float64, per segment).

    Always ``w2 = ‖w‖²``, ``g2 = ‖g‖²``. With momentum ``buffers`` (None where a segment has
    none yet: its sums are 0): ``gm = ⟨g, m⟩``, ``mm = ‖m‖²`` and, ``with_decay_dots``,
    ``gw = ⟨g, w⟩``, ``wm = ⟨w, m⟩`` (on decayed segments). With ``history = (w_prev, h_prev)``
    (None where a segment has none): ``dh2 = ‖Δh‖²``, ``dhdw = ⟨Δh, Δw⟩``,
    ``dw2 = ‖Δw‖²``, with ``Δh = (g + βw) − h_prev``, ``Δw = w − w_prev``. Changes no
    state; ``Δh``, ``Δw`` live in two block-sized scratch buffers.
    """
    device = params[0].device if params else torch.device("cpu")
    sq = {k: BlockSums() for k in ("w2", "g2", "mm", "dh2", "dw2")}
    dots = {k: BlockDots() for k in ("gm", "gw", "wm", "dhdw")}
    scratch: list[torch.Tensor] = []
    for i, (w, g) in enumerate(zip(params, grads)):
        m = buffers[i] if buffers is not None else None
        wp, hp = (history[0][i], history[1][i]) if history is not None else (None, None)
        secant = wp is not None and hp is not None
        arrays = [w, g] + ([m] if m is not None else []) + ([wp, hp] if secant else [])
        for parts in zip(*(blocks(x, block) for x in arrays)):
            wb, gb = parts[0], parts[1]
            sq["w2"].add(i, wb)
            sq["g2"].add(i, gb)
            decayed = with_decay_dots and weight_decays[i] != 0.0  # β·⟨g, w⟩ is 0 where β is
            if decayed:  # ‖h‖² needs ⟨g, w⟩ whether or not a buffer exists yet
                dots["gw"].add_dot(i, gb, wb)
            if m is not None:
                mb = parts[2]
                dots["gm"].add_dot(i, gb, mb)
                sq["mm"].add(i, mb)
                if decayed:
                    dots["wm"].add_dot(i, wb, mb)
            if secant:
                pb, hb = parts[-2], parts[-1]
                if not scratch or scratch[0].numel() < wb.numel() or scratch[0].dtype != wb.dtype:
                    size = wb.numel() if block is None else max(block, wb.numel())
                    scratch = [torch.empty(size, dtype=wb.dtype, device=wb.device) for _ in range(2)]
                dh, dw = (x[: wb.numel()].view_as(wb) for x in scratch)
                torch.add(gb, wb, alpha=weight_decays[i], out=dh)
                dh.sub_(hb)
                torch.sub(wb, pb, out=dw)
                sq["dh2"].add(i, dh)
                sq["dw2"].add(i, dw)
                dots["dhdw"].add_dot(i, dh, dw)  # per-block partial sums, float64 across blocks
        if block is None:
            scratch = []  # off CPU: transient, the caching allocator lends it out again
    n = len(params)
    out = {k: acc.per_segment(n, device) for k, acc in {**sq, **dots}.items()}
    if buffers is None:
        for k in ("gm", "mm", "gw", "wm"):
            del out[k]
    elif not with_decay_dots:
        del out["gw"], out["wm"]
    if history is None:
        for k in ("dh2", "dw2", "dhdw"):
            del out[k]
    return out


def secant_sq_norms(
    params: Tensors,
    grads: Tensors,
    prev_params: Sequence[torch.Tensor | None],
    prev_grads: Sequence[torch.Tensor | None],
    weight_decays: Sequence[float],
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-segment ``(‖w‖², ‖g‖², ‖Δh‖², ‖Δw‖²)``; ``Δ`` is 0 where the history is None.

    ``h = g + βw``. Reads each array once; writes only a block-sized scratch buffer.
    """
    device = params[0].device if params else torch.device("cpu")
    w_sq, g_sq, dh_sq, dw_sq = BlockSums(), BlockSums(), BlockSums(), BlockSums()
    scratch: torch.Tensor | None = None
    for i, (w, g) in enumerate(zip(params, grads)):
        hp, wp = prev_grads[i], prev_params[i]
        if hp is None or wp is None:
            for wb, gb in zip(blocks(w, block), blocks(g, block)):
                w_sq.add(i, wb)
                g_sq.add(i, gb)
            continue
        for wb, gb, hb, pb in zip(*(blocks(x, block) for x in (w, g, hp, wp))):
            if scratch is None or scratch.numel() < wb.numel() or scratch.dtype != wb.dtype:
                scratch = torch.empty(wb.numel() if block is None else max(block, wb.numel()), dtype=wb.dtype,
                                      device=wb.device)
            d = scratch[: wb.numel()].view_as(wb)
            w_sq.add(i, wb)
            g_sq.add(i, gb)
            torch.add(gb, wb, alpha=weight_decays[i], out=d)
            d.sub_(hb)
            dh_sq.add(i, d)
            torch.sub(wb, pb, out=d)
            dw_sq.add(i, d)
        if block is None:
            scratch = None  # off CPU: transient, the caching allocator lends it out again
    n = len(params)
    return (w_sq.per_segment(n, device), g_sq.per_segment(n, device),
            dh_sq.per_segment(n, device), dw_sq.per_segment(n, device))


def heavy_ball_(
    params: Tensors,
    grads: Tensors,
    buffers: Tensors,
    step_sizes: Sequence[float],
    weight_decays: Sequence[float],
    momentum: Sequence[float],
    nesterov: Sequence[bool],
    history: tuple[Tensors, Tensors] | None = None,
    block: int | None = None,
) -> None:
    """Heavy-ball update in place (You, Gitman, Ginsburg 2017), one sweep.

    ``d = g + βw``; ``v ← μv + αd``; ``w ← w − v`` (Nesterov: ``w ← w − (μv + αd)``), with
    ``α`` the segment's step size. With ``history = (w_prev, h_prev)`` the sweep first
    stores ``w_prev ← w`` and ``h_prev ← d`` (the secant's memory) and reuses ``h_prev`` as
    ``d``; without it ``d`` is never materialised.
    """
    for i, (w, g, v) in enumerate(zip(params, grads, buffers)):
        a, b, mu = step_sizes[i], weight_decays[i], momentum[i]
        arrays = [w, g, v] + ([history[0][i], history[1][i]] if history is not None else [])
        for parts in zip(*(blocks(x, block) for x in arrays)):
            wb, gb, vb = parts[:3]
            if history is not None:
                pb, hb = parts[3:]
                pb.copy_(wb)
                torch.add(gb, wb, alpha=b, out=hb)
                vb.mul_(mu).add_(hb, alpha=a)
                if nesterov[i]:
                    wb.sub_(vb, alpha=mu).sub_(hb, alpha=a)
                else:
                    wb.sub_(vb)
                continue
            vb.mul_(mu).add_(gb, alpha=a)
            if b != 0.0:
                vb.add_(wb, alpha=a * b)
            if nesterov[i]:
                # w − (μv + α(g + βw)) = (1 − αβ)w − μv − αg, with the old w on the right
                wb.mul_(1.0 - a * b).sub_(vb, alpha=mu).sub_(gb, alpha=a)
            else:
                wb.sub_(vb)


def projected_heavy_ball_(
    params: Tensors,
    grads: Tensors,
    buffers: Tensors,
    step_sizes: Sequence[float],
    weight_decays: Sequence[float],
    momentum: Sequence[float],
    nesterov: Sequence[bool],
    history: tuple[Tensors, Tensors] | None = None,
    block: int | None = None,
) -> None:
    """CBLR's model step along momentum, one sweep (step size outside the buffer).

    ``h = g + βw``; ``m ← μm + h``; ``w ← w − s m`` (Nesterov: ``w ← w − s(h + μm)``). With
    ``history = (w_prev, h_prev)`` it first stores ``w_prev ← w``, ``h_prev ← h`` and uses
    ``h_prev`` as ``h``.
    """
    for i, (w, g, m) in enumerate(zip(params, grads, buffers)):
        s, b, mu = step_sizes[i], weight_decays[i], momentum[i]
        arrays = [w, g, m] + ([history[0][i], history[1][i]] if history is not None else [])
        for parts in zip(*(blocks(x, block) for x in arrays)):
            wb, gb, mb = parts[:3]
            if history is not None:
                pb, hb = parts[3:]
                pb.copy_(wb)
                torch.add(gb, wb, alpha=b, out=hb)
                mb.mul_(mu).add_(hb)
                if nesterov[i]:
                    wb.sub_(hb, alpha=s).sub_(mb, alpha=s * mu)
                else:
                    wb.sub_(mb, alpha=s)
                continue
            mb.mul_(mu).add_(gb)
            if b != 0.0:
                mb.add_(wb, alpha=b)
            if nesterov[i]:
                # w − s(h + μm) = (1 − sβ)w − s g − sμ m, with the old w on the right
                wb.mul_(1.0 - s * b).sub_(gb, alpha=s).sub_(mb, alpha=s * mu)
            else:
                wb.sub_(mb, alpha=s)
