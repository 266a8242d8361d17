"""PyTorch FSDP adapter: exact per-layer statistics under FSDP2, HSDP, FSDP1 and ZeroRedundancyOptimizer.

- **FSDP2** (``torch.distributed.fsdp.fully_shard``) and **HSDP** (``fully_shard`` on a 2-D
  mesh) need nothing from this module: their parameters are ``DTensor`` s that state their
  own shard, and :func:`lbopt.layout.dtensor_layout` (built into the core) maps each local
  shard to its layer, reduced over the shard mesh dimension, one all-reduce per statistics
  round. Construct the optimizer on the sharded model's parameters, or let Accelerate swap
  them in (the optimizer follows the one-for-one swap).
- **FSDP1** (``FullyShardedDataParallel``) with ``use_orig_params=True``: every original
  parameter becomes a 1-D view of its piece of the rank's flat shard (possibly empty). The
  flat parameter's shard metadata (``_shard_param_infos``, ``_numels``, ``_shapes``) says
  which piece; :func:`bind_fsdp1` reads it once and binds a :class:`FSDP1Layouts` resolver
  to the optimizer (``optimizer.layout_resolver``). Nothing is patched and nothing global
  is registered. With ``use_orig_params=False`` the optimizer would hold FlatParameters
  that mix layers: lbopt refuses them with a message naming the fix.
- **ZeroRedundancyOptimizer** steps each rank's own subset of whole parameters. LARS, LAMB
  and AdaGrad (``layer_grouping="tensor"``) read only their own layer and are exact;
  everything that combines layers (MCLR's median, CBLR's model step, AdaGradNorm's global
  norm, AdAdaGrad*'s batch tests, module-grouped layers) would see a subset:
  :func:`check_zero_redundancy` refuses them when ZeroRedundancyOptimizer builds them.

**Checkpoints.** ``optimizer.state_dict()`` holds everything (per-rank, DTensor state under
FSDP2). ``torch.distributed.checkpoint``'s ``get_state_dict`` / ``set_state_dict`` (what
Accelerate's FSDP ``save_state`` uses) keep only ``state`` and ``param_groups`` and drop the
optimizer's other entries: CBLR/MCLR's curvature EMA, AdaGradNorm's accumulator, the batch
controller. Checkpoint through :class:`LayerStateCheckpoint` (``dcp.save({"train":
LayerStateCheckpoint(opt, model)})``, or ``accelerator.register_for_checkpointing(
LayerStateCheckpoint(opt))``).

**Accelerate / Trainer on CPU ranks**: Accelerate turns FSDP on only for GPU ranks;
:mod:`lbopt.integrations.cpu_fsdp` takes its FSDP path on CPU ranks (gloo) too.

**Batch-size controller** (AdAdaGrad*): its micro-batch estimator hooks each parameter's
gradient *before* the data-parallel reduction. Under FSDP2 the sharded DTensors only receive
the reduce-scattered gradient (no autograd hook fires on them); the full local micro-batch
gradient lands on FSDP2's persistent unsharded parameters. :func:`watch_unsharded` points
the controller's hooks there (norm test; the coordinate and inner-product tests need
per-parameter metrics or directions on the sharded tensors and are not supported here).

This module reads these FSDP1 internals, all from ``torch.distributed.fsdp``:
``FullyShardedDataParallel.fsdp_modules``, ``FSDP._handle`` (``FlatParamHandle``: its
``flat_param``, ``process_group``, ``_sharding_strategy``, ``_use_orig_params``) and the
flat parameter's ``_params``, ``_numels``, ``_shapes``, ``_shard_param_infos``
(``in_shard``, ``numel_in_shard``, ``intra_param_start_idx``). :func:`bind_fsdp1` checks
them once and fails with the torch version if one is missing. For the controller under
FSDP2 it reads ``FSDPModule._get_fsdp_state()._fsdp_param_group.fsdp_params[i]._unsharded_param``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lbopt.layout import LayerTable, Layout, Segment, UnsupportedShardingError

__all__ = [
    "FSDP1Layouts", "LayerStateCheckpoint", "UnsupportedShardingError", "bind_fsdp1", "check_zero_redundancy",
    "unsharded_parameters", "watch_unsharded",
]

_FLAT_PARAM_FIELDS = ("_params", "_numels", "_shapes", "_shard_param_infos")


@dataclass(frozen=True)
class _Piece:
    """Where one original parameter lives in this rank's flat shard."""

    numel_in_shard: int
    intra_start: int  # offset of the piece inside the flattened parameter
    full_numel: int
    full_shape: tuple[int, ...]
    process_group: Any
    sharded: bool


