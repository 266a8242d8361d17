"""The binding of one DeepSpeed engine to its lbopt optimizer, as an object users can see.

:func:`bind` reads the engine's wrapper once (:func:`.partitions.read_partitions`, after
:func:`.compat.check_deepspeed`), hands the optimizer a layout resolver for exactly that
engine's partitions (``optimizer.layout_resolver``), and, where the method needs it, replaces
the wrapper *instance's* per-group step and universal-checkpoint loader. What it did is the
returned :class:`DeepSpeedBinding` (also ``engine.lbopt_binding``), logged once on rank 0.

:func:`initialize` is ``deepspeed.initialize`` plus the binding, for scripts that call it
themselves: it builds an optimizer a config names (``"optimizer": {"type": "CBLR"}``) before
DeepSpeed sees the config, so nothing in DeepSpeed is patched.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from .checkpoint import install_universal_load
from .compat import ENGINE, UnsupportedDeepSpeedConfig, check_deepspeed, require
from .config import build_config_optimizer, check_config_name, is_lbopt, log_rank0, resume_step, suspend_step
from .partitions import DeepSpeedLayouts, read_partitions
from .step import install_all_groups_step

__all__ = ["DeepSpeedBinding", "bind", "binding_of", "check_supported", "initialize"]


@dataclass(eq=False)
class DeepSpeedBinding:
    """What binding an engine did.

    ``wrapper``: the DeepSpeed class the optimizer is wrapped in (``"none"`` for fp32 without
    ZeRO, where the optimizer steps the parameters themselves and nothing is bound);
    ``layouts``: the resolver the optimizer received (``optimizer.layout_resolver``);
    ``replaced``: members replaced on the wrapper instance (no class is ever changed);
    ``all_groups_step``: one ``step()`` over all groups instead of DeepSpeed's per-group calls.
    """

    optimizer: Any
    wrapper: str
    zero_stage: int
    layouts: DeepSpeedLayouts | None
    replaced: tuple[str, ...]
    deepspeed_version: str

    @property
    def all_groups_step(self) -> bool:
        return "_optimizer_step" in self.replaced

    def describe(self) -> str:
        """One line: which implementation runs, in which wrapper, and what was replaced."""
        what = f"lbopt.{type(self.optimizer).__name__}"
        if self.layouts is None:
            return f"lbopt: {what} steps the parameters directly (DeepSpeed {self.deepspeed_version}, no ZeRO wrapper)"
        parts = f"{self.layouts.num_partitions} partition(s)"
        repl = f"; replaced on the wrapper instance: {', '.join(self.replaced)}" if self.replaced else ""
        return (
            f"lbopt: {what} bound to DeepSpeed {self.deepspeed_version} {self.wrapper} (ZeRO stage {self.zero_stage}, "
            f"{parts}){' with one step over all groups' if self.all_groups_step else ''}: exact per-layer "
            f"statistics{repl}"
        )


def check_supported(engine: Any) -> None:
    """Refuse set-ups whose partitions lbopt cannot map to layers (reads the engine's flags)."""

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


def binding_of(engine: Any) -> DeepSpeedBinding | None:
    """The binding :func:`bind` made for ``engine``, or ``None``."""
    return vars(engine).get("lbopt_binding")


def bind(engine: Any) -> DeepSpeedBinding:
    """Bind ``engine`` (from ``deepspeed.initialize``) to its lbopt optimizer; idempotent per engine.

    Raises ``TypeError`` when the engine's optimizer is not an lbopt optimizer,
    :class:`UnsupportedDeepSpeedConfig` for set-ups lbopt cannot map (pipeline/tensor
    parallelism, MoE, ZeRO++ hpZ, ZenFlow), and :class:`.compat.DeepSpeedVersionError` when
    the installed DeepSpeed lacks an internal the adapter reads.
    """
    existing = binding_of(engine)
    if existing is not None:
        return existing
    version = check_deepspeed()
    require(engine, ENGINE)
    optimizer = engine.basic_optimizer
    if not is_lbopt(optimizer):
        raise TypeError(
            f"lbopt.integrations.deepspeed.bind: the engine's optimizer is {type(optimizer).__name__}, not an lbopt "
            "optimizer; there is nothing to bind"
        )
    check_supported(engine)
    wrapper, stage = engine.optimizer, int(engine.zero_optimization_stage())
    if wrapper is optimizer:  # fp32 without ZeRO
        binding = DeepSpeedBinding(optimizer, "none", stage, None, (), version)
    else:
        layouts = DeepSpeedLayouts(read_partitions(wrapper, stage))
        replaced = []
        if getattr(wrapper, "fused_lamb_legacy", False):  # set for the config name "lamb": FusedLamb's own path
            wrapper.fused_lamb_legacy = False
            replaced.append("fused_lamb_legacy")
        replaced += install_universal_load(wrapper, optimizer)
        replaced += install_all_groups_step(wrapper, optimizer)
        optimizer.layout_resolver = layouts
        binding = DeepSpeedBinding(optimizer, type(wrapper).__name__, stage, layouts, tuple(replaced), version)
    engine.__dict__["lbopt_binding"] = binding  # plain attribute (DeepSpeedEngine is an nn.Module)
    log_rank0(binding.describe())
    return binding


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, str):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or the path of a DeepSpeed JSON file, not {type(config).__name__}")
    return copy.deepcopy(config)


def initialize(*, model: Any, config: dict[str, Any] | str, optimizer: Any = None, model_parameters: Any = None,
               **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with lbopt optimizers bound; same arguments and return value.

    An lbopt optimizer may be passed as ``optimizer`` or named by the config's
    ``"optimizer"`` section (built here from ``model_parameters``, default
    ``model.parameters()``, and removed from the config DeepSpeed sees). For an lbopt
    optimizer the config DeepSpeed sees also gets ``zero_allow_untested_optimizer`` and
    ``zero_force_ds_cpu_optimizer: false``. Other optimizers pass through untouched.
    """
    import deepspeed

    cfg = _config_dict(config)
    section = cfg.get("optimizer")
    if optimizer is None and section:
        check_config_name(section.get("type"))
        params = model_parameters if model_parameters is not None else model.parameters()
        built = build_config_optimizer(section.get("type"), section.get("params"), params)
        if built is not None:
            optimizer, line = built
            log_rank0(line)
            cfg.pop("optimizer")
    lbopt_optimizer = is_lbopt(optimizer)
    if lbopt_optimizer:
        cfg["zero_allow_untested_optimizer"] = True
        cfg["zero_force_ds_cpu_optimizer"] = False
        suspend_step(optimizer)
    try:
        out = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model_parameters, config=cfg,
                                   **kwargs)
    finally:
        if lbopt_optimizer:
            resume_step(optimizer)
    if lbopt_optimizer:
        bind(out[0])
    return out
