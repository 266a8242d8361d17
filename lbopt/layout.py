"""Layouts: which slice of which local tensor belongs to which logical layer.

An optimizer step sees *local tensors*: the full parameters on one process or under DDP,
one flat fp32 partition per parameter group under DeepSpeed ZeRO-1/2, concatenated
per-parameter partitions under ZeRO-3. A :class:`Layout` maps every element that belongs to
a model parameter to a *global* layer id (the same on every rank), as a list of
:class:`Segment` s ``(tensor, start, length, layer)``. The statistics engine
(:mod:`lbopt.stats`) sums per layer over segments and all-reduces once when the layout is
sharded, so a layer cut between ranks is summed exactly.

Layouts come from *resolvers*. The dense resolver (one segment per parameter) is built in.
For partitioned tensors an engine adapter hands the optimizer a resolver bound to that
engine's partitions (``optimizer.layout_resolver``, e.g. set by
:func:`lbopt.integrations.deepspeed.bind`); resolvers registered process-wide with
:func:`register_layout_resolver` are asked after it. The core never imports an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "LayerTable",
    "Layout",
    "LayoutResolver",
    "ParamRecord",
    "Segment",
    "dense_layout",
    "register_layout_resolver",
    "resolve_layout",
    "segment_view",
]


@dataclass(frozen=True)
class Segment:
    """``length`` elements of local tensor ``tensor`` from flat offset ``start`` belong to ``layer``.

    ``param`` is the index of the original parameter (in the optimizer's construction order)
    whose elements these are; ``param_offset`` is where the slice starts inside that
    parameter's flattened elements.
    """

    tensor: int
    start: int
    length: int
    layer: int
    param: int
    param_offset: int = 0


@dataclass(frozen=True)
class ParamRecord:
    """One original parameter, in the optimizer's construction order.

    ``numel`` is its logical element count (also when ZeRO-3 has already partitioned it).
    """

    index: int
    name: str
    layer: int
    numel: int


@dataclass
class LayerTable:
    """Global layer metadata, identical on every rank.

    ``adapt[l]``: the layer gets its own layer-wise scale (trust ratio / curvature rate)
    and weight decay; otherwise (an excluded layer: bias, norm weight) its factor is 1 and it
    is not decayed. ``group[l]``: the parameter group all of the layer's tensors belong to.
    """

    names: list[str]
    adapt: list[bool]
    group: list[int]
    params: list[ParamRecord] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.names)


@dataclass
class Layout:
    """Segments of local tensors, plus how to reduce statistics over the data-parallel group.

    ``process_group`` is ``None`` when nothing is sharded (dense, DDP): per-layer sums are
    then complete locally and no communication happens. ``comm_device`` is where the small
    statistics tensor must live for the collective (e.g. ``cuda`` for NCCL while the
    optimizer state is offloaded to CPU); ``None`` means "where the tensors are".
    """

    tensors: list[torch.Tensor]
    segments: list[Segment]
    num_layers: int
    process_group: Any = None
    comm_device: torch.device | None = None
    sharded: bool = False

    def __post_init__(self) -> None:
        self.seg_layer = torch.tensor([s.layer for s in self.segments], dtype=torch.long)

    def views(self, tensors: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Segment views into ``tensors`` (default: the layout's own), aligned with ``segments``.

        ``tensors[i]`` must have the same number of elements as ``self.tensors[i]`` (a
        gradient, a momentum buffer). Views share storage, so in-place ops update the
        underlying tensor.
        """
        source = self.tensors if tensors is None else tensors
        return [segment_view(source[seg.tensor], seg) for seg in self.segments]


def segment_view(tensor: torch.Tensor | None, seg: Segment) -> torch.Tensor:
    """The elements of ``tensor`` that ``seg`` covers (the tensor itself when it covers all)."""
    if tensor is None:
        raise ValueError(f"no tensor for segment of layer {seg.layer} (local tensor {seg.tensor})")
    if seg.start == 0 and seg.length == tensor.numel():
        return tensor
    return tensor.view(-1).narrow(0, seg.start, seg.length)


LayoutResolver = Callable[[LayerTable, list[torch.Tensor]], "Layout | None"]
_RESOLVERS: list[LayoutResolver] = []


def register_layout_resolver(resolver: LayoutResolver) -> LayoutResolver:
    """Register a function ``(layer_table, local_tensors) -> Layout | None``.

    Resolvers are asked, newest first, when an optimizer is handed tensors that are not
    the parameters it was built with (e.g. ZeRO's flat partitions). Returning ``None``
    means "not mine". Usable as a decorator; registering twice is a no-op.
    """
    if resolver not in _RESOLVERS:
        _RESOLVERS.insert(0, resolver)
    return resolver


def dense_layout(table: LayerTable, tensors: list[torch.Tensor], param_index: list[int]) -> Layout:
    """One segment per whole parameter; ``param_index[i]`` is the record index of ``tensors[i]``."""
    segments = [
        Segment(tensor=i, start=0, length=t.numel(), layer=table.params[p].layer, param=p)
        for i, (t, p) in enumerate(zip(tensors, param_index))
    ]
    return Layout(tensors=list(tensors), segments=segments, num_layers=table.num_layers)


def resolve_layout(
    table: LayerTable,
    tensors: list[torch.Tensor],
    originals: dict[int, int],
    resolver: LayoutResolver | None = None,
) -> Layout:
    """Find the layout of ``tensors``.

    ``originals`` maps ``id(param)`` of the construction-time parameters to their record
    index. If every tensor is an original parameter the layout is dense; otherwise
    ``resolver`` (the optimizer's own, from an engine adapter), then the registered
    resolvers are asked. Raises ``RuntimeError`` rather than ever computing layer
    statistics on unknown slices.
    """
    indices = [originals.get(id(t)) for t in tensors]
    if all(i is not None for i in indices):
        return dense_layout(table, tensors, indices)  # type: ignore[arg-type]
    for candidate in ([resolver] if resolver is not None else []) + _RESOLVERS:
        layout = candidate(table, tensors)
        if layout is not None:
            return layout
    shapes = [tuple(t.shape) for t, i in zip(tensors, indices) if i is None][:3]
    raise RuntimeError(
        "lbopt: the optimizer was handed tensors that are not the parameters it was constructed "
        f"with (shapes {shapes}), and no engine adapter recognises them. Layer-wise statistics on "
        "unknown slices would be wrong. If these are DeepSpeed partitions, bind the engine: "
        "lbopt.integrations.deepspeed.initialize(...) instead of deepspeed.initialize, or "
        "lbopt.integrations.deepspeed.bind(engine) right after it, or "
        "lbopt.integrations.deepspeed.install() before it (needed for fp16/bf16 without ZeRO, "
        "Accelerate and the HF Trainer); otherwise construct the optimizer with the parameters "
        "it will update."
    )
