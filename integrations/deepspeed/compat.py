"""Every DeepSpeed internal the adapter touches, checked once against the installed DeepSpeed.

DeepSpeed has no public API for what lbopt needs (where a parameter's elements sit in a
ZeRO partition, how the ZeRO optimizer steps its groups). The adapter therefore reads
private members; this module lists each of them with the reason it is read, so a DeepSpeed
upgrade that renames one fails *once, up front*, with a message naming the DeepSpeed
version and the missing member — never with an ``AttributeError`` in the middle of a step
or, worse, with statistics computed on slices.

- :func:`check_deepspeed` checks the class-level members (methods the adapter calls or
  replaces on an instance, the config route's engine methods, the checkpoint converter),
  once per process.
- :func:`require` checks the instance attributes of one engine or ZeRO optimizer when it is
  bound (they only exist on instances).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONFIG_ROUTE",
    "CHECKPOINT",
    "ENGINE",
    "MODULES",
    "PARAMETERS",
    "TESTED_VERSIONS",
    "WRAPPERS",
    "DeepSpeedVersionError",
    "Internal",
    "UnsupportedDeepSpeedConfig",
    "check_deepspeed",
    "deepspeed_version",
    "require",
]

# DeepSpeed releases the adapter is tested against (tests/integrations/test_deepspeed.py).
TESTED_VERSIONS: tuple[str, ...] = ("0.19.8",)


class UnsupportedDeepSpeedConfig(RuntimeError):
    """A DeepSpeed set-up whose partitions lbopt cannot map to layers exactly."""


class DeepSpeedVersionError(UnsupportedDeepSpeedConfig):
    """The installed DeepSpeed lacks an internal the adapter relies on."""


@dataclass(frozen=True)
class Internal:
    """One private DeepSpeed member: ``owner.name``, and why the adapter needs it."""

    owner: str
    name: str
    purpose: str


def _members(owner: str, *pairs: tuple[str, str]) -> tuple[Internal, ...]:
    return tuple(Internal(owner, name, purpose) for name, purpose in pairs)


# The engine: read to refuse set-ups lbopt cannot map (pipeline, MoE, TP, hpZ, ZenFlow) and to
# find the optimizer and its wrapper.
ENGINE: tuple[Internal, ...] = _members(
    "DeepSpeedEngine",
    ("basic_optimizer", "the optimizer DeepSpeed wrapped (is it an lbopt optimizer?)"),
    ("optimizer", "the wrapper whose partitions the optimizer is handed"),
    ("zero_optimization_stage", "the ZeRO stage"),
    ("pipeline_parallelism", "refuse pipeline parallelism"),
    ("has_moe_layers", "refuse MoE expert groups"),
    ("mpu", "refuse tensor/model parallelism"),
)

# Class-level members of the engine that the opt-in config route (install()) wraps or calls.
CONFIG_ROUTE: tuple[Internal, ...] = _members(
    "DeepSpeedEngine",
    ("_configure_basic_optimizer", "build the optimizer a config's \"optimizer.type\" names"),
    ("_is_supported_optimizer", "accept lbopt names in the config's sanity check"),
    ("_configure_optimizer", "bind the engine once its optimizer is wrapped"),
    ("optimizer_name", "the config's optimizer type"),
    ("optimizer_params", "the config's optimizer params"),
)

# Per wrapper class (the type of engine.optimizer): the members the partition reader, the
# all-groups step and the universal-checkpoint loader use.
WRAPPERS: dict[str, tuple[Internal, ...]] = {
    "DeepSpeedZeroOptimizer": _members(
        "DeepSpeedZeroOptimizer",
        ("single_partition_of_fp32_groups", "the flat fp32 partition of each group (what the optimizer steps)"),
        ("bit16_groups", "the parameters of each group, linked to their partition fragments"),
        ("real_dp_process_group", "the data-parallel group each partition is cut over"),
        ("parallel_partitioned_bit16_groups", "all-groups step: refresh the bit16 copy of earlier groups"),
        ("cpu_offload", "all-groups step: the offload copy path"),
        ("_optimizer_step", "all-groups step: replaced on the instance"),
        ("_lazy_init_hp_params_optimizer_state", "all-groups step: link optimizer state after the first step"),
        ("load_hp_checkpoint_state_from_checkpoint_dir", "universal checkpoints: restore lbopt's per-layer state"),
    ),
    "DeepSpeedZeroOptimizer_Stage3": _members(
        "DeepSpeedZeroOptimizer_Stage3",
        ("fp32_partitioned_groups_flat", "the flat fp32 buffer of each sub-group"),
        ("fp16_groups", "the parameters of each sub-group (their ds_tensor partitions)"),
        ("dp_process_group", "the data-parallel group"),
        ("sub_group_to_group_id", "which parameter group a sub-group belongs to"),
        ("optimizer", "the optimizer whose param_groups the all-groups step fills"),
        ("_optimizer_step", "all-groups step: replaced on the instance"),
        ("_reassign_or_swap_out_partitioned_parameters", "all-groups step: refresh earlier sub-groups"),
        ("load_hp_checkpoint_state_from_checkpoint_dir_stage3", "universal checkpoints: refused (Adam-only)"),
    ),
    "BF16_Optimizer": _members(
        "BF16_Optimizer",
        ("fp32_groups_flat_partition", "the flat fp32 partition of each group"),
        ("bf16_groups", "the parameters of each group, linked to their partition fragments"),
        ("real_dp_process_group", "the data-parallel group each partition is cut over"),
        ("load_hp_checkpoint_state_from_checkpoint_dir", "universal checkpoints: restore lbopt's per-layer state"),
    ),
    "FP16_UnfusedOptimizer": _members(
        "FP16_UnfusedOptimizer",
        ("fp32_groups", "the fp32 master copy of each parameter"),
        ("fp16_groups", "the low-precision parameters, in the same order"),
        ("fused_lamb_legacy", "set for the config name \"lamb\"; must be off for lbopt's LAMB"),
    ),
}

# Attributes DeepSpeed sets on parameters.
PARAMETERS: tuple[Internal, ...] = _members(
    "parameter",
    ("_hp_mapping", "ZeRO-1/2, bf16: hp_fragment_address (start, numel) and lp_fragment_address.start"),
    ("ds_numel", "ZeRO-3: number of elements of the full parameter"),
    ("partition_numel", "ZeRO-3: length of each rank's partition"),
    ("ds_shape", "ZeRO-3: the full shape (read by the optimizer core)"),
)

# Module-level names.
MODULES: tuple[Internal, ...] = (
    Internal("deepspeed.runtime.config", "DEEPSPEED_OPTIMIZERS", "the config names DeepSpeed builds itself"),
    Internal("deepspeed.utils", "log_dist", "the rank-0 line saying which implementation runs"),
)

# The checkpoint converter lbopt drives (to_universal).
CHECKPOINT: tuple[Internal, ...] = _members(
    "deepspeed.checkpoint.ds_to_universal",
    ("main", "convert a ZeRO checkpoint; called with an argparse.Namespace"),
)

_CLASS_PATHS = {
    "DeepSpeedEngine": "deepspeed.runtime.engine",
    "DeepSpeedZeroOptimizer": "deepspeed.runtime.zero.stage_1_and_2",
    "DeepSpeedZeroOptimizer_Stage3": "deepspeed.runtime.zero.stage3",
    "BF16_Optimizer": "deepspeed.runtime.bf16_optimizer",
    "FP16_UnfusedOptimizer": "deepspeed.runtime.fp16.unfused_optimizer",
}
# Members that are methods, hence checkable on the class without an instance.
_METHODS = {
    "_configure_basic_optimizer", "_is_supported_optimizer", "_configure_optimizer", "optimizer_name",
    "optimizer_params", "zero_optimization_stage", "_optimizer_step", "_lazy_init_hp_params_optimizer_state",
    "load_hp_checkpoint_state_from_checkpoint_dir", "_reassign_or_swap_out_partitioned_parameters",
    "load_hp_checkpoint_state_from_checkpoint_dir_stage3",
}


def deepspeed_version() -> str:
    import deepspeed

    return str(getattr(deepspeed, "__version__", "unknown"))


def _missing_message(missing: Iterable[Internal]) -> str:
    items = "; ".join(f"{m.owner}.{m.name} ({m.purpose})" for m in missing)
    return (
        f"lbopt.integrations.deepspeed: DeepSpeed {deepspeed_version()} lacks {items}. The adapter reads these "
        f"DeepSpeed internals to map ZeRO partitions to layers and is tested with DeepSpeed "
        f"{', '.join(TESTED_VERSIONS)}. Install a tested version (pip install 'deepspeed=={TESTED_VERSIONS[-1]}'), "
        "or run without the binding (no lbopt optimizer under ZeRO; LBOPT_DEEPSPEED=off keeps install() from "
        "touching DeepSpeed)."
    )


@functools.cache
def check_deepspeed() -> str:
    """Check every class-level internal once; return the DeepSpeed version.

    Raises :class:`DeepSpeedVersionError` naming the version and each missing member.
    """
    import importlib

    missing: list[Internal] = []
    groups = [*CONFIG_ROUTE, *ENGINE, *(m for ms in WRAPPERS.values() for m in ms)]
    for internal in groups:
        if internal.name not in _METHODS:
            continue
        try:
            cls = getattr(importlib.import_module(_CLASS_PATHS[internal.owner]), internal.owner)
        except (ImportError, AttributeError):
            missing.append(Internal(internal.owner, "(class)", f"module {_CLASS_PATHS[internal.owner]}"))
            continue
        if not callable(getattr(cls, internal.name, None)):
            missing.append(internal)
    for internal in (*MODULES, *CHECKPOINT):
        try:
            present = hasattr(importlib.import_module(internal.owner), internal.name)
        except ImportError:
            present = False
        if not present:
            missing.append(internal)
    if missing:
        raise DeepSpeedVersionError(_missing_message(dict.fromkeys(missing)))
    return deepspeed_version()


def require(obj: Any, internals: Iterable[Internal]) -> None:
    """Raise :class:`DeepSpeedVersionError` unless ``obj`` has every member of ``internals``."""
    missing = [m for m in internals if not hasattr(obj, m.name)]
    if missing:
        raise DeepSpeedVersionError(_missing_message(missing))
