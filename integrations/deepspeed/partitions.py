"""Partition reading: which elements of the tensors DeepSpeed hands the optimizer belong to which parameter.

What DeepSpeed hands an optimizer, per wrapper (the type of ``engine.optimizer``):

- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``) and the **bf16 optimizer** (``BF16_Optimizer``):
  one flat fp32 partition per parameter group and rank. DeepSpeed links every original
  parameter to its fragment of that partition (``param._hp_mapping``: fragment start and
  length in the partition, offset inside the parameter).
- **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``): one flat fp32 buffer per *sub-group*, the
  concatenation of the parameters' partitions (each ``partition_numel()`` long, rank ``r``
  holding elements ``[r·n, r·n+n)`` of the flattened parameter; the tail is padding and
  belongs to no segment).
- **fp16/bf16 without ZeRO** (``FP16_UnfusedOptimizer``): one fp32 copy per parameter.

:func:`read_partitions` is the one function that reads these wrappers' internals (listed in
:mod:`.compat`). :class:`DeepSpeedLayouts` turns its result into lbopt layouts: it is the
layout resolver the binding hands the optimizer (``optimizer.layout_resolver``), so engine
and optimizer meet through that object, not through a process-wide table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lbopt.layout import LayerTable, Layout, Segment
from lbopt.stats import LayerStats

from .compat import WRAPPERS, UnsupportedDeepSpeedConfig, require

__all__ = ["SUPPORTED_WRAPPERS", "DeepSpeedLayouts", "Partition", "Piece", "read_partitions"]

Piece = tuple[int, int, torch.Tensor, int]  # (start in local tensor, length, original param, offset in param)
SUPPORTED_WRAPPERS = tuple(WRAPPERS)


@dataclass(frozen=True)
class Partition:
    """One local tensor the wrapper hands the optimizer, and where its elements come from.

    ``pieces()`` is evaluated when a layout is built (ZeRO-3 reads the rank at that time).
    """

    tensor: torch.Tensor
    pieces: Callable[[], list[Piece]]
    process_group: Any
    where: str


def _hp_pieces(lp_params: list[torch.Tensor]) -> list[Piece]:
    """Fragments of a flat fp32 partition, from DeepSpeed's lp → hp links."""
    out = []
    for lp in lp_params:
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is None:
            continue
        hp, lp_addr = mapping.hp_fragment_address, mapping.lp_fragment_address
        out.append((int(hp.start), int(hp.numel), lp, int(lp_addr.start)))
    return out


def _zero3_pieces(params: list[torch.Tensor], group: Any) -> list[Piece]:
    """Segments of a ZeRO-3 sub-group buffer: concatenated ``ds_tensor`` partitions."""
    rank = dist.get_rank(group=group)
    out, offset = [], 0
    for p in params:
        size = int(p.partition_numel())
        length = max(0, min(size, int(p.ds_numel) - rank * size))
        if length:
            out.append((offset, length, p, rank * size))
        offset += size
    return out


def _whole(lp: torch.Tensor) -> list[Piece]:
    return [(0, lp.numel(), lp, 0)]


def read_partitions(wrapper: Any, stage: int) -> list[Partition]:
    """The partitions of DeepSpeed optimizer ``wrapper`` (``engine.optimizer``) under ZeRO ``stage``.

    Raises :class:`UnsupportedDeepSpeedConfig` for a wrapper lbopt cannot map, and
    :class:`.compat.DeepSpeedVersionError` when the wrapper lacks a member it reads.
    """
    kind = type(wrapper).__name__
    if kind not in WRAPPERS:
        raise UnsupportedDeepSpeedConfig(
            f"lbopt: DeepSpeed wrapped the optimizer in {kind}, whose tensors lbopt cannot map to layers; "
            f"supported: {', '.join(SUPPORTED_WRAPPERS)}"
        )
    require(wrapper, WRAPPERS[kind])
    if kind == "DeepSpeedZeroOptimizer":
        return [
            Partition(flat, functools.partial(_hp_pieces, wrapper.bit16_groups[i]), wrapper.real_dp_process_group[i],
                      f"ZeRO-{stage} fp32 partition of group {i}")
            for i, flat in enumerate(wrapper.single_partition_of_fp32_groups)
        ]
    if kind == "BF16_Optimizer":
        return [
            Partition(flat, functools.partial(_hp_pieces, wrapper.bf16_groups[i]), wrapper.real_dp_process_group[i],
                      f"bf16 fp32 partition of group {i}")
            for i, flat in enumerate(wrapper.fp32_groups_flat_partition)
        ]
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        groups = getattr(wrapper, "sub_group_process_groups", None)  # newer releases: one group per sub-group
        out = []
        for s, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            group = groups[s] if groups is not None else wrapper.dp_process_group
            out.append(Partition(flat, functools.partial(_zero3_pieces, wrapper.fp16_groups[s], group), group,
                                 f"ZeRO-3 fp32 partition of sub-group {s}"))
        return out
    return [  # FP16_UnfusedOptimizer: whole fp32 master copies, nothing sharded
        Partition(hp, functools.partial(_whole, lp), None, f"fp32 master copy {j} of group {i}")
        for i, (hp_group, lp_group) in enumerate(zip(wrapper.fp32_groups, wrapper.fp16_groups))
        for j, (hp, lp) in enumerate(zip(hp_group, lp_group))
    ]


