"""The thin optimizer shell shared by every lbopt optimizer.

It manages what ``torch.optim.Optimizer`` manages (groups, state, ``state_dict``) plus the
three things layer-wise methods add: the *layer table* (which parameters form which
logical layer, which layers are adapted and decayed), the *layout* of whatever local
tensors the step is handed (dense parameters or engine partitions), and the guard that
keeps non-finite gradients out of the optimizer state. The arithmetic lives in
:mod:`lbopt.rules`; subclasses compose it in ``_step``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lbopt.layout import LayerTable, Layout, ParamRecord, resolve_layout
from lbopt.rules.direction import CPU_BLOCK, adam_direction, scaled_adam_direction
from lbopt.stats import LayerStats

__all__ = ["ExcludeSpec", "LayerwiseOptimizer", "NonFiniteGradientError", "StepPlan"]

ExcludeSpec = Callable[[str, torch.Tensor], bool] | str | Sequence[str] | bool | None
LayerGrouping = str | Callable[[str], str]
_GROUP_INDEX = "group_index"


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` with ``on_nonfinite="raise"`` when a gradient has NaN/Inf."""


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``lo (<|≤) value ≤ hi``."""
    ok = isinstance(value, int | float) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"Invalid {name}: {value!r}; expected a number in {bracket}{lo}, {hi}]")


def check_clip(name: str, clip: tuple[float, float] | None) -> None:
    """``clip`` must be ``None`` or ``(lo, hi)`` with ``0 ≤ lo ≤ hi``."""
    if clip is None:
        return
    ok = isinstance(clip, tuple | list) and len(clip) == 2 and 0 <= clip[0] <= clip[1]
    if not ok:
        raise ValueError(f"Invalid {name}: {clip!r}; expected None or a pair (lo, hi) with 0 <= lo <= hi")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape, also when an engine has already partitioned it.

    DeepSpeed ZeRO-3 (``zero.Init``, e.g. HF ``from_pretrained`` under ZeRO-3) leaves an
    empty ``p.data`` and keeps the real shape in ``p.ds_shape``.
    """
    return tuple(getattr(p, "ds_shape", p.shape))


def exclusion_predicate(exclude: ExcludeSpec) -> Callable[[str, torch.Tensor], bool]:
    """Turn the ``exclude`` argument into ``(name, param) -> bool``.

    ``None`` (default): parameters with ``ndim <= 1`` (biases, norm weights). ``False``:
    nothing. A string or list of strings: regular expressions searched in the parameter
    name. A callable: used as is.
    """
    if exclude is None:
        return lambda _name, p: len(full_shape(p)) <= 1
    if exclude is False:
        return lambda _name, _p: False
    if isinstance(exclude, str):
        exclude = [exclude]
    if isinstance(exclude, Sequence) and all(isinstance(e, str) for e in exclude):
        patterns = [re.compile(e) for e in exclude]
        return lambda name, _p: any(pat.search(name) for pat in patterns)
    if callable(exclude):
        return exclude
    raise ValueError(
        f"Invalid exclude: {exclude!r}; expected None (exclude 1-D parameters), False, a regex "
        "string or list of them (matched against parameter names), or a callable (name, param) -> bool"
    )


