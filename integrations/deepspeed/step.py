"""The all-groups step: one ``optimizer.step()`` over every parameter group under ZeRO.

DeepSpeed calls ``optimizer.step()`` once per parameter group (ZeRO-1/2) or sub-group
(ZeRO-3), narrowing ``param_groups`` to that group. Methods whose statistics combine groups
(``needs_all_groups``: MCLR's median, a global norm), and ZeRO-3 groups split into several
sub-groups, need one step over everything instead. :func:`install_all_groups_step` replaces
the wrapper *instance's* ``_optimizer_step`` (no class is touched): calls for earlier groups
only keep their gradient, the call for the last group steps all groups, then refreshes the
low-precision copies of the earlier ones (DeepSpeed already copied their then-unchanged fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .compat import UnsupportedDeepSpeedConfig

__all__ = ["install_all_groups_step", "wants_all_groups"]


def wants_all_groups(optimizer: Any, num_groups: int, max_calls_per_group: int) -> bool:
    """Whether DeepSpeed's per-group calls would split a statistic the optimizer needs whole."""
    return (getattr(optimizer, "needs_all_groups", False) and num_groups > 1) or max_calls_per_group > 1


def install_all_groups_step(wrapper: Any, optimizer: Any) -> list[str]:
    """Make ``wrapper`` step all groups at once when ``optimizer`` needs it; return the replaced members."""
    kind = type(wrapper).__name__
    if kind == "DeepSpeedZeroOptimizer":
        if not wants_all_groups(optimizer, len(wrapper.single_partition_of_fp32_groups), 1):
            return []
        _refuse_with_step_hooks(wrapper, optimizer)
        wrapper._optimizer_step = _stage12_step(wrapper, optimizer)
        return ["_optimizer_step"]
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        per_group: dict[int, int] = {}
        for s in range(len(wrapper.fp32_partitioned_groups_flat)):
            gid = wrapper.sub_group_to_group_id[s]
            per_group[gid] = per_group.get(gid, 0) + 1
        if not wants_all_groups(optimizer, len(per_group), max(per_group.values(), default=1)):
            return []
        _refuse_with_step_hooks(wrapper, optimizer)
        _refuse_stage3_swapping(wrapper, optimizer)
        wrapper._optimizer_step = _stage3_step(wrapper, optimizer)
        return ["_optimizer_step"]
    return []  # bf16 / fp16 wrappers call step() once over all groups


def _refuse_with_step_hooks(wrapper: Any, optimizer: Any) -> None:
    if getattr(wrapper, "torch_autocast_gradscaler", None) or getattr(wrapper, "zenflow", False):
        raise UnsupportedDeepSpeedConfig(
            f"lbopt: {type(optimizer).__name__} needs one step over all parameter groups, which is not "
            "supported together with torch_autocast's GradScaler or ZenFlow"
        )


def _refuse_stage3_swapping(wrapper: Any, optimizer: Any) -> None:
    if getattr(wrapper, "swap_optimizer", False):
        raise UnsupportedDeepSpeedConfig(
            "lbopt: NVMe optimizer swapping (offload_optimizer.device='nvme') steps one sub-group at a time; "
            f"{type(optimizer).__name__} needs all groups in one step (or use sub_group_size large enough "
            "for one sub-group per parameter group and a per-layer optimizer)"
        )
    if getattr(wrapper, "offload_optimizer", False) and any(
        d != "cpu" for d in getattr(wrapper, "subgroup_to_device", {}).values()
    ):
        raise UnsupportedDeepSpeedConfig(
            "lbopt: partial optimizer offload (offload_optimizer.ratio < 1) is not supported with an all-groups step"
        )


def _stage12_step(zo: Any, optimizer: Any) -> Any:
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

    return _optimizer_step


def _stage3_step(zo: Any, optimizer: Any) -> Any:
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

    return _optimizer_step