def _comm_device(tensor: torch.Tensor, group: Any) -> torch.device | None:
    """Where the statistics must go for the collective (CPU-offloaded state with NCCL)."""
    if group is None or tensor.device.type != "cpu":
        return None
    if dist.get_backend(group) in ("gloo", "mpi"):
        return None
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


class DeepSpeedLayouts:
    """Layout resolver for one engine's partitions: ``(layer_table, tensors) -> Layout | None``.

    Recognises exactly the tensors of the partitions it was built with (``None`` for any
    other tensor set). The first layout of each tensor set is checked for coverage: every
    parameter in the step is covered exactly once over the ranks (one all-reduce).
    """

    def __init__(self, partitions: list[Partition]) -> None:
        self._parts = {id(p.tensor): p for p in partitions}
        self.num_partitions = len(partitions)

    def __repr__(self) -> str:
        return f"DeepSpeedLayouts({self.num_partitions} partitions)"

    def __reduce__(self) -> tuple[Any, tuple]:
        # A copy of the optimizer (deepcopy, pickle) is not bound to this engine's partitions.
        return (_unbound, ())

    def partition_of(self, tensor: torch.Tensor) -> Partition | None:
        part = self._parts.get(id(tensor))
        return part if part is not None and part.tensor is tensor else None

    def __call__(self, table: LayerTable, tensors: list[torch.Tensor]) -> Layout | None:
        parts = [self.partition_of(t) for t in tensors]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            shapes = [tuple(t.shape) for t, p in zip(tensors, parts) if p is None][:3]
            raise RuntimeError(f"lbopt: one optimizer step mixes DeepSpeed partitions with unknown tensors {shapes}")
        known: list[Partition] = parts  # type: ignore[assignment]
        if len({id(p.process_group) for p in known}) > 1:
            raise UnsupportedDeepSpeedConfig(
                "lbopt: the partitions of one step belong to different process groups "
                f"({', '.join(p.where for p in known)}); MoE expert groups are not supported"
            )
        index = {id(p): r.index for p, r in zip(table.originals, table.params)}  # type: ignore[attr-defined]
        segments = []
        for ti, (tensor, part) in enumerate(zip(tensors, known)):
            for start, length, param, offset in part.pieces():
                rec = index.get(id(param))
                if rec is None:
                    shape = tuple(getattr(param, "ds_shape", param.shape))
                    raise RuntimeError(
                        f"lbopt: {part.where} holds a parameter (shape {shape}) that the optimizer was not "
                        "constructed with"
                    )
                if start < 0 or start + length > tensor.numel():
                    raise RuntimeError(f"lbopt: fragment [{start}, {start + length}) outside {part.where}")
                segments.append(Segment(ti, start, length, table.params[rec].layer, rec, offset))
        group = known[0].process_group
        sharded = group is not None and dist.get_world_size(group=group) > 1
        layout = Layout(
            tensors=list(tensors),
            segments=segments,
            num_layers=table.num_layers,
            process_group=group if sharded else None,
            comm_device=_comm_device(tensors[0], group) if sharded else None,
            sharded=sharded,
        )
        check_coverage(table, layout, [p.where for p in known])
        return layout


def _unbound() -> None:
    return None


def check_coverage(table: LayerTable, layout: Layout, where: list[str]) -> None:
    """Every parameter in the step is covered exactly once over the ranks, every layer whole.

    The per-parameter element counts are summed over the ranks by the statistics engine's
    own reduction (:meth:`lbopt.stats.LayerStats.all_reduce`), so they travel exactly as the
    step's statistics will.
    """
    device = layout.tensors[0].device if layout.tensors else torch.device("cpu")
    counts = torch.zeros(len(table.params), dtype=torch.float64, device=device)
    for s in layout.segments:
        counts[s.param] += s.length
    counts = LayerStats(layout).all_reduce(counts).cpu()
    numel = [_numel(p) for p in table.originals]  # type: ignore[attr-defined]
    present_layers = {rec.layer for i, rec in enumerate(table.params) if int(counts[i])}
    for i, rec in enumerate(table.params):
        c = int(counts[i])
        if c and c != numel[i]:
            raise RuntimeError(
                f"lbopt: DeepSpeed partitions cover {c} of the {numel[i]} elements of parameter {rec.name!r} "
                f"({', '.join(sorted(set(where)))}); refusing to compute layer statistics on slices"
            )
        if not c and rec.layer in present_layers and numel[i] > 0:
            raise RuntimeError(
                f"lbopt: layer {table.names[rec.layer]!r} is split over several optimizer steps (parameter "
                f"{rec.name!r} is missing); keep a layer's tensors in one parameter group"
            )
