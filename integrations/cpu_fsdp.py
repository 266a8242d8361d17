"""Accelerate's FSDP path on CPU ranks (gloo): real FSDP2/FSDP1 sharding without a GPU.

Accelerate (1.15) switches its state to ``DistributedType.FSDP`` only when the ranks are
accelerator ranks (``AcceleratorState.__init__`` checks for ``MULTI_GPU``, ``MULTI_XPU``, ...).
On CPU ranks an FSDP launch config (``ACCELERATE_USE_FSDP=true``) or an explicit
``fsdp_plugin=`` is dropped and the model is silently wrapped in DDP. Everything *after* that
decision runs on CPU with gloo: ``accelerator.prepare`` applies ``fully_shard`` (FSDP2; every
parameter becomes a ``DTensor`` shard, gradients are reduce-scattered) or
``FullyShardedDataParallel(device_id=cpu)`` (FSDP1), and ``save_state`` / ``load_state`` go
through ``torch.distributed.checkpoint`` as on GPUs.

:func:`enable_cpu_fsdp` takes that decision for one accelerator, the way Accelerate takes it on
GPU ranks: it stores the plugin on the accelerator's state and sets its distributed type to
``FSDP`` (mixed precision handed to the plugin as Accelerate does). Nothing is patched; the
accelerator (and Accelerate's process-wide state it shares) is told once, before ``prepare``.

- :class:`CPUFSDPAccelerator` — an ``Accelerator`` that calls it in ``__init__``: a drop-in for
  ``Accelerator(...)`` in scripts launched with ``integrations/accelerate/fsdp2.yaml``
  (the recipes use it on CPU ranks).
- :class:`CPUFSDPTrainer` — a ``transformers.Trainer`` that calls it on the accelerator the
  Trainer creates, for ``TrainingArguments(fsdp=..., fsdp_config=...)`` on CPU ranks.

On GPU ranks all three leave Accelerate's own FSDP set-up untouched (they only act when
Accelerate chose ``MULTI_CPU``). What this writes into Accelerate's state: ``fsdp_plugin``,
``distributed_type`` (also ``PartialState``'s shared copy, as ``AcceleratorState`` does) and, for
FSDP1, ``device``; the fields it reads are checked on first use, with the installed version in
the message.
"""

from __future__ import annotations

import os
from typing import Any

import accelerate
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from lbopt.integrations.fsdp import LayerStateCheckpoint
from lbopt.integrations.trainer import unwrap_optimizer
from transformers import Trainer

__all__ = ["CPUFSDPAccelerator", "CPUFSDPTrainer", "FSDP1_RESUME_ON_CPU", "enable_cpu_fsdp", "fsdp_requested",
           "launch_config_plugin"]


def fsdp_requested(fsdp_plugin: FullyShardedDataParallelPlugin | None = None) -> bool:
    """Whether this process was asked for FSDP: a plugin given, or an FSDP launch config (``ACCELERATE_USE_FSDP``)."""
    return fsdp_plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _check_accelerate_fields(state: Any) -> None:
    """The three accelerate internals this module writes exist in the installed version."""
    shared = getattr(PartialState, "_shared_state", None)
    if not (hasattr(state, "distributed_type") and isinstance(shared, dict) and "distributed_type" in shared):
        raise RuntimeError(
            f"lbopt.integrations.cpu_fsdp: accelerate {accelerate.__version__} has no "
            "AcceleratorState.distributed_type / PartialState._shared_state['distributed_type'] (written for "
            "accelerate 1.15); FSDP on CPU ranks is not available with this version"
        )


