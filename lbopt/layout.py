"""Layouts: which slice of which local tensor belongs to which logical layer.

An optimizer step sees *local tensors*: the full parameters on one process or under DDP,
one flat fp32 partition per parameter group under DeepSpeed ZeRO-1/2, concatenated
per-parameter partitions under ZeRO-3. A :class:`Layout` maps every element that belongs to
a model parameter to a *global* layer id (the same on every rank), as a list of
:class:`Segment` s ``(tensor, start, length, layer)``. The statistics engine
(:mod:`lbopt.stats`) sums per layer over segments and all-reduces once when the layout is
sharded, so a layer cut between ranks is summed exactly.

Layouts come from *resolvers*. Two are built in: the dense one (one segment per parameter)
and :func:`dtensor_layout` for torch's own sharded tensors (``DTensor``: FSDP2's
``fully_shard`` and HSDP), whose local shard and global offset torch states itself. For
other partitioned tensors an engine adapter hands the optimizer a resolver bound to that
engine's partitions (``optimizer.layout_resolver``, e.g. set by
:func:`lbopt.integrations.deepspeed.bind` or :func:`lbopt.integrations.fsdp.bind_fsdp1`);
it is asked first. Resolvers registered process-wide with :func:`register_layout_resolver`
are asked last. The core never imports an engine.

A layout's ``tensors`` are the objects the optimizer keys its state on (parameters,
DTensors, flat partitions); :func:`segment_view` and :meth:`Layout.views` always return
plain local tensors, so the statistics engine and the rules never see a ``DTensor``.
"""

from __future__ import annotations

import math
import sys
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
    "UnsupportedShardingError",
    "dense_layout",
    "dtensor_layout",
    "local_tensor",
    "register_layout_resolver",
    "replaced_parameters",
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

    ``shape`` and ``numel`` are its logical shape and element count (also when ZeRO-3 has
    already partitioned it); engine adapters check partitions against them.
    """

    index: int
    name: str
    layer: int
    numel: int
    shape: tuple[int, ...]


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
    """The local elements of ``tensor`` that ``seg`` covers (the local tensor itself when it covers all).

    A ``DTensor`` (a parameter, its gradient or a state buffer shaped like it) is read
    through its rank-local shard, so the view is always a plain tensor sharing storage.
    """
    if tensor is None:
        raise ValueError(f"no tensor for segment of layer {seg.layer} (local tensor {seg.tensor})")
    tensor = local_tensor(tensor)
    if seg.start == 0 and seg.length == tensor.numel():
        return tensor
    return tensor.view(-1).narrow(0, seg.start, seg.length)


def _dtensor_class() -> type | None:
    """torch's ``DTensor`` class if ``torch.distributed.tensor`` is loaded (a DTensor exists only then)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of ``tensor``: a ``DTensor``'s shard (storage shared), any other tensor itself."""
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor._local_tensor  # what DTensor.to_local() returns without autograd
    return tensor


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
    index. ``resolver`` is the resolver an engine adapter bound to this optimizer (DeepSpeed
    partitions, FSDP1 shard views); it is asked first, and must return ``None`` for tensors
    it does not know. Then: FSDP1 FlatParameters are refused; if every tensor is an original
    parameter the layout is dense (:func:`dtensor_layout` for DTensors); otherwise the
    registered resolvers are asked. Raises ``RuntimeError`` rather than ever computing layer
    statistics on unknown slices.
    """
    if resolver is not None:
        layout = resolver(table, tensors)
        if layout is not None:
            return layout
    flat = [t for t in tensors if getattr(t, "_is_flat_param", False)]
    if flat:
        raise UnsupportedShardingError(
            "lbopt: the optimizer holds FSDP FlatParameters (FullyShardedDataParallel with "
            "use_orig_params=False): each flattens several layers, so per-layer statistics on it "
            "would be wrong. Wrap with use_orig_params=True (Accelerate: fsdp_use_orig_params: true) "
            "and bind the model with lbopt.integrations.fsdp.bind_fsdp1(optimizer, model), or shard "
            "with FSDP2 (torch.distributed.fsdp.fully_shard), which needs no binding."
        )
    indices = [originals.get(id(t)) for t in tensors]
    if all(i is not None for i in indices):
        dtensor = _dtensor_class()
        if dtensor is not None and any(isinstance(t, dtensor) for t in tensors):
            return dtensor_layout(table, tensors, indices)  # type: ignore[arg-type]
        return dense_layout(table, tensors, indices)  # type: ignore[arg-type]
    for candidate in _RESOLVERS:
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


