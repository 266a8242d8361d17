"""DeepSpeed adapter: exact layer statistics on ZeRO partitions, config names, one step over all groups.

What DeepSpeed hands an optimizer, and how lbopt maps it back to layers:

- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``) and the **bf16 optimizer** (``BF16_Optimizer``):
  one flat fp32 partition per parameter group and rank. DeepSpeed links every original
  parameter to its fragment of that partition (``param._hp_mapping``: fragment start and
  length in the partition, offset inside the parameter); each fragment becomes a
  :class:`lbopt.layout.Segment` with the parameter's global layer id.
- **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``): one flat fp32 buffer per *sub-group*, the
  concatenation of the parameters' partitions ``param.ds_tensor`` (each
  ``partition_numel()`` long, rank ``r`` holding elements ``[r·n, r·n+n)`` of the flattened
  parameter; the tail is padding and belongs to no segment).
- **fp16/bf16 without ZeRO** (``FP16_UnfusedOptimizer``): one fp32 copy per parameter,
  not sharded.

Layouts under ZeRO are ``sharded`` over the ZeRO data-parallel group, so the statistics
engine adds one small all-reduce per step. The first time a layout is built, the adapter
checks (one more all-reduce) that every parameter taking part is covered exactly once over
the ranks, so a mapping error can never silently produce statistics on slices.

DeepSpeed calls ``optimizer.step()`` once per parameter group (ZeRO-1/2) or sub-group
(ZeRO-3). Methods whose statistics combine groups (``needs_all_groups``: MCLR's median,
a global norm) and ZeRO-3 groups split into several sub-groups instead get one ``step()``
over everything: calls for earlier groups only keep their gradient, the last call steps
all groups and then refreshes the low-precision partitions of the earlier ones.

:func:`install` (run automatically when ``deepspeed`` is imported after ``lbopt``) also
makes ``"optimizer": {"type": "CBLR"}`` (and every name in :mod:`lbopt.registry`) a valid
DeepSpeed optimizer that needs no ``zero_allow_untested_optimizer``. ``"LAMB"`` then means
``lbopt.LAMB`` (exact under ZeRO); DeepSpeed's own fused LAMB stays available as
``"FusedLamb"``. Unsupported set-ups (pipeline or tensor parallelism, MoE expert groups,
ZeRO++ hpZ, ZenFlow, NVMe optimizer swapping with cross-group steps) raise a clear error.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lbopt.layout import LayerTable, Layout, Segment, register_layout_resolver

__all__ = [
    "UnsupportedDeepSpeedConfig", "adapt_engine", "install", "lbopt_optimizer_class", "to_universal", "zero_layout",
]

Piece = tuple[int, int, torch.Tensor, int]  # (start in local tensor, length, original param, offset in param)


class UnsupportedDeepSpeedConfig(RuntimeError):
    """A DeepSpeed set-up whose partitions lbopt cannot map to layers exactly."""


# --------------------------------------------------------------------------- partitions
@dataclass
class _Partition:
    """One local tensor an engine hands the optimizer, and where its elements come from."""

    ref: weakref.ref
    pieces: Callable[[], list[Piece]]
    process_group: Any
    world_size: int
    where: str


_PARTITIONS: dict[int, _Partition] = {}


def _register(tensor: torch.Tensor, pieces: Callable[[], list[Piece]], group: Any, where: str) -> None:
    for key in [k for k, v in _PARTITIONS.items() if v.ref() is None]:
        del _PARTITIONS[key]
    world = dist.get_world_size(group=group) if group is not None else 1
    _PARTITIONS[id(tensor)] = _Partition(weakref.ref(tensor), pieces, group, world, where)


def _lookup(tensor: torch.Tensor) -> _Partition | None:
    part = _PARTITIONS.get(id(tensor))
    if part is None or part.ref() is not tensor:
        return None
    return part


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


# --------------------------------------------------------------------------- the resolver
@register_layout_resolver
def zero_layout(table: LayerTable, tensors: list[torch.Tensor]) -> Layout | None:
    """Layout of DeepSpeed partitions (``None`` if these tensors are not DeepSpeed's)."""
    parts = [_lookup(t) for t in tensors]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise RuntimeError(
            "lbopt: one optimizer step mixes DeepSpeed partitions with unknown tensors "
            f"(shapes {[tuple(t.shape) for t, p in zip(tensors, parts) if p is None][:3]})"
        )
    index = {id(p): r.index for p, r in zip(table.originals, table.params)}  # type: ignore[attr-defined]
    segments: list[Segment] = []
    groups = {id(p.process_group): p for p in parts}  # type: ignore[union-attr]
    if len(groups) > 1:
        raise UnsupportedDeepSpeedConfig(
            "lbopt: the partitions of one step belong to different process groups "
            f"({', '.join(p.where for p in parts)}); MoE expert groups are not supported"  # type: ignore[union-attr]
        )
    part0 = parts[0]
    for ti, (tensor, part) in enumerate(zip(tensors, parts)):
        for start, length, param, offset in part.pieces():  # type: ignore[union-attr]
            rec = index.get(id(param))
            if rec is None:
                raise RuntimeError(
                    f"lbopt: {part.where} holds a parameter (shape {tuple(getattr(param, 'ds_shape', param.shape))}) "  # type: ignore[union-attr]
                    "that the optimizer was not constructed with"
                )
            if start < 0 or start + length > tensor.numel():
                raise RuntimeError(f"lbopt: fragment [{start}, {start + length}) outside {part.where}")  # type: ignore[union-attr]
            segments.append(Segment(ti, start, length, table.params[rec].layer, rec, offset))
    sharded = part0.process_group is not None and part0.world_size > 1  # type: ignore[union-attr]
    layout = Layout(
        tensors=list(tensors),
        segments=segments,
        num_layers=table.num_layers,
        process_group=part0.process_group if sharded else None,  # type: ignore[union-attr]
        comm_device=_comm_device(tensors[0], part0.process_group) if sharded else None,  # type: ignore[union-attr]
        sharded=sharded,
    )
    _check_coverage(table, layout, [p.where for p in parts])  # type: ignore[union-attr]
    return layout


def _check_coverage(table: LayerTable, layout: Layout, where: list[str]) -> None:
    """Every parameter in the step is covered exactly once over the ranks, every layer whole."""
    counts = torch.zeros(len(table.params), dtype=torch.float64)
    for s in layout.segments:
        counts[s.param] += s.length
    if layout.sharded:  # on the device the collective needs (NCCL: the accelerator)
        device = layout.comm_device or (layout.tensors[0].device if layout.tensors else torch.device("cpu"))
        buf = counts.to(device)
        dist.all_reduce(buf, group=layout.process_group)
        counts = buf.cpu()
    numel = [_numel(p) for p in table.originals]  # type: ignore[attr-defined]
    present_layers = set()
    for i, rec in enumerate(table.params):
        c = int(counts[i])
        if c:
            present_layers.add(rec.layer)
            if c != numel[i]:
                raise RuntimeError(
                    f"lbopt: DeepSpeed partitions cover {c} of the {numel[i]} elements of parameter "
                    f"{rec.name!r} ({', '.join(sorted(set(where)))}); refusing to compute layer statistics "
                    "on slices"
                )
    for i, rec in enumerate(table.params):
        if rec.layer in present_layers and int(counts[i]) == 0 and numel[i] > 0:
            raise RuntimeError(
                f"lbopt: layer {table.names[rec.layer]!r} is split over several optimizer steps "
                f"(parameter {rec.name!r} is missing); keep a layer's tensors in one parameter group"
            )


# --------------------------------------------------------------------------- engine adaptation
def _is_lbopt(optimizer: Any) -> bool:
    from lbopt.optim.base import LayerwiseOptimizer

    return isinstance(optimizer, LayerwiseOptimizer) or type(optimizer).__module__.startswith("lbopt.")


def _check_supported(engine: Any) -> None:
    def refuse(what: str) -> None:
        raise UnsupportedDeepSpeedConfig(
            f"lbopt: {what} is not supported with lbopt optimizers: their per-layer statistics would be "
            "computed on slices the adapter cannot map to layers. Supported: ZeRO stages 0-3 with data "
            "parallelism, with or without CPU optimizer offload, fp32 or bf16 (fp16 uses the same wrappers)."
        )

    if getattr(engine, "pipeline_parallelism", False):
        refuse("pipeline parallelism (PipelineModule)")
    if getattr(engine, "has_moe_layers", False):
        refuse("Mixture-of-Experts expert groups")
    mpu = getattr(engine, "mpu", None)
    if mpu is not None and hasattr(mpu, "get_model_parallel_world_size") and mpu.get_model_parallel_world_size() > 1:
        refuse("tensor/model parallelism (mpu with model parallel size > 1)")
    autotp = getattr(engine, "autotp_size", None)
    if callable(autotp) and (autotp() or 0) > 1:
        refuse("AutoTP tensor parallelism")
    hpz = getattr(engine, "zero_hpz_partition_size", None)
    if engine.zero_optimization_stage() == 3 and callable(hpz) and hpz() > 1:
        refuse("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)")
    if getattr(engine, "zenflow", False):
        refuse("ZenFlow")


def adapt_engine(engine: Any) -> None:
    """Register the partitions of ``engine``'s optimizer; install the all-groups step where needed.

    Called by :func:`install`'s hook right after DeepSpeed configured the optimizer; a no-op
    unless the basic optimizer is an lbopt optimizer.
    """
    basic = getattr(engine, "basic_optimizer", None)
    if basic is None or not _is_lbopt(basic):
        return
    _check_supported(engine)
    wrapper = engine.optimizer
    kind = type(wrapper).__name__
    if wrapper is basic:
        return  # fp32 without ZeRO: the optimizer steps the parameters themselves
    _install_universal_load(wrapper, basic)
    if kind == "DeepSpeedZeroOptimizer":
        stage = engine.zero_optimization_stage()
        for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
            _register(
                flat,
                functools.partial(_hp_pieces, wrapper.bit16_groups[i]),
                wrapper.real_dp_process_group[i],
                f"ZeRO-{stage} fp32 partition of group {i}",
            )
        if _wants_all_groups(basic, len(wrapper.single_partition_of_fp32_groups), 1):
            _install_all_groups_stage12(wrapper, basic)
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        n_sub = len(wrapper.fp32_partitioned_groups_flat)
        for s, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            group = wrapper.sub_group_process_groups[s] if hasattr(wrapper, "sub_group_process_groups") else (
                wrapper.dp_process_group
            )
            _register(
                flat,
                functools.partial(_zero3_pieces, wrapper.fp16_groups[s], group),
                group,
                f"ZeRO-3 fp32 partition of sub-group {s}",
            )
        per_group: dict[int, int] = {}
        for s in range(n_sub):
            gid = wrapper.sub_group_to_group_id[s]
            per_group[gid] = per_group.get(gid, 0) + 1
        if _wants_all_groups(basic, len(per_group), max(per_group.values(), default=1)):
            _install_all_groups_stage3(wrapper, basic)
    elif kind == "BF16_Optimizer":
        for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
            _register(
                flat,
                functools.partial(_hp_pieces, wrapper.bf16_groups[i]),
                wrapper.real_dp_process_group[i],
                f"bf16 fp32 partition of group {i}",
            )
    elif kind == "FP16_UnfusedOptimizer":
        for i, (fp32_group, lp_group) in enumerate(zip(wrapper.fp32_groups, wrapper.fp16_groups)):
            for j, (hp, lp) in enumerate(zip(fp32_group, lp_group)):
                _register(hp, functools.partial(lambda lp_: [(0, lp_.numel(), lp_, 0)], lp), None,
                          f"fp32 master copy {j} of group {i}")
    else:
        raise UnsupportedDeepSpeedConfig(
            f"lbopt: DeepSpeed wrapped the optimizer in {kind}, whose tensors lbopt cannot map to layers; "
            "supported: DeepSpeedZeroOptimizer (ZeRO-1/2), DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, "
            "FP16_UnfusedOptimizer"
        )


def _wants_all_groups(optimizer: Any, num_groups: int, max_calls_per_group: int) -> bool:
    return (getattr(optimizer, "needs_all_groups", False) and num_groups > 1) or max_calls_per_group > 1


def _install_all_groups_stage12(zo: Any, optimizer: Any) -> None:
    """ZeRO-1/2: defer per-group steps to the last group, then step all groups at once."""
    if getattr(zo, "torch_autocast_gradscaler", None) or getattr(zo, "zenflow", False):
        raise UnsupportedDeepSpeedConfig(
            f"lbopt: {type(optimizer).__name__} needs one step over all parameter groups, which is not "
            "supported together with torch_autocast's GradScaler or ZenFlow"
        )
    flats = zo.single_partition_of_fp32_groups
    last = len(flats) - 1
    pending: dict[int, torch.Tensor | None] = {}

    def _optimizer_step(group_no: int) -> None:
        if group_no == 0:
            pending.clear()
        if group_no < last:
            pending[group_no] = flats[group_no].grad  # DeepSpeed drops .grad after this call
            return
        saved = {g: flats[g].grad for g in pending}
        for g, grad in pending.items():
            flats[g].grad = grad
        try:
            optimizer.step()  # param_groups holds every group: DeepSpeed's narrowing is bypassed
        finally:
            for g, grad in saved.items():
                flats[g].grad = grad
        zo._lazy_init_hp_params_optimizer_state()
        for g in pending:  # DeepSpeed already copied these groups' (then unchanged) fp32 to bit16
            pid = dist.get_rank(group=zo.real_dp_process_group[g])
            bit16 = zo.parallel_partitioned_bit16_groups[g][pid]
            if zo.cpu_offload:
                buffer = zo.param_buffer_of_bit16_for_cpu_offload_groups[g]
                buffer.data.copy_(flats[g].data)
                bit16.data.copy_(buffer.data)
            else:
                bit16.data.copy_(flats[g].data)
        pending.clear()

    zo._optimizer_step = _optimizer_step
    zo._lbopt_all_groups = True


def _install_all_groups_stage3(zo: Any, optimizer: Any) -> None:
    """ZeRO-3: defer sub-group steps to the last sub-group, then one step over all of them."""
    if getattr(zo, "torch_autocast_gradscaler", None) or getattr(zo, "zenflow", False):
        raise UnsupportedDeepSpeedConfig(
            f"lbopt: {type(optimizer).__name__} needs one step over all parameter groups, which is not "
            "supported together with torch_autocast's GradScaler or ZenFlow"
        )
    if getattr(zo, "swap_optimizer", False):
        raise UnsupportedDeepSpeedConfig(
            "lbopt: NVMe optimizer swapping (offload_optimizer.device='nvme') steps one sub-group at a time; "
            f"{type(optimizer).__name__} needs all groups in one step (or use sub_group_size large enough "
            "for one sub-group per parameter group and a per-layer optimizer)"
        )
    if getattr(zo, "offload_optimizer", False) and any(
        d != "cpu" for d in getattr(zo, "subgroup_to_device", {}).values()
    ):
        raise UnsupportedDeepSpeedConfig(
            "lbopt: partial optimizer offload (offload_optimizer.ratio < 1) is not supported with an "
            "all-groups step"
        )
    flats = zo.fp32_partitioned_groups_flat
    last = len(flats) - 1
    pending: dict[int, torch.Tensor | None] = {}

    def _optimizer_step(sub_group_id: int) -> None:
        if sub_group_id == 0:
            pending.clear()
        if sub_group_id < last:
            pending[sub_group_id] = flats[sub_group_id].grad
            return
        saved = {s: flats[s].grad for s in pending}
        for s, grad in pending.items():
            flats[s].grad = grad
        groups = zo.optimizer.param_groups
        try:
            for s in range(len(flats)):
                groups[zo.sub_group_to_group_id[s]]["params"].append(flats[s])
            optimizer.step()
        finally:
            for g in groups:
                g["params"] = []
            for s, grad in saved.items():
                flats[s].grad = grad
        for s in pending:
            zo._reassign_or_swap_out_partitioned_parameters(s)
        pending.clear()

    zo._optimizer_step = _optimizer_step
    zo._lbopt_all_groups = True


# --------------------------------------------------------------------------- universal checkpoints
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_LBOPT_KEY = "lbopt_optimizer_state"


def _base_state(sd: dict[str, Any]) -> dict[str, Any]:
    """The base optimizer's ``state_dict()`` inside one ``*_optim_states.pt`` file."""
    osd = sd["optimizer_state_dict"]
    return osd["base_optimizer_state"] if "base_optimizer_state" in osd else osd["optimizer_state_dict"]


def _flat_groups(sd: dict[str, Any]) -> list[torch.Tensor]:
    osd = sd["optimizer_state_dict"]
    return osd["single_partition_of_fp32_groups"] if "base_optimizer_state" in osd else osd["fp32_flat_groups"]


def to_universal(input_folder: str, output_folder: str, *, num_workers: int = 1) -> None:
    """Convert a ZeRO checkpoint of an lbopt optimizer to DeepSpeed's universal format.

    ``deepspeed.checkpoint.ds_to_universal`` only knows Adam's two moment buffers. lbopt's
    per-element state has other names (``momentum_buffer``, ``prev_param``, ``prev_grad``,
    ...), so the conversion runs once per pair of state keys, each time presenting that
    pair under Adam's names, and renames the per-parameter files back. The per-layer state
    (``layer_state``: curvature EMAs, identical on every rank) and ``skipped_steps`` are
    stored in ``zero/optimizer_state.pt`` and restored by the adapter when the universal
    checkpoint is loaded (``"checkpoint": {"load_universal": true}``). Loading into ZeRO-1/2
    and the bf16 optimizer is supported; DeepSpeed's ZeRO-3 universal loader only knows Adam.

    Also usable as ``python -m lbopt.integrations.deepspeed INPUT_FOLDER OUTPUT_FOLDER``.
    """
    import glob
    import os
    import shutil
    import sys
    import tempfile

    from deepspeed.checkpoint import ds_to_universal as conv

    files = sorted(glob.glob(os.path.join(input_folder, "*_optim_states.pt")))
    if not files:
        raise FileNotFoundError(f"no *_optim_states.pt files in {input_folder!r}")
    states = {f: torch.load(f, map_location="cpu", weights_only=False) for f in files}
    first = states[files[0]]
    base = _base_state(first)
    keys: list[str] = []
    for entry in base["state"].values():
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() == 1 and k not in keys and k != "step":
                keys.append(k)
    passes: list[tuple[str | None, str | None]] = [
        (keys[i], keys[i + 1] if i + 1 < len(keys) else None) for i in range(0, len(keys), 2)
    ] or [(None, None)]

    def convert(src: str, dst: str) -> None:
        argv = sys.argv
        sys.argv = [
            "ds_to_universal", "--input_folder", src, "--output_folder", dst, "--inject_missing_state",
            "--num_extract_workers", str(num_workers), "--num_merge_workers", str(num_workers),
        ]
        try:
            conv.main(conv.parse_arguments())
        finally:
            sys.argv = argv

    os.makedirs(output_folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lbopt_universal_") as tmp:
        for n, pair in enumerate(passes):
            src = os.path.join(tmp, f"in{n}")
            os.makedirs(src)
            for name in os.listdir(input_folder):
                if not name.endswith("_optim_states.pt"):
                    os.symlink(os.path.join(os.path.abspath(input_folder), name), os.path.join(src, name))
            for f, sd in states.items():
                sd = dict(sd)
                sd["optimizer_state_dict"] = _presented(sd, pair)
                torch.save(sd, os.path.join(src, os.path.basename(f)))
            dst = output_folder if n == 0 else os.path.join(tmp, f"out{n}")
            convert(src, dst)
            zero_out = os.path.join(output_folder, "zero")
            zero_dst = os.path.join(dst, "zero")
            for param in os.listdir(zero_dst):
                folder = os.path.join(zero_dst, param)
                if not os.path.isdir(folder):
                    continue
                for slot, key in zip(_ADAM_KEYS, pair):
                    path = os.path.join(folder, f"{slot}.pt")
                    if key is None:
                        os.remove(path)
                    else:
                        shutil.move(path, os.path.join(zero_out, param, f"{key}.pt.lbopt"))
        for param in os.listdir(os.path.join(output_folder, "zero")):
            folder = os.path.join(output_folder, "zero", param)
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.endswith(".pt.lbopt"):
                        os.replace(os.path.join(folder, name), os.path.join(folder, name[: -len(".lbopt")]))
    global_path = os.path.join(output_folder, "zero", "optimizer_state.pt")
    global_sd = torch.load(global_path, map_location="cpu", weights_only=False)
    global_sd[_LBOPT_KEY] = {
        "layer_state": base.get("layer_state", {}),
        "skipped_steps": base.get("skipped_steps", 0),
        "state_keys": keys,
    }
    torch.save(global_sd, global_path)


def _presented(sd: dict[str, Any], pair: tuple[str | None, str | None]) -> dict[str, Any]:
    """A copy of one rank's ZeRO state whose base state shows ``pair`` as Adam's two moments."""
    osd = dict(sd["optimizer_state_dict"])
    inner_key = "base_optimizer_state" if "base_optimizer_state" in osd else "optimizer_state_dict"
    inner = dict(osd[inner_key])
    flats = _flat_groups(sd)
    state = {}
    for gid, entry in inner["state"].items():
        new = {k: v for k, v in entry.items() if k == "step"}
        tensors = [entry[k] for k in pair if k is not None and k in entry]
        for slot, key in zip(_ADAM_KEYS, pair):
            # A missing slot repeats the other one (same shape); its output file is deleted.
            new[slot] = entry[key] if key is not None and key in entry else (
                tensors[0] if tensors else torch.zeros_like(flats[gid])
            )
        state[gid] = new
    for gid in range(len(flats)):
        state.setdefault(gid, {slot: torch.zeros_like(flats[gid]) for slot in _ADAM_KEYS})
    inner["state"] = state
    osd[inner_key] = inner
    return osd


def _install_universal_load(zo: Any, optimizer: Any) -> None:
    """Restore lbopt's per-layer state when DeepSpeed loads a universal checkpoint."""
    import os

    if hasattr(zo, "load_hp_checkpoint_state_from_checkpoint_dir"):
        orig = zo.load_hp_checkpoint_state_from_checkpoint_dir

        def load_hp_checkpoint_state_from_checkpoint_dir(lp_groups_name: str, checkpoint_dir: str) -> None:
            orig(lp_groups_name, checkpoint_dir)
            path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
            extra = torch.load(path, map_location="cpu", weights_only=False).get(_LBOPT_KEY)
            if extra is None:
                raise RuntimeError(
                    f"lbopt: {checkpoint_dir!r} was converted by deepspeed.checkpoint.ds_to_universal, which drops "
                    "lbopt's optimizer state; convert with lbopt.integrations.deepspeed.to_universal "
                    "(python -m lbopt.integrations.deepspeed IN OUT)"
                )
            optimizer.layer_state = {k: v.clone() for k, v in extra["layer_state"].items()}
            optimizer.skipped_steps = int(extra["skipped_steps"])
            optimizer._plans.clear()

        zo.load_hp_checkpoint_state_from_checkpoint_dir = load_hp_checkpoint_state_from_checkpoint_dir
    if hasattr(zo, "load_hp_checkpoint_state_from_checkpoint_dir_stage3"):

        def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise UnsupportedDeepSpeedConfig(
                "lbopt: loading a universal checkpoint into ZeRO-3 is not supported (DeepSpeed's ZeRO-3 universal "
                "loader only restores Adam's exp_avg/exp_avg_sq); resume under ZeRO-1/2 or from a regular "
                "checkpoint with the same world size"
            )

        zo.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = refuse


# --------------------------------------------------------------------------- config names
_FUSED_LAMB = "fusedlamb"


def lbopt_optimizer_class(name: str | None) -> type | None:
    """The lbopt class a DeepSpeed ``optimizer.type`` names, or None (``"lbopt.X"`` is always lbopt's)."""
    if not name:
        return None
    from lbopt.registry import OPTIMIZERS, get_optimizer_class

    key = str(name)
    if key.lower().startswith("lbopt."):
        return get_optimizer_class(key[len("lbopt.") :])
    if key.lower() in OPTIMIZERS:
        return get_optimizer_class(key)
    return None


def _valid_names() -> str:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    from lbopt.registry import optimizer_names

    ours = optimizer_names()
    theirs = sorted({n for n in DEEPSPEED_OPTIMIZERS if n.lower() not in {o.lower() for o in ours}} | {"FusedLamb"})
    return (
        f"lbopt: {', '.join(ours)}; DeepSpeed: {', '.join(theirs)}; or the name of any torch.optim class "
        "(e.g. AdamW, SGD)"
    )


def _config_params(engine: Any) -> dict[str, Any]:
    params = dict(engine.optimizer_params() or {})
    for key in ("betas", "trust_clip"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    return params


_INSTALLED = False


def install() -> None:
    """Hook lbopt into DeepSpeed (idempotent). Runs automatically on ``import deepspeed`` after ``import lbopt``."""
    global _INSTALLED
    if _INSTALLED:
        return
    import deepspeed.runtime.engine as ds_engine

    engine_cls = ds_engine.DeepSpeedEngine
    orig_basic = engine_cls._configure_basic_optimizer
    orig_supported = engine_cls._is_supported_optimizer
    orig_configure = engine_cls._configure_optimizer
    orig_zero_supported = ds_engine.is_zero_supported_optimizer
    orig_fp16 = engine_cls._configure_fp16_optimizer

    @functools.wraps(orig_basic)
    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        name = self.optimizer_name()
        cls = lbopt_optimizer_class(name)
        if cls is not None:
            return cls(model_parameters, **_config_params(self))
        if name is not None and str(name).lower() == _FUSED_LAMB:
            from deepspeed.ops.lamb import FusedLamb

            return FusedLamb(model_parameters, **_config_params(self))
        return orig_basic(self, model_parameters)

    @functools.wraps(orig_supported)
    def _is_supported_optimizer(self: Any, optimizer_name: str) -> bool:
        if str(optimizer_name).lower() == _FUSED_LAMB:
            return True
        try:
            if lbopt_optimizer_class(optimizer_name) is not None:
                return True
        except ValueError as exc:  # "lbopt.Typo"
            raise ValueError(f"Unknown optimizer type {optimizer_name!r}; valid names: {_valid_names()}") from exc
        if orig_supported(self, optimizer_name):
            return True
        raise ValueError(
            f"Unknown DeepSpeed optimizer type {optimizer_name!r} in the config's \"optimizer\" section; "
            f"valid names: {_valid_names()}"
        )

    @functools.wraps(orig_configure)
    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        config = self._config
        force = getattr(config, "zero_force_ds_cpu_optimizer", None)
        if client_optimizer is not None and _is_lbopt(client_optimizer):
            # lbopt optimizers run on CPU partitions by design; no need to demand DeepSpeedCPUAdam.
            config.zero_force_ds_cpu_optimizer = False
        try:
            out = orig_configure(self, client_optimizer, model_parameters)
        finally:
            if force is not None:
                config.zero_force_ds_cpu_optimizer = force
        adapt_engine(self)
        return out

    @functools.wraps(orig_fp16)
    def _configure_fp16_optimizer(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_lbopt(optimizer):
            return orig_fp16(self, optimizer, *args, **kwargs)
        # FP16_UnfusedOptimizer calls step() with zero gradients to create optimizer state
        # eagerly; for lbopt that would count a step and store a secant history.
        optimizer.step = lambda closure=None: None
        try:
            wrapper = orig_fp16(self, optimizer, *args, **kwargs)
        finally:
            del optimizer.step
        if getattr(wrapper, "fused_lamb_legacy", False):  # set for the config name "LAMB" (FusedLamb's)
            wrapper.fused_lamb_legacy = False
        return wrapper

    def is_zero_supported_optimizer(optimizer: Any) -> bool:
        return _is_lbopt(optimizer) or orig_zero_supported(optimizer)

    engine_cls._configure_basic_optimizer = _configure_basic_optimizer
    engine_cls._is_supported_optimizer = _is_supported_optimizer
    engine_cls._configure_optimizer = _configure_optimizer
    engine_cls._configure_fp16_optimizer = _configure_fp16_optimizer
    ds_engine.is_zero_supported_optimizer = is_zero_supported_optimizer
    _INSTALLED = True


if __name__ == "__main__":
    import argparse

    _ap = argparse.ArgumentParser(description="Convert a ZeRO checkpoint of an lbopt optimizer to universal format")
    _ap.add_argument("input_folder")
    _ap.add_argument("output_folder")
    _ap.add_argument("--num_workers", type=int, default=1)
    _args = _ap.parse_args()
    to_universal(_args.input_folder, _args.output_folder, num_workers=_args.num_workers)