def _dedupe_params(params: Any) -> list[dict[str, Any]]:
    """Normalise ``params`` to groups and drop repeats of the same tensor (tied weights)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a Tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    seen: set[int] = set()
    out = []
    for group in groups:
        group = dict(group)
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        kept = []
        for item in members:
            tensor = item[1] if isinstance(item, tuple) else item
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            kept.append(item)
        group["params"] = kept
        out.append(group)
    return out


@dataclass
class StepPlan:
    """Everything one ``step()`` call needs about its local tensors, cached per tensor set.

    ``seg_group[i]`` / ``seg_layer[i]``: parameter group index and layer of segment ``i``
    (host lists, so per-group constants never visit the device).
    """

    layout: Layout
    stats: LayerStats
    seg_group: list[int] = field(default_factory=list)
    seg_layer: list[int] = field(default_factory=list)

    def _seg_index(self, device: torch.device) -> torch.Tensor:
        index = self.stats._seg_layer  # already on the statistics device
        return index if index.device == device else self.layout.seg_layer.to(device)

    def seg_values(self, per_layer: torch.Tensor) -> list[float]:
        """Per-segment Python floats from a per-layer tensor: one device→host copy (a sync)."""
        return per_layer[self._seg_index(per_layer.device)].tolist()

    def seg_tensors(self, per_layer: torch.Tensor, scale: Sequence[float] | None = None) -> list[torch.Tensor]:
        """Per-segment 0-dim tensors from a per-layer tensor (times ``scale[i]``), on its device.

        No host sync: the values stay where they were computed (see :func:`lbopt.rules.direction.descend`).
        """
        values = per_layer[self._seg_index(per_layer.device)]
        if scale is not None:
            values = values * torch.tensor(list(scale), dtype=values.dtype, device=values.device)
        return list(values.unbind())


class LayerwiseOptimizer(Optimizer):
    """Base class: groups, layer table, layout resolution and the non-finite guard.

    Subclasses implement ``_step(plan, groups)``. ``needs_all_groups`` is True for
    methods whose statistics combine layers of different parameter groups (a median over
    all layers, a global norm); engine adapters then make sure a single ``step()`` call
    sees every group.
    """

    needs_all_groups: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        exclude: ExcludeSpec = None,
        layer_grouping: LayerGrouping = "tensor",
        on_nonfinite: str = "skip",
    ) -> None:
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r}; expected 'skip' or 'raise'")
        if not (layer_grouping in ("tensor", "module") or callable(layer_grouping)):
            raise ValueError(
                f"Invalid layer_grouping: {layer_grouping!r}; expected 'tensor', 'module' or a callable "
                "name -> layer key"
            )
        self._exclude = exclusion_predicate(exclude)
        self._layer_grouping = layer_grouping
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.layer_state: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple[int, ...], StepPlan] = {}
        self._last: dict[str, torch.Tensor] = {}
        self._workspaces: dict[tuple[int, str], torch.Tensor] = {}
        super().__init__(_dedupe_params(params), defaults)
        self._build_layer_table()

    # ------------------------------------------------------------------ layer table
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault(_GROUP_INDEX, len(self.param_groups))
        param_group.setdefault("step", 0)
        super().add_param_group(param_group)
        if hasattr(self, "table"):
            self._build_layer_table()

    def _build_layer_table(self) -> None:
        records: list[ParamRecord] = []
        originals: list[torch.Tensor] = []
        keys: dict[Any, int] = {}
        names: list[str] = []
        adapt: list[bool] = []
        decay: list[bool] = []
        layer_group: list[int] = []
        for group in self.param_groups:
            gi = group[_GROUP_INDEX]
            pnames = group.get("param_names")
            for j, p in enumerate(group["params"]):
                name = pnames[j] if pnames else f"group{gi}.param{j}"
                excluded = bool(self._exclude(name, p))
                key = self._layer_key(name, len(records), excluded, bool(pnames))
                if key not in keys:
                    keys[key] = len(names)
                    names.append(name if isinstance(key, int) else key[1])
                    adapt.append(not excluded)
                    decay.append(not excluded)
                    layer_group.append(gi)
                layer = keys[key]
                if adapt[layer] == excluded or layer_group[layer] != gi:
                    raise ValueError(
                        f"layer {names[layer]!r} mixes parameters of different parameter groups or of "
                        f"different exclusion (at {name!r}); put a layer's tensors in one group or use "
                        "layer_grouping='tensor'"
                    )
                records.append(
                    ParamRecord(
                        index=len(records), name=name, group=gi, layer=layer, numel=math.prod(full_shape(p)),
                        shape=full_shape(p), adapt=not excluded, decay=not excluded,
                    )
                )
                originals.append(p)
        self.table = LayerTable(names=names, adapt=adapt, decay=decay, group=layer_group, params=records)
        self.table.originals = originals  # type: ignore[attr-defined]
        self._original_index = {id(p): r.index for p, r in zip(originals, records)}
        self._plans.clear()

    def _layer_key(self, name: str, index: int, excluded: bool, named: bool) -> Any:
        if self._layer_grouping == "tensor" or excluded:
            return index
        if self._layer_grouping == "module":
            if not named:
                raise ValueError(
                    "layer_grouping='module' needs parameter names: pass model.named_parameters() "
                    "(or groups with 'param_names')"
                )
            return ("module", name.rpartition(".")[0])
        return ("custom", str(self._layer_grouping(name)))  # type: ignore[operator]

    # ------------------------------------------------------------------ step plumbing
    def _grad_tensors(self) -> list[torch.Tensor]:
        tensors = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use a dense embedding (sparse=False)"
                    )
                tensors.append(p)
        return tensors

    def _plan(self) -> StepPlan | None:
        tensors = self._grad_tensors()
        if not tensors:
            return None
        key = tuple(id(t) for t in tensors)
        plan = self._plans.get(key)
        if plan is None:
            layout = resolve_layout(self.table, tensors, self._original_index)
            seg_layer = [s.layer for s in layout.segments]
            plan = StepPlan(
                layout=layout, stats=LayerStats(layout), seg_layer=seg_layer,
                seg_group=[self.table.group[layer] for layer in seg_layer],
            )
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _groups_by_index(self) -> dict[int, dict[str, Any]]:
        return {g[_GROUP_INDEX]: g for g in self.param_groups}

    def layer_hparam(self, key: str, device: torch.device, default: float = 0.0) -> torch.Tensor:
        """Per-layer value of group hyperparameter ``key`` (``default`` for layers not in this call).

        Built on the host from the group dicts and copied to ``device`` (host→device only:
        no sync); the tensor is cached while the values do not change.
        """
        groups = self._groups_by_index()
        vals = tuple(float(groups[g][key]) if g in groups else default for g in self.table.group)
        cache = self.__dict__.setdefault("_hparam_cache", {})
        hit = cache.get((key, device))
        if hit is None or hit[0] != vals:
            hit = (vals, torch.tensor(vals, dtype=torch.float64, device=device))
            cache[(key, device)] = hit
        return hit[1]

    def seg_hparam(self, plan: StepPlan, key: str) -> list[float]:
        """Per-segment value of group hyperparameter ``key``, on the host (no device round trip)."""
        groups = self._groups_by_index()
        return [float(groups[g][key]) for g in plan.seg_group]

    def seg_weight_decay(self, plan: StepPlan) -> list[float]:
        """Per-segment β actually applied (0 where the layer does not decay), on the host."""
        decays = self.table.decay
        return [b if decays[layer] else 0.0 for b, layer in zip(self.seg_hparam(plan, "weight_decay"), plan.seg_layer)]

    def layer_weight_decay(self, device: torch.device) -> torch.Tensor:
        """Per-layer β actually applied: the group's ``weight_decay`` where the layer decays, else 0."""
        return self.layer_hparam("weight_decay", device) * self.layer_mask("decay", device)

    def layer_mask(self, which: str, device: torch.device) -> torch.Tensor:
        """``adapt`` or ``decay`` flags per layer as a bool tensor."""
        return torch.tensor(getattr(self.table, which), dtype=torch.bool, device=device)

    def nonfinite(self, sq_norms: torch.Tensor) -> bool:
        """Apply the non-finite policy to globally reduced ``‖g_l‖²``; True means skip this step."""
        if bool(torch.isfinite(sq_norms).all()):
            return False
        bad = [self.table.names[i] for i in torch.nonzero(~torch.isfinite(sq_norms)).flatten().tolist()]
        msg = (
            f"{type(self).__name__}: non-finite gradient in layer(s) {bad[:5]}; "
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteGradientError(msg + "no state was changed")
        self.skipped_steps += 1
        warnings.warn(msg + "step skipped, optimizer state unchanged", RuntimeWarning, stacklevel=3)
        return True

    def trust_clip(self) -> tuple[float, float] | None:
        """The ``trust_clip`` of the groups in this step (must agree: scales are per layer)."""
        clips = {tuple(g["trust_clip"]) if g["trust_clip"] is not None else None for g in self.param_groups}
        if len(clips) > 1:
            raise ValueError(
                f"Invalid trust_clip: groups disagree ({sorted(clips, key=str)}); use one value for all groups"
            )
        return clips.pop()

    def adam_direction(
        self,
        plan: StepPlan,
        grads: list[torch.Tensor],
        eps_key: str,
        params: list[torch.Tensor] | None = None,
        weight_decays: list[float] | None = None,
    ) -> list[torch.Tensor]:
        """Update the Adam moments of ``plan``'s tensors; return ``m̂/(√v̂+ε) (+ βw)`` per segment.

        β's, ε (group key ``eps_key``), the step count and ``bias_correction`` (default
        True) come from each segment's parameter group.
        """
        layout = plan.layout
        groups = self._groups_by_index()
        seg_group = [groups[self.table.group[s.layer]] for s in layout.segments]
        b1 = [g["betas"][0] for g in seg_group]
        b2 = [g["betas"][1] for g in seg_group]
        corr = [bool(g.get("bias_correction", True)) for g in seg_group]
        t = [g["step"] for g in seg_group]
        return adam_direction(
            grads,
            layout.views([self.buffer(x, "exp_avg") for x in layout.tensors]),
            layout.views([self.buffer(x, "exp_avg_sq") for x in layout.tensors]),
            layout.views([self.workspace(x, "adam_denom") for x in layout.tensors]),
            layout.views([self.workspace(x, "adam_update") for x in layout.tensors]),
            b1,
            b2,
            [1 - a**n if c else 1.0 for a, n, c in zip(b1, t, corr)],
            [1 - a**n if c else 1.0 for a, n, c in zip(b2, t, corr)],
            [g[eps_key] for g in seg_group],
            params,
            weight_decays,
        )

    def scaled_adam_direction(
        self, plan: StepPlan, grads: list[torch.Tensor], eps_key: str, params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[float], torch.Tensor]:
        """Update the Adam moments; return ``(d, k, ‖d‖²)`` with ``u = k·d = m̂/(√v̂+ε) + βw`` per segment.

        ``d`` lives in the one work buffer (slot ``"adam"``); see
        :func:`lbopt.rules.direction.scaled_adam_direction`. All scalars are host floats
        from the segments' parameter groups; on CPU the sweep runs in cache blocks.
        """
        layout = plan.layout
        groups = self._groups_by_index()
        seg_group = [groups[g] for g in plan.seg_group]
        b1 = [g["betas"][0] for g in seg_group]
        b2 = [g["betas"][1] for g in seg_group]
        corr = [bool(g.get("bias_correction", True)) for g in seg_group]
        t = [g["step"] for g in seg_group]
        on_cpu = bool(layout.tensors) and layout.tensors[0].device.type == "cpu"
        work = layout.views([self.workspace(x, "adam") for x in layout.tensors])
        k, sq = scaled_adam_direction(
            grads,
            layout.views([self.buffer(x, "exp_avg") for x in layout.tensors]),
            layout.views([self.buffer(x, "exp_avg_sq") for x in layout.tensors]),
            work,
            b1,
            b2,
            [1 - a**n if c else 1.0 for a, n, c in zip(b1, t, corr)],
            [1 - a**n if c else 1.0 for a, n, c in zip(b2, t, corr)],
            [g[eps_key] for g in seg_group],
            params,
            self.seg_weight_decay(plan),
            block=CPU_BLOCK if on_cpu else None,
        )
        return work, k, sq

    def workspace(self, tensor: torch.Tensor, slot: str = "work") -> torch.Tensor:
        """A work buffer shaped like ``tensor``; not optimizer state, never checkpointed.

        On CPU it is kept between steps (a fresh model-sized allocation page-faults its
        memory in again every step); on accelerators it is transient, so the caching
        allocator can lend the memory to activations between steps.
        """
        if tensor.device.type != "cpu":
            return torch.empty_like(tensor)
        key = (id(tensor), slot)
        buf = self._workspaces.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty_like(tensor)
            self._workspaces[key] = buf
        return buf

    def buffer(self, tensor: torch.Tensor, name: str, init: str = "zeros") -> torch.Tensor:
        """Elementwise state buffer ``name`` of local tensor ``tensor``, created on first use."""
        state = self.state[tensor]
        buf = state.get(name)
        if buf is None:
            buf = torch.zeros_like(tensor, memory_format=torch.preserve_format)
            if init == "copy":
                buf.copy_(tensor)
            state[name] = buf
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step over the groups currently in ``param_groups``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        if plan is not None:
            self._closure = closure
            try:
                self._step(plan)
            finally:
                self._closure = None
        return loss

    def _step(self, plan: StepPlan) -> None:
        raise NotImplementedError

    def _bump_step(self) -> None:
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                group["step"] = int(group.get("step", 0)) + 1

    # ------------------------------------------------------------------ introspection
    def record_layer_stats(self, present: torch.Tensor, **values: torch.Tensor) -> None:
        """Keep per-layer figures for logging; layers absent from this call keep their last value
        (engines that step one group at a time still show every layer)."""
        for key, value in values.items():
            old = self._last.get(key)
            if old is None or old.shape != value.shape:
                old = torch.full_like(value, float("nan"))
            self._last[key] = torch.where(present, value, old.to(value.device)).detach()

    @property
    def last_layer_stats(self) -> dict[str, float]:
        """Per-layer figures of the last step for logging, e.g. ``{"lr/encoder.w": 0.01}``."""
        out: dict[str, float] = {}
        for kind, values in self._last.items():
            for name, v in zip(self.table.names, values.tolist()):
                if v == v:  # skip NaN (layer absent from the step)
                    out[f"{kind}/{name}"] = v
        return out

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["layer_state"] = {k: v.clone() for k, v in self.layer_state.items()}
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        layer_state = state_dict.pop("layer_state", {})
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        self.layer_state = {k: v.clone() for k, v in layer_state.items()}
        # The layer table describes the construction-time parameters and stays as it is:
        # under ZeRO, param_groups hold partitions at this point, not parameters.
        self._plans.clear()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for i, group in enumerate(self.param_groups):
            group.setdefault(_GROUP_INDEX, i)
            group.setdefault("step", 0)