def enable_cpu_fsdp(accelerator: Accelerator, fsdp_plugin: FullyShardedDataParallelPlugin | None = None) -> bool:
    """Put ``accelerator`` on Accelerate's FSDP path when its ranks are CPU ranks; ``True`` if it did.

    Call before ``accelerator.prepare``. ``fsdp_plugin`` defaults to the launch config's
    (``FullyShardedDataParallelPlugin()`` read from the ``FSDP_*`` variables ``accelerate launch``
    exports). Does nothing (``False``) when Accelerate already chose FSDP (GPU ranks) or FSDP was
    not requested. Raises ``ValueError`` for DeepSpeed + FSDP and for ranks that are not CPU
    ranks of a process group (one process; or several that Accelerate was not told are CPU ranks).
    For FSDP1 it also sets the state's device to ``cpu`` (FSDP1 rejects Accelerate's ``cpu:0``).
    """
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP or not fsdp_requested(fsdp_plugin):
        return False
    if state.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("FSDP and DeepSpeed were both requested: launch with one of them")
    if state.distributed_type != DistributedType.MULTI_CPU:
        hint = (
            "Accelerate counts CPU ranks only when told: Accelerator(cpu=True) / TrainingArguments(use_cpu=True)"
            if accelerator.num_processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
            else "launch num_processes >= 2 with accelerate launch / torchrun"
        )
        raise ValueError(
            f"FSDP on CPU needs a CPU process group; this accelerator is {state.distributed_type.value} with "
            f"{accelerator.num_processes} process(es): {hint}"
        )
    _check_accelerate_fields(state)
    plugin = fsdp_plugin if fsdp_plugin is not None else launch_config_plugin()
    if state.mixed_precision != "no":  # as AcceleratorState does for GPU ranks
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    if plugin.fsdp_version == 1:
        # FullyShardedDataParallel(device_id=accelerator.device) requires device_id to equal its
        # compute device, which is plain "cpu" for CPU modules; Accelerate's CPU ranks use "cpu:0"
        state.device = torch.device("cpu")
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


_SYNC_ON_CPU = (
    "Accelerate's sync_module_states (FSDP1) initialises modules on an accelerator device, and CPU ranks have "
    "none: set fsdp_sync_module_states: false in the accelerate config and build the same model on every rank "
    "(same seed / checkpoint)"
)


FSDP1_RESUME_ON_CPU = (
    "resuming an FSDP1 checkpoint on CPU ranks is refused: Accelerate's FSDP1 sharded load does not reproduce the "
    "trajectory there (measured with torch.optim.AdamW too: the loss differs from the first step after the resume); "
    "train with FSDP2 (integrations/accelerate/fsdp2.yaml), whose resume is exact"
)


def launch_config_plugin() -> FullyShardedDataParallelPlugin:
    """The plugin ``Accelerator`` builds from the launch config's ``FSDP_*`` variables (clear error for CPU sync)."""
    fsdp1 = os.environ.get("FSDP_VERSION", "1") == "1"
    sync = fsdp1 and os.environ.get("FSDP_SYNC_MODULE_STATES", "false").lower() in ("1", "true")
    if sync and not torch.accelerator.is_available():
        raise ValueError(_SYNC_ON_CPU)
    return FullyShardedDataParallelPlugin()