def replaced_parameters(table: LayerTable, current: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """The parameters that replaced the construction-time ones one for one, or ``None``.

    Accelerate's FSDP2 route builds the optimizer on the full model, shards it with
    ``fully_shard`` and then swaps every entry of ``param_groups`` for the parameter's
    ``DTensor``. ``current`` (the tensors of each group now) replaces ``table.originals``
    when it has the same number of tensors in the same order, and every tensor that
    differs is a DTensor of the replaced parameter's full shape; any other change (ZeRO's flat
    partitions, a different model) returns ``None`` and is left to the resolvers.
    """
    dtensor = _dtensor_class()
    flat = [t for group in current for t in group]
    originals = table.originals  # type: ignore[attr-defined]
    if dtensor is None or len(flat) != len(originals):
        return None
    changed = False
    for new, old, rec in zip(flat, originals, table.params):
        if new is old:
            continue
        if not (isinstance(new, dtensor) and tuple(new.shape) == tuple(old.shape) and new.numel() == rec.numel):
            return None
        changed = True
    return flat if changed else None


# --------------------------------------------------------------------------- DTensor (FSDP2, HSDP)
class UnsupportedShardingError(RuntimeError):
    """Parameters sharded in a way whose per-layer sums lbopt cannot reduce exactly."""


def _shard_mesh_dim(tensor: Any, name: str) -> int | None:
    """The one mesh dimension ``tensor`` is sharded over (``None``: replicated everywhere)."""
    shard_dims = []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            shard_dims.append(dim)
        elif not placement.is_replicate():
            raise UnsupportedShardingError(
                f"lbopt: parameter {name!r} is a DTensor with placement {placement} on mesh dimension {dim}; "
                "only Shard and Replicate placements describe a parameter (a Partial one is a pending reduction)"
            )
    if len(shard_dims) > 1:
        raise UnsupportedShardingError(
            f"lbopt: parameter {name!r} is sharded over {len(shard_dims)} mesh dimensions "
            f"({tensor.placements}); lbopt supports one sharded dimension: FSDP2 (fully_shard on a 1-D "
            "mesh) and HSDP (a 2-D mesh that replicates across its first and shards within its second "
            "dimension). Tensor or sequence parallelism combined with FSDP is not supported."
        )
    return shard_dims[0] if shard_dims else None


def _flat_offset(shape: Sequence[int], offset: Sequence[int]) -> int:
    """Flat position of index ``offset`` in a contiguous tensor of ``shape``."""
    flat, stride = 0, 1
    for size, off in zip(reversed(shape), reversed(offset)):
        flat += off * stride
        stride *= size
    return flat


def dtensor_layout(table: LayerTable, tensors: list[torch.Tensor], param_index: list[int]) -> Layout:
    """Layout of ``DTensor`` parameters: one segment per local shard, reduced over the shard mesh dimension.

    FSDP2 (``fully_shard``) shards every parameter on dim 0 of a 1-D mesh; rank ``r`` holds rows
    ``[r·⌈d₀/W⌉, min((r+1)·⌈d₀/W⌉, d₀))`` (possibly none: uneven shards, padding outside the
    view). Each local shard becomes ``Segment(tensor=i, start=0, length=local numel, layer,
    param, param_offset=global flat offset)``. HSDP replicates across one mesh dimension and
    shards within the other: the sums are reduced over the shard dimension only, since every
    replica holds the same numbers. The layout is sharded when that dimension has more than one
    rank, so the statistics engine adds one all-reduce per statistics round and the rules only
    ever see plain local tensors.

    Raises :class:`UnsupportedShardingError` for tensors mixing DTensors with plain tensors,
    different meshes or shard dimensions, Partial placements or several sharded dimensions.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dtensor = _dtensor_class()
    names = [table.params[p].name for p in param_index]
    plain = [n for t, n in zip(tensors, names) if not isinstance(t, dtensor)]  # type: ignore[arg-type]
    if plain:
        raise UnsupportedShardingError(
            f"lbopt: one optimizer step mixes DTensor parameters with plain tensors ({plain[:3]}); per-layer "
            "sums would count the plain (replicated) tensors once per rank. Shard the whole model with "
            "fully_shard (apply it to the root module too) or keep these parameters in another optimizer."
        )
    mesh = tensors[0].device_mesh  # type: ignore[attr-defined]
    dim = _shard_mesh_dim(tensors[0], names[0])
    segments = []
    for i, (t, p, name) in enumerate(zip(tensors, param_index, names)):
        if t.device_mesh != mesh or _shard_mesh_dim(t, name) != dim:  # type: ignore[attr-defined]
            raise UnsupportedShardingError(
                f"lbopt: parameter {name!r} is placed {t.placements} on {t.device_mesh}, parameter "  # type: ignore[attr-defined]
                f"{names[0]!r} {tensors[0].placements} on {mesh}; one optimizer needs one mesh and one "  # type: ignore[attr-defined]
                "sharded mesh dimension for all its parameters"
            )
        local = local_tensor(t)
        shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)  # type: ignore[attr-defined]
        if tuple(local.shape) != tuple(shape) or not local.is_contiguous():
            raise UnsupportedShardingError(
                f"lbopt: the local shard of {name!r} has shape {tuple(local.shape)} (contiguous: "
                f"{local.is_contiguous()}), its placements say {tuple(shape)}; refusing to compute layer "
                "statistics on it"
            )
        param_offset = _flat_offset(t.shape, offset) if math.prod(shape) else 0
        segments.append(Segment(i, 0, local.numel(), table.params[p].layer, p, param_offset))
    sharded = dim is not None and mesh.size(dim) > 1
    first = local_tensor(tensors[0])
    comm = None
    if sharded and first.device.type == "cpu" and mesh.device_type != "cpu":
        comm = torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
    return Layout(
        tensors=list(tensors),
        segments=segments,
        num_layers=table.num_layers,
        process_group=mesh.get_group(dim) if sharded else None,
        comm_device=comm,
        sharded=sharded,
    )
