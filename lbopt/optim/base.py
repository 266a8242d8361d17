"""The thin optimizer shell shared by every lbopt optimizer.

It manages what ``torch.optim.Optimizer`` manages (groups, state, ``state_dict``) plus the
three things layer-wise methods add: the *layer table* (which parameters form which
logical layer, which layers are adapted and decayed), the *layout* of whatever local
tensors the step is handed (dense parameters or engine partitions), and the guard that
keeps non-finite gradients out of the optimizer state. The arithmetic lives in
:mod:`lbopt.rules`; subclasses compose it in ``_step``.
"""

from __future__ import annotations

import inspect
import math
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lbopt.layout import LayerTable, Layout, LayoutResolver, ParamRecord, replaced_parameters, resolve_layout
from lbopt.rules.direction import CPU_BLOCK, adam_direction, scaled_adam_direction
from lbopt.stats import LayerStats
from lbopt.validation import check_choice, check_clip, check_range

__all__ = [
    "ConfigMismatchError",
    "ExcludeSpec",
    "Exclusion",
    "LayerwiseOptimizer",
    "NonFiniteGradientError",
    "StepPlan",
    "StepStatistics",
    "check_clip",
    "check_range",
]

ExcludeSpec = Callable[[str, torch.Tensor], bool] | str | Sequence[str] | bool | None
LayerGrouping = str | Callable[[str], str]
_GROUP_INDEX = "group_index"
_CONFIG_KEY = "lbopt_config"
# Rebuilt after unpickling / deep copy (keyed by id() or holding work memory), never serialised.
_TRANSIENT = ("_plans", "_workspaces", "_original_index", "_closure")
# torch.optim.Optimizer's hook registries: torch's own pickling leaves them out too.
_TORCH_HOOKS = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` with ``on_nonfinite="raise"`` when a gradient has NaN/Inf."""


class ConfigMismatchError(ValueError):
    """``load_state_dict`` got the state of a differently configured optimizer."""


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape, also when an engine has already partitioned it.

    DeepSpeed ZeRO-3 (``zero.Init``, e.g. HF ``from_pretrained`` under ZeRO-3) leaves an
    empty ``p.data`` and keeps the real shape in ``p.ds_shape``.
    """
    return tuple(getattr(p, "ds_shape", p.shape))


class _Unpicklable:
    """Stands in, after unpickling, for a callable that could not be pickled (a lambda or closure).

    The layer table it helped build is kept; only a later ``add_param_group`` needs it.
    """

    def __init__(self, what: str, fn: Callable[..., Any]) -> None:
        self.what, self.name = what, _callable_name(fn)

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError(
            f"lbopt: this optimizer was pickled with {self.what}={self.name}, which cannot be pickled (a lambda "
            "or local function); adding parameter groups needs it: use a module-level function"
        )


def _callable_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, _Unpicklable):
        return fn.name
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _picklable(what: str, fn: Any) -> Any:
    """``fn`` itself if it pickles (or is not callable), else an :class:`_Unpicklable` stand-in."""
    if not callable(fn) or isinstance(fn, _Unpicklable):
        return fn
    try:
        pickle.dumps(fn)
    except Exception:
        return _Unpicklable(what, fn)
    return fn


class Exclusion:
    """The ``exclude`` argument, parsed into a picklable predicate ``(name, param) -> bool``.

    - ``None`` (default): parameters with ``ndim <= 1`` (biases, norm weights);
    - ``False`` (or ``[]``): nothing;
    - a regex or a list of regexes, searched in the parameter name: those parameters
      *instead of* the default rule; a pattern written ``"+regex"`` is *added to* the
      default rule (``exclude="+^classifier\\."``: 1-D parameters and the classifier).
      A leading ``+`` can never start a valid regex, so the two cannot be confused;
    - a callable ``(name, param) -> bool``: used as is (a module-level function if the
      optimizer is to be pickled).

    A pattern that matches no parameter name is reported with a warning when the layer
    table is built.
    """

    def __init__(self, spec: ExcludeSpec) -> None:
        self.one_dim = spec is None
        self.patterns: tuple[re.Pattern[str], ...] = ()
        self.predicate: Callable[[str, torch.Tensor], bool] | None = None
        if spec is None or spec is False:
            return
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, Sequence) and all(isinstance(e, str) for e in spec):
            self.one_dim = any(e.startswith("+") for e in spec)
            self.patterns = tuple(_compile_pattern(e.removeprefix("+")) for e in spec)
        elif callable(spec) and not isinstance(spec, bool):
            self.predicate = spec
        else:
            raise ValueError(
                f"Invalid exclude: {spec!r}; expected None (exclude 1-D parameters), False (nothing), a "
                "regex or list of regexes on parameter names (a leading '+' adds the pattern to the 1-D "
                "default), or a callable (name, param) -> bool"
            )

    def __call__(self, name: str, p: torch.Tensor) -> bool:
        if self.one_dim and len(full_shape(p)) <= 1:
            return True
        if any(pat.search(name) for pat in self.patterns):
            return True
        return bool(self.predicate(name, p)) if self.predicate is not None else False

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The patterns that match none of ``names``."""
        names = list(names)
        return [pat.pattern for pat in self.patterns if not any(pat.search(n) for n in names)]

    def describe(self) -> str:
        """A stable text for ``repr`` and the configuration saved in ``state_dict``."""
        parts = ["ndim<=1"] if self.one_dim else []
        if self.patterns:
            parts.append("regex " + " | ".join(pat.pattern for pat in self.patterns))
        if self.predicate is not None:
            parts.append(f"callable {_callable_name(self.predicate)}")
        return " + ".join(parts) if parts else "nothing"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "predicate": _picklable("exclude", self.predicate)}


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"Invalid exclude pattern {pattern!r}: {err}") from None


def _as_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise ``params`` (tensors, ``(name, tensor)`` pairs or group dicts) to group dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a Tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    return [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]


def _describe_grouping(grouping: LayerGrouping) -> str:
    return grouping if isinstance(grouping, str) else f"callable {_callable_name(grouping)}"


def _built_by_zero_redundancy(depth: int = 8) -> bool:
    """True when torch's ZeroRedundancyOptimizer is constructing this optimizer for its rank's share."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if type(owner).__module__ == "torch.distributed.optim.zero_redundancy_optimizer":
            return True
        frame = frame.f_back
    return False


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


@dataclass
class StepStatistics:
    """What phase 1 of a step (statistics) hands to phase 2 (update).

    ``guard``: per-layer ``‖g_l‖²`` (0 for layers absent from the call), checked for
    non-finite values before any state changes. ``to_host``: a 1-D tensor of values phase 2
    needs as Python floats (e.g. per-layer rates), or None. ``values``: anything else
    phase 2 uses, left on the device.
    """

    guard: torch.Tensor
    to_host: torch.Tensor | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def crossing(self) -> torch.Tensor:
        """``[1.0 if every ‖g_l‖² is finite else 0.0, *to_host]`` as one float64 tensor."""
        flag = torch.isfinite(self.guard).all().to(torch.float64).reshape(1)
        if self.to_host is None:
            return flag
        return torch.cat([flag, self.to_host.to(torch.float64).reshape(-1)])


class LayerwiseOptimizer(Optimizer):
    """Base class: groups, layer table, layout resolution and the non-finite guard.

    Subclasses implement ``_step(plan)``. ``needs_all_groups`` is True for methods whose
    statistics combine layers of different parameter groups (a median over all layers, a
    global norm); engine adapters then make sure a single ``step()`` call sees every group.

    torch conventions kept here for every subclass:

    - parameters may be tensors, ``(name, tensor)`` pairs (names enable name-based
      ``exclude`` and ``layer_grouping="module"``) or group dicts; a tensor repeated in one
      list (tied weights) counts once, a tensor in two groups is a ``ValueError``;
    - ``maximize`` (per group): ascend instead of descend. ``step()`` negates the gradients
      of those groups in place, runs the update, and negates them back (bit-exact);
    - ``foreach`` (per group) is accepted for signature compatibility and changes nothing:
      the arithmetic always uses the batched ``torch._foreach_*`` kernels where they help;
    - ``lr`` may be a one-element tensor (as in ``torch.optim``); it is read on the host;
    - any dtype: statistics are carried in ``promote_types(dtype, float32)`` and summed in
      float64, so float64 parameters step in float64;
    - ``state_dict`` carries the configuration (:meth:`_config`), and ``load_state_dict``
      refuses the state of a differently configured optimizer (:class:`ConfigMismatchError`);
    - ``copy.deepcopy`` and pickle round trips (with the model) keep working: per-step
      caches are rebuilt, never serialised.
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
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        if not (layer_grouping in ("tensor", "module") or callable(layer_grouping)):
            raise ValueError(
                f"Invalid layer_grouping: {layer_grouping!r}; expected 'tensor', 'module' or a callable "
                "name -> layer key"
            )
        check_choice("maximize", maximize, (False, True))
        check_choice("foreach", foreach, (None, False, True))
        self._exclude = Exclusion(exclude)
        self._layer_grouping = layer_grouping
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.layer_state: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple[int, ...], StepPlan] = {}
        # set by an engine adapter that knows this optimizer's partitions (lbopt.integrations.fsdp)
        self.layout_resolver: LayoutResolver | None = None
        self._last: dict[str, torch.Tensor] = {}
        self._workspaces: dict[tuple[int, str], torch.Tensor] = {}
        self._closure: Callable[[], Any] | None = None
        defaults = {**defaults, "maximize": maximize, "foreach": foreach}
        super().__init__(_as_groups(params), defaults)
        self._build_layer_table()
        if _built_by_zero_redundancy():
            from lbopt.integrations.fsdp import check_zero_redundancy

            check_zero_redundancy(self)

    # ------------------------------------------------------------------ configuration
    def _config(self) -> dict[str, Any]:
        """What this optimizer *is*, beyond its group hyperparameters: saved in ``state_dict``
        under ``"lbopt_config"``, shown by ``repr``, and compared by ``load_state_dict``.

        Subclasses extend it with their own construction choices (e.g. a curvature
        estimator): ``return {**super()._config(), "curvature": self.curvature}``. Values
        must be plain (str, int, float, bool, None).
        """
        return {
            "optimizer": type(self).__name__,
            "exclude": self._exclude.describe(),
            "layer_grouping": _describe_grouping(self._layer_grouping),
            "layers": self.table.num_layers,
        }

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self._config().items() if k != "optimizer")
        head, _, groups = super().__repr__().partition(" (")  # groups: "\nParameter Group 0\n ...)"
        return f"{head} ({config}{groups}"

    # ------------------------------------------------------------------ layer table
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics); repeats of a tensor inside it count once (tied weights),
        a tensor that is already in another group is a ``ValueError``."""
        param_group = dict(param_group)
        param_group["params"] = self._new_members(param_group["params"])
        param_group.setdefault(_GROUP_INDEX, len(self.param_groups))
        param_group.setdefault("step", 0)
        super().add_param_group(param_group)
        if hasattr(self, "table"):
            self._build_layer_table()

    def _new_members(self, members: Any) -> list[Any]:
        if isinstance(members, torch.Tensor):
            return [members]
        if isinstance(members, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, not a set")
        owner = {id(p): g[_GROUP_INDEX] for g in self.param_groups for p in g["params"]}
        seen: set[int] = set()
        kept = []
        for j, item in enumerate(members):
            tensor = item[1] if isinstance(item, tuple) else item
            if id(tensor) in owner:
                what = repr(item[0]) if isinstance(item, tuple) else f"number {j}"
                raise ValueError(
                    f"Invalid params: parameter {what} of group {len(self.param_groups)} is already in group "
                    f"{owner[id(tensor)]}; each parameter may belong to one group only (torch.optim's rule)"
                )
            if id(tensor) not in seen:
                seen.add(id(tensor))
                kept.append(item)
        return kept

    def _build_layer_table(self) -> None:
        records: list[ParamRecord] = []
        originals: list[torch.Tensor] = []
        keys: dict[Any, int] = {}
        names: list[str] = []
        adapt: list[bool] = []
        layer_group: list[int] = []
        param_names: list[str] = []
        named = False
        for group in self.param_groups:
            gi = group[_GROUP_INDEX]
            pnames = group.get("param_names")
            named = named or bool(pnames)
            for j, p in enumerate(group["params"]):
                name = pnames[j] if pnames else f"group{gi}.param{j}"
                excluded = bool(self._exclude(name, p))
                key = self._layer_key(name, len(records), excluded, bool(pnames))
                if key not in keys:
                    keys[key] = len(names)
                    names.append(name if isinstance(key, int) else key[1])
                    adapt.append(not excluded)
                    layer_group.append(gi)
                layer = keys[key]
                if adapt[layer] == excluded or layer_group[layer] != gi:
                    raise ValueError(
                        f"layer {names[layer]!r} mixes parameters of different parameter groups or of "
                        f"different exclusion (at {name!r}); put a layer's tensors in one group or use "
                        "layer_grouping='tensor'"
                    )
                shape = full_shape(p)
                records.append(
                    ParamRecord(index=len(records), name=name, layer=layer, numel=math.prod(shape), shape=shape)
                )
                originals.append(p)
                param_names.append(name)
        self.table = LayerTable(names=names, adapt=adapt, group=layer_group, params=records)
        self.table.originals = originals  # type: ignore[attr-defined]
        self._original_index = {id(p): r.index for p, r in zip(originals, records)}
        self._plans.clear()
        self._warn_unmatched(param_names, named)

    def _warn_unmatched(self, param_names: list[str], named: bool) -> None:
        missed = self._exclude.unmatched(param_names)
        if not missed:
            return
        hint = (
            "" if named else
            " The parameters have no names (they are called group0.param0, ...): pass model.named_parameters(), "
            "or with the HF Trainer use lbopt.integrations.trainer.trainer_optimizer."
        )
        warnings.warn(
            f"{type(self).__name__}: exclude pattern(s) {missed} match no parameter name, so they exclude "
            f"nothing.{hint}",
            UserWarning,
            stacklevel=4,
        )

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
            self._adopt_replaced_parameters()
            layout = resolve_layout(
                self.table, tensors, self._original_index, resolver=getattr(self, "layout_resolver", None)
            )
            seg_layer = [s.layer for s in layout.segments]
            plan = StepPlan(
                layout=layout, stats=LayerStats(layout), seg_layer=seg_layer,
                seg_group=[self.table.group[layer] for layer in seg_layer],
            )
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _adopt_replaced_parameters(self) -> None:
        """Follow an engine that swapped the parameters for their shards (Accelerate + FSDP2)."""
        current = replaced_parameters(self.table, [list(g["params"]) for g in self.param_groups])
        if current is not None:
            self.table.originals = current  # type: ignore[attr-defined]
            self._original_index = {id(p): r.index for p, r in zip(current, self.table.params)}

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
        """Per-segment β actually applied (0 on excluded layers), on the host."""
        adapt = self.table.adapt
        return [b if adapt[layer] else 0.0 for b, layer in zip(self.seg_hparam(plan, "weight_decay"), plan.seg_layer)]

    def layer_weight_decay(self, device: torch.device) -> torch.Tensor:
        """Per-layer β actually applied: the group's ``weight_decay`` on adapted layers, 0 on
        excluded ones (an excluded layer is neither adapted nor decayed)."""
        return self.layer_hparam("weight_decay", device) * self.layer_mask("adapt", device)

    def layer_mask(self, which: str, device: torch.device) -> torch.Tensor:
        """The layer table's per-layer flags ``which`` (``"adapt"``) as a bool tensor."""
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
        self, plan: StepPlan, grads: list[torch.Tensor], eps_key: str, params: list[torch.Tensor],
        param_sq: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[float], torch.Tensor]:
        """Update the Adam moments; return ``(d, k, ‖d‖²)`` with ``u = k·d = m̂/(√v̂+ε) + βw`` per segment.

        ``d`` lives in the one work buffer (slot ``"adam"``); see
        :func:`lbopt.rules.direction.scaled_adam_direction` (``param_sq``: per-segment ``‖w‖²``
        from the same sweep). All scalars are host floats from the segments' parameter groups;
        on CPU the sweep runs in cache blocks.
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
            param_sq=param_sq,
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
        if plan is None:
            return loss
        ascend = [p for g in self.param_groups if g.get("maximize", False) for p in g["params"]]
        self._closure = closure if closure is None or not ascend else _negating(closure, ascend)
        _negate_grads(ascend)
        try:
            stats = self._statistics(plan)
            if stats is None:
                self._step(plan)
        except BaseException:
            self._end_step(ascend)
            raise
        if stats is None:
            self._end_step(ascend)
            return loss
        # The step's one device→host crossing: the finiteness flag and any per-layer values.
        # It sits in this frame, outside any try block, so that torch.compile breaks the
        # graph here exactly once.
        host = stats.crossing().tolist()
        try:
            if host[0] == 1.0 or not self.nonfinite(stats.guard):
                self._update(plan, stats, host[1:])
        finally:
            self._end_step(ascend)
        return loss

    def _end_step(self, ascend: list[torch.Tensor]) -> None:
        self._closure = None
        _negate_grads(ascend)

    def _step(self, plan: StepPlan) -> None:
        raise NotImplementedError

    def _statistics(self, plan: StepPlan) -> StepStatistics | None:
        """Phase 1 of a two-phase step: every statistic, no state change, no host sync.

        Subclasses that implement it (with :meth:`_update`) give ``step()`` exactly one
        device→host transfer; returning None (the default) runs ``_step`` instead.
        """
        return None

    def _update(self, plan: StepPlan, stats: StepStatistics, host: list[float]) -> None:
        """Phase 2: change state and parameters; ``host`` is ``stats.to_host`` as Python floats."""
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
        sd[_CONFIG_KEY] = self._config()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of an optimizer configured the same way.

        Raises :class:`ConfigMismatchError` (before changing anything) when the saved
        ``"lbopt_config"`` differs from this optimizer's, e.g. CBLR state into LAMB. States
        without a configuration (older checkpoints, engine-built dicts) load unchecked;
        deleting ``state_dict["lbopt_config"]`` forces a load.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop(_CONFIG_KEY, None)
        if saved is not None:
            self._check_config(saved)
        layer_state = state_dict.pop("layer_state", {})
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # states saved before these keys existed
            for key in ("maximize", "foreach"):
                group.setdefault(key, self.defaults[key])
        self.layer_state = {k: v.clone() for k, v in layer_state.items()}
        # The layer table describes the construction-time parameters and stays as it is:
        # under ZeRO, param_groups hold partitions at this point, not parameters.
        self._plans.clear()

    def _check_config(self, saved: dict[str, Any]) -> None:
        mine = self._config()
        diff = [
            f"{key}: saved {saved.get(key, '<absent>')!r}, this optimizer {mine.get(key, '<absent>')!r}"
            for key in sorted(set(saved) | set(mine), key=str)
            if saved.get(key, "<absent>") != mine.get(key, "<absent>")
        ]
        if diff:
            raise ConfigMismatchError(
                f"Invalid state_dict for {type(self).__name__}: it was saved by a differently configured optimizer ("
                + "; ".join(diff)
                + "). Construct the optimizer as it was saved to resume; to load the state anyway, delete "
                f"state_dict[{_CONFIG_KEY!r}] first."
            )

    # ------------------------------------------------------------------ pickling / deepcopy
    def __getstate__(self) -> dict[str, Any]:
        """Everything but per-step caches, torch's hook registries and instance-level patches
        (e.g. an LR scheduler's wrapper around ``step``)."""
        cls = type(self)
        state = {
            k: v for k, v in self.__dict__.items()
            if k not in _TRANSIENT and k not in _TORCH_HOOKS and not (inspect.isroutine(v) and hasattr(cls, k))
        }
        state["_layer_grouping"] = _picklable("layer_grouping", self._layer_grouping)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for i, group in enumerate(self.param_groups):
            group.setdefault(_GROUP_INDEX, i)
            group.setdefault("step", 0)
        self._plans, self._workspaces, self._closure = {}, {}, None
        table = self.__dict__.get("table")
        if table is not None:
            self._original_index = {id(p): r.index for p, r in zip(table.originals, table.params)}


def _negate_grads(params: list[torch.Tensor]) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_neg_(grads)


def _negating(closure: Callable[[], Any], params: list[torch.Tensor]) -> Callable[[], Any]:
    """``closure``, followed by negating the fresh gradients of ``params`` (``maximize`` groups)."""

    def run() -> Any:
        loss = closure()
        _negate_grads(params)
        return loss

    return run