class CPUFSDPAccelerator(Accelerator):
    """``Accelerator`` that shards with FSDP on CPU ranks too (see :func:`enable_cpu_fsdp`).

    Same arguments as ``Accelerator``. With an FSDP launch config or ``fsdp_plugin=`` on CPU
    ranks, ``prepare`` applies ``fully_shard`` (FSDP2) / ``FullyShardedDataParallel`` (FSDP1)
    instead of DDP, and ``save_state`` / ``load_state`` write and read sharded DCP checkpoints.
    ``cpu_fsdp`` says whether this instance took that path.
    """

    def __init__(self, *args: Any, fsdp_plugin: FullyShardedDataParallelPlugin | None = None, **kwargs: Any) -> None:
        if fsdp_plugin is None and fsdp_requested():
            fsdp_plugin = launch_config_plugin()
        super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
        self.cpu_fsdp = enable_cpu_fsdp(self, fsdp_plugin)

    def load_state(self, input_dir: str | None = None, **kwargs: Any) -> None:
        """``Accelerator.load_state``; refused for FSDP1 on CPU ranks (:data:`FSDP1_RESUME_ON_CPU`)."""
        if self.cpu_fsdp and self.state.fsdp_plugin.fsdp_version == 1:
            raise ValueError(FSDP1_RESUME_ON_CPU)
        super().load_state(input_dir, **kwargs)

    def get_state_dict(self, model: torch.nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        """The full state dict (rank 0; others get an empty dict under FSDP1), as ``Accelerator.get_state_dict``.

        FSDP1 on CPU ranks gathers without ``offload_to_cpu``: the parameters are CPU tensors
        already, and torch 2.13's FULL_STATE_DICT with ``offload_to_cpu=True`` (what Accelerate
        asks for) crashes the process (SIGSEGV) when they are.
        """
        if not (self.cpu_fsdp and self.state.fsdp_plugin.fsdp_version == 1):
            return super().get_state_dict(model, unwrap)
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            return model.state_dict()


class CPUFSDPTrainer(Trainer):
    """``transformers.Trainer`` that shards with FSDP on CPU ranks too (see :func:`enable_cpu_fsdp`).

    Use exactly like ``Trainer`` with ``TrainingArguments(use_cpu=True, fsdp="full_shard",
    fsdp_config={"fsdp_version": 2, ...})`` under ``torchrun`` / ``accelerate launch`` with CPU
    processes. ``cpu_fsdp`` says whether the Trainer's accelerator took the CPU FSDP path.

    Checkpoints: under FSDP (GPU ranks too) the Trainer saves the optimizer through DCP, which
    drops lbopt's per-layer state; this Trainer also writes it (:class:`LayerStateCheckpoint`,
    rank 0, ``lbopt_layer_state.pt`` in the checkpoint folder) and loads it on resume.
    """

    LAYER_STATE_FILE = "lbopt_layer_state.pt"

    def create_accelerator_and_postprocess(self) -> None:
        plugin_args = self.args.fsdp_plugin_args
        if plugin_args and plugin_args.get("fsdp_version", 1) == 1 and not torch.accelerator.is_available():
            raise ValueError(
                "CPUFSDPTrainer runs FSDP2 only: set fsdp_config={'fsdp_version': 2, ...}. (FSDP1 needs "
                "lbopt.integrations.fsdp.bind_fsdp1(optimizer, model) after wrapping, which the Trainer does not call)"
            )
        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args is not None else None
        self.cpu_fsdp = enable_cpu_fsdp(self.accelerator, plugin)
        if self.cpu_fsdp:
            # what the Trainer derives from the accelerator's state right after creating it
            self.is_fsdp_enabled = True
            if plugin.activation_checkpointing and self.args.activation_checkpointing:
                raise ValueError(
                    "fsdp_config['activation_checkpointing'] and TrainingArguments(activation_checkpointing=True) "
                    "cannot both be set: use FSDP's activation checkpointing under FSDP"
                )
            if self.args.save_only_model and (
                self.args.load_best_model_at_end or "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
            ):
                raise ValueError(
                    "TrainingArguments(save_only_model=True) does not go with FSDP's SHARDED_STATE_DICT or "
                    "load_best_model_at_end: set save_only_model=False"
                )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.is_fsdp_enabled and _is_lbopt(self.optimizer):
            state = LayerStateCheckpoint(self.optimizer).state_dict()
            if self.args.should_save:
                torch.save(state, os.path.join(output_dir, self.LAYER_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, self.LAYER_STATE_FILE) if checkpoint else None
        if path and self.is_fsdp_enabled and _is_lbopt(self.optimizer):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {self.LAYER_STATE_FILE}: it was not written by CPUFSDPTrainer, and "
                    "resuming without lbopt's per-layer state would change the trajectory"
                )
            LayerStateCheckpoint(self.optimizer).load_state_dict(torch.load(path, weights_only=True))


def _is_lbopt(optimizer: Any) -> bool:
    from lbopt import LayerwiseOptimizer

    return isinstance(unwrap_optimizer(optimizer), LayerwiseOptimizer)
