"""The statistics engine: exact per-layer sums over a (possibly sharded) layout.

For every requested quantity (‖x‖² of a list of tensors, or ⟨x, y⟩) the engine

1. computes one partial sum per segment: squared norms with the batched
   ``torch._foreach_norm`` kernel, inner products with one ``torch.dot`` per segment
   (torch has no batched dot),
2. adds segments into a ``[num_stats, num_layers]`` tensor by global layer id,
3. all-reduces that tensor (SUM) once over the data-parallel group when the layout is
   sharded, and does nothing more when it is not.

Because layer ids are global, a layer whose elements are spread over several ranks gets
exactly the dense sum (up to floating-point summation order). Each segment's partial sum
is taken in ``promote_types(dtype, float32)`` (float32 for fp32/bf16/fp16 tensors, float64 for
float64 ones) and carried in float64, so that the order of partial sums does not matter at
the tensors' own tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lbopt.layout import Layout

__all__ = ["LayerStats", "Quantity", "accumulation_dtype", "dot", "sq_norm", "sq_norm_now"]

_STAT_DTYPE = torch.float64


@dataclass(frozen=True)
class Quantity:
    """One per-layer sum to compute: ``Σ x·y`` over each layer's elements (``y is None``: ``Σ x²``).

    ``segments``: when given, ``x`` (and ``y``) hold views for only these segment indices;
    the others contribute 0.
    """

    x: Sequence[torch.Tensor]
    y: Sequence[torch.Tensor] | None = None
    segments: Sequence[int] | None = None
    values: torch.Tensor | None = None  # per-segment sums already computed (see ``sq_norm_now``)


def sq_norm(views: Sequence[torch.Tensor], segments: Sequence[int] | None = None) -> Quantity:
    """Per-layer squared L2 norm ``Σ_{i∈l} x_i²``."""
    return Quantity(views, None, segments)


def sq_norm_now(views: Sequence[torch.Tensor], segments: Sequence[int] | None = None) -> Quantity:
    """Like :func:`sq_norm`, but evaluated now, so ``views`` may be reused right after."""
    return Quantity((), None, segments, _segment_sq_norms(views))


def dot(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Quantity:
    """Per-layer inner product ``Σ_{i∈l} x_i y_i``."""
    return Quantity(x, y)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """``promote_types`` of the tensors' dtypes and float32: where partial sums are taken."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _segment_sq_norms(views: Sequence[torch.Tensor]) -> torch.Tensor:
    if not views:
        return torch.zeros(0, dtype=_STAT_DTYPE)
    norms = torch._foreach_norm(list(views), 2, dtype=accumulation_dtype(*views))
    return torch.stack(norms).to(_STAT_DTYPE).square()


def _segment_dots(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    if not x:
        return torch.zeros(0, dtype=_STAT_DTYPE)
    prods = []
    for a, b in zip(x, y):
        dtype = accumulation_dtype(a, b)
        prods.append(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)).to(_STAT_DTYPE))
    return torch.stack(prods)


class LayerStats:
    """Per-layer sums for one layout. Construct once per layout; call :meth:`sums` per step."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        first = layout.tensors[0] if layout.tensors else None
        self.device = first.device if first is not None else torch.device("cpu")
        self._seg_layer = layout.seg_layer.to(self.device)
        self._seg_len = torch.tensor(
            [s.length for s in layout.segments], dtype=_STAT_DTYPE, device=self.device
        )

    def sums(self, quantities: Sequence[Quantity], with_count: bool = True) -> torch.Tensor:
        """Return ``[len(quantities) (+1), num_layers]`` global per-layer sums.

        With ``with_count`` the last row is the number of elements each layer has across
        all ranks in this call (0 for layers absent from it), so callers can tell which
        layers took part. One all-reduce in total, none when the layout is not sharded.
        """
        rows = []
        num_segments = len(self.layout.segments)
        for q in quantities:
            if q.values is not None:
                row = q.values
            else:
                row = _segment_sq_norms(q.x) if q.y is None else _segment_dots(q.x, q.y)
            if q.segments is not None:
                full = torch.zeros(num_segments, dtype=_STAT_DTYPE, device=row.device)
                if len(q.segments):
                    full[torch.tensor(list(q.segments), dtype=torch.long, device=row.device)] = row
                row = full
            rows.append(row)
        if with_count:
            rows.append(self._seg_len)
        num_layers = self.layout.num_layers
        out = torch.zeros(len(rows), num_layers, dtype=_STAT_DTYPE, device=self.device)
        if self.layout.segments:
            per_segment = torch.stack([r.to(self.device) for r in rows])
            out.index_add_(1, self._seg_layer, per_segment)
        return self.all_reduce(out)

    def all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """SUM-reduce ``stats`` over the layout's process group (no-op when unsharded)."""
        if not self.layout.sharded:
            return stats
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("lbopt: layout is sharded but torch.distributed is not initialised")
        comm = self.layout.comm_device
        buf = stats if comm is None or comm == stats.device else stats.to(comm)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.layout.process_group)
        return buf if buf is stats else buf.to(stats.device)