def _handles(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    handles = []
    for module in FSDP.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue  # an FSDP unit that owns no parameters
        missing = [f for f in _FLAT_PARAM_FIELDS if not hasattr(handle.flat_param, f)]
        missing += [f for f in ("process_group", "_sharding_strategy", "_use_orig_params") if not hasattr(handle, f)]
        if missing:
            raise UnsupportedShardingError(
                f"lbopt: FSDP1 internals {missing} are missing in torch {torch.__version__}; lbopt's FSDP1 "
                "binding was written against torch 2.4-2.13. Use FSDP2 (fully_shard), which needs no binding."
            )
        handles.append(handle)
    if not handles:
        raise ValueError(
            f"bind_fsdp1: {type(model).__name__} contains no FullyShardedDataParallel unit; pass the wrapped "
            "model (for FSDP2 / fully_shard no binding is needed)"
        )
    return handles


def _pieces(handle: Any) -> dict[int, _Piece]:
    from torch.distributed.fsdp._flat_param import HandleShardingStrategy

    if not handle._use_orig_params:
        raise UnsupportedShardingError(
            "lbopt: FullyShardedDataParallel was built with use_orig_params=False: the optimizer then "
            "holds FlatParameters that mix layers. Wrap with use_orig_params=True (Accelerate: "
            "fsdp_use_orig_params: true), or shard with FSDP2 (fully_shard)."
        )
    flat = handle.flat_param
    group = handle.process_group
    sharded = handle._sharding_strategy != HandleShardingStrategy.NO_SHARD and dist.get_world_size(group) > 1
    out = {}
    for param, numel, shape, info in zip(flat._params, flat._numels, flat._shapes, flat._shard_param_infos):
        out[id(param)] = _Piece(
            numel_in_shard=int(info.numel_in_shard) if info.in_shard else 0,
            intra_start=int(info.intra_param_start_idx) if info.in_shard else 0,
            full_numel=int(numel),
            full_shape=tuple(shape),
            process_group=group if sharded else None,
            sharded=sharded,
        )
    return out


class FSDP1Layouts:
    """Layout resolver for the original parameters of FSDP1 units (``use_orig_params=True``).

    Callable as ``(layer_table, local_tensors) -> Layout | None``; bound to an optimizer by
    :func:`bind_fsdp1`. Parameter ``p`` (a 1-D view of ``numel_in_shard`` elements of the
    rank's flat shard) becomes ``Segment(tensor=i, start=0, length=numel_in_shard, layer,
    param, param_offset=intra_param_start_idx)``; the layout is reduced over the units'
    process group (HYBRID_SHARD: the shard group, since replicas hold the same numbers).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.pieces: dict[int, _Piece] = {}
        for handle in _handles(model):
            self.pieces.update(_pieces(handle))
        groups = {id(p.process_group) for p in self.pieces.values()}
        if len(groups) > 1:
            raise UnsupportedShardingError(
                "lbopt: the FSDP1 units of this model use different process groups or sharding strategies; "
                "one optimizer needs one group to reduce its layer statistics over"
            )

    def __call__(self, table: LayerTable, tensors: list[torch.Tensor]) -> Layout | None:
        found = [self.pieces.get(id(t)) for t in tensors]
        if all(p is None for p in found):
            return None
        index = {id(p): r.index for p, r in zip(table.originals, table.params)}  # type: ignore[attr-defined]
        segments = []
        for i, (tensor, piece) in enumerate(zip(tensors, found)):
            rec = index.get(id(tensor))
            if piece is None or rec is None:
                raise UnsupportedShardingError(
                    f"lbopt: a tensor of shape {tuple(tensor.shape)} in this step is not an original parameter of "
                    "the bound FSDP1 model; construct the optimizer on that model's parameters"
                )
            if tensor.numel() != piece.numel_in_shard:
                raise UnsupportedShardingError(
                    f"lbopt: parameter {table.params[rec].name!r} has {tensor.numel()} local elements, FSDP's shard "
                    f"metadata says {piece.numel_in_shard}; refusing to compute layer statistics on it"
                )
            segments.append(Segment(i, 0, piece.numel_in_shard, table.params[rec].layer, rec, piece.intra_start))
        piece0 = found[0]
        return Layout(
            tensors=list(tensors),
            segments=segments,
            num_layers=table.num_layers,
            process_group=piece0.process_group,  # type: ignore[union-attr]
            sharded=piece0.sharded,  # type: ignore[union-attr]
        )


def bind_fsdp1(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> FSDP1Layouts:
    """Bind an lbopt optimizer to the FSDP1 model whose original parameters it updates.

    Construct the optimizer on the model's parameters *before* wrapping it with
    ``FullyShardedDataParallel(..., use_orig_params=True)`` (as Accelerate does), so that
    it records each parameter's real shape; then wrap and bind (``optimizer`` may be
    Accelerate's wrapper). A collective call: every rank of the FSDP group must call it.
    Checks once (one all-reduce) that the shards cover every parameter exactly. Raises
    :class:`UnsupportedShardingError` for ``use_orig_params=False`` or an optimizer that
    was built on the already-flattened views.
    """
    from lbopt.optim.base import LayerwiseOptimizer

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate.AcceleratedOptimizer
    if not isinstance(opt, LayerwiseOptimizer):
        raise TypeError(f"bind_fsdp1 binds lbopt optimizers, got {type(opt).__name__}")
    layouts = FSDP1Layouts(model)
    _check_records(opt.table, layouts)
    opt.layout_resolver = layouts
    opt._plans.clear()
    return layouts


def _check_records(table: LayerTable, layouts: FSDP1Layouts) -> None:
    pieces = [layouts.pieces.get(id(p)) for p in table.originals]  # type: ignore[attr-defined]
    for rec, piece in zip(table.params, pieces):
        if piece is not None and rec.numel != piece.full_numel:
            raise UnsupportedShardingError(
                f"lbopt: the optimizer recorded parameter {rec.name!r} with {rec.numel} elements, but FSDP1 holds it "
                f"as {piece.full_shape}: the optimizer was built on FSDP's flattened views, so its layers (and "
                "the default exclusion of 1-D parameters) are wrong. Construct the optimizer on the model before "
                "wrapping it with FullyShardedDataParallel (as Accelerate does), then call bind_fsdp1."
            )
    counts = torch.tensor([float(p.numel_in_shard) if p else 0.0 for p in pieces], dtype=torch.float64)
    present = [p for p in pieces if p is not None]
    if present and present[0].sharded:
        dist.all_reduce(counts, group=present[0].process_group)
    for rec, piece, count in zip(table.params, pieces, counts.tolist()):
        if piece is not None and int(count) != piece.full_numel:
            raise UnsupportedShardingError(
                f"lbopt: FSDP1 shards cover {int(count)} of the {piece.full_numel} elements of {rec.name!r}; "
                "refusing to compute layer statistics on slices"
            )


def _zero_redundancy_exact() -> tuple[type, ...]:
    """Optimizers whose update of a layer depends on that layer's tensors only (verified vs dense)."""
    from lbopt.optim import LAMB, LARS, AdaGrad

    return (LARS, LAMB, AdaGrad)


def check_zero_redundancy(optimizer: Any) -> None:
    """Refuse an lbopt optimizer whose statistics span layers inside torch's ``ZeroRedundancyOptimizer``.

    ``ZeroRedundancyOptimizer(params, optimizer_class=lbopt.X)`` builds one ``X`` per rank on
    that rank's share of whole parameters. An update that reads only its own layer is then
    exact (LARS, LAMB, AdaGrad with ``layer_grouping="tensor"``: tested against the dense
    run); anything that combines layers would see a subset: MCLR's median, AdaGradNorm's
    global norm, AdAdaGrad's batch tests, module-grouped layers, and CBLR, whose model step
    couples layers (two CBLRs on the halves of a model end 5e-3 away from one CBLR on all
    of it). Called with the ZeroRedundancyOptimizer (or its local optimizer); raises
    ``UnsupportedShardingError`` naming the alternatives.
    """
    local = getattr(optimizer, "optim", optimizer)
    exact = type(local) in _zero_redundancy_exact() and getattr(local, "_layer_grouping", "tensor") == "tensor"
    if not exact:
        raise UnsupportedShardingError(
            f"lbopt: {type(local).__name__} under torch's ZeroRedundancyOptimizer would be silently wrong: each "
            "rank steps only its own parameters, so statistics that span layers (MCLR's median curvature, "
            "CBLR's model step, AdaGradNorm's global norm, AdAdaGrad's batch-size test, module-grouped layers) "
            "would see a subset. Use DDP with the optimizer itself, FSDP2 (fully_shard) or DeepSpeed ZeRO-1, "
            "where lbopt computes them exactly; LARS, LAMB and AdaGrad (per-tensor layers) are exact under "
            "ZeroRedundancyOptimizer."
        )


class LayerStateCheckpoint:
    """lbopt's optimizer state in a form ``torch.distributed.checkpoint`` keeps.

    ``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``; an lbopt
    optimizer's ``state_dict()`` also carries per-layer state (``layer_state``: CBLR/MCLR
    curvature EMAs, AdaGradNorm's ``b²``), ``skipped_steps`` and the batch controller.

    - ``LayerStateCheckpoint(optimizer, model)``: the whole training state for DCP
      (``dcp.save({"train": obj}, ...)`` / ``dcp.load``): model and optimizer through
      ``get_state_dict`` (sharded, resharding-capable), plus the extra entries; loading sets
      model and optimizer first, then the extras.
    - ``LayerStateCheckpoint(optimizer)``: the extra entries only, for an engine that saves
      model and optimizer itself and loads this object afterwards:
      ``accelerator.register_for_checkpointing(LayerStateCheckpoint(optimizer))``.

    The extras travel as one bytes blob, so a fresh optimizer's template has the same key.
    Implements DCP's ``Stateful`` protocol (``state_dict`` / ``load_state_dict``).
    """

    KEY = "lbopt_extra_state"

    def __init__(self, optimizer: Any, model: torch.nn.Module | None = None) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate.AcceleratedOptimizer
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        full = self.optimizer.state_dict()
        extra = {k: v for k, v in full.items() if k not in ("state", "param_groups")}
        buf = io.BytesIO()
        torch.save(extra, buf)
        out: dict[str, Any] = {self.KEY: buf.getvalue()}
        if self.model is not None:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            out["model"], out["optimizer"] = get_state_dict(self.model, self.optimizer)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.model is not None:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optimizer"])
        blob = state_dict[self.KEY]
        extra = torch.load(io.BytesIO(blob.getvalue() if isinstance(blob, io.BytesIO) else blob), weights_only=False)
        full = self.optimizer.state_dict()
        full.update(extra)
        self.optimizer.load_state_dict(full)


def unsharded_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """FSDP2's persistent unsharded parameters of ``model`` (the tensors autograd sees in backward).

    Each ``fully_shard`` unit is unsharded and resharded once (a collective: every rank must
    call this) so that its unsharded parameters exist; FSDP2 keeps the same objects for the
    rest of training, resizing their storage.
    """
    from torch.distributed.fsdp import FSDPModule

    out: list[torch.nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        module.unshard()
        group = module._get_fsdp_state()._fsdp_param_group
        module.reshard()
        if group is not None:
            out += [fp._unsharded_param for fp in group.fsdp_params]
    if not out:
        raise ValueError("unsharded_parameters: the model has no fully_shard unit with parameters")
    return out


def watch_unsharded(controller: Any, model: torch.nn.Module) -> Any:
    """Point a :class:`lbopt.BatchSizeController`'s micro-batch hooks at FSDP2's unsharded parameters.

    Call once after ``fully_shard`` and after building the optimizer (``opt.batch_controller``),
    on every rank. Only the norm test is supported (``test="norm"``).
    """
    if getattr(controller.config, "test", "norm") != "norm":
        raise UnsupportedShardingError(
            f"lbopt: BatchSizeController(test={controller.config.test!r}) needs per-parameter metrics or "
            "previous gradients on the watched tensors; under FSDP2 only test='norm' is supported"
        )
    controller.samples.detach()
    controller.attach(unsharded_parameters(model))
    return controller
