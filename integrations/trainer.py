"""Hugging Face ``Trainer`` integration: lbopt optimizers see the model's parameter *names*, use
their own hyperparameters, and put their per-layer figures into the Trainer's logs.

Why a factory: given ``optimizer_cls_and_kwargs=(lbopt.LAMB, {...})`` the Trainer calls
``LAMB(groups, **kwargs)`` with two unnamed parameter groups (decayed / not decayed by the
Trainer's own rule) and overwrites ``weight_decay`` with ``TrainingArguments.weight_decay``.
Name-based ``exclude=`` patterns and ``layer_grouping="module"`` then match nothing, and the
optimizer's decay is silently replaced. :func:`trainer_optimizer` instead returns a factory
in the Trainer's factory protocol (transformers ≥ 5: the Trainer calls
``factory()(model, **kwargs)``), which builds ``optimizer_cls(model.named_parameters(), **kwargs)``
over the trainable parameters::

    from lbopt.integrations.trainer import log_layer_stats, trainer_optimizer

    trainer = Trainer(
        model=model, args=args, train_dataset=train,
        optimizer_cls_and_kwargs=trainer_optimizer(lbopt.LAMB, lr=2e-3, weight_decay=0.01,
                                                   exclude="+^classifier\\\\."),
    )
    log_layer_stats(trainer)  # lbopt/lr/<layer>, lbopt/trust_ratio/<layer>, ... in every training log

Hyperparameters: the optimizer uses the keyword arguments given here, else its class
defaults; with ``training_args=`` the missing ``lr`` / ``weight_decay`` are taken from
``TrainingArguments`` instead. Whenever the optimizer's learning rate or weight decay differs
from ``TrainingArguments``' a warning says which value runs (at construction with
``training_args=``, else when training begins under :class:`LayerStatsCallback`).

The same factory works with ``TrainingArguments(deepspeed=...)`` when the DeepSpeed config
has no ``"optimizer"`` section (the Trainer builds the optimizer, DeepSpeed wraps it).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = [
    "LayerStatsCallback",
    "NamedParametersFactory",
    "build_optimizer",
    "check_trainer_hyperparameters",
    "log_layer_stats",
    "trainer_optimizer",
    "unwrap_optimizer",
]

_SHARED = (("lr", "learning_rate"), ("weight_decay", "weight_decay"))


def build_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any
) -> torch.optim.Optimizer:
    """``optimizer_cls([(name, p) for trainable parameters of model], **kwargs)``.

    Also the route for ``Trainer(optimizers=(build_optimizer(model, lbopt.LAMB, ...), None))``
    on transformers versions without optimizer factories.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"build_optimizer: {type(model).__name__} has no trainable parameters")
    return optimizer_cls(named, **kwargs)


class NamedParametersFactory:
    """Transformers' optimizer-factory protocol: ``NamedParametersFactory(cls)(model, **kwargs)``
    builds ``cls`` over ``model``'s named trainable parameters (see :func:`build_optimizer`).

    The Trainer instantiates the first element of ``optimizer_cls_and_kwargs`` with no
    arguments, so :func:`trainer_optimizer` hands it ``functools.partial(NamedParametersFactory, cls)``.
    """

    def __init__(self, optimizer_cls: type[torch.optim.Optimizer], *unexpected: Any, **unexpected_kw: Any) -> None:
        if unexpected or unexpected_kw:
            raise TypeError(
                f"lbopt.integrations.trainer: this transformers version called the optimizer factory with parameter "
                f"groups (as an optimizer class) instead of with the model, so parameter names are lost. Use "
                f"Trainer(optimizers=(build_optimizer(model, {optimizer_cls.__name__}, ...), None)) instead, or "
                "transformers >= 5 (optimizer factories)"
            )
        self.optimizer_cls = optimizer_cls

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return build_optimizer(model, self.optimizer_cls, **kwargs)

    def __repr__(self) -> str:
        return f"NamedParametersFactory({self.optimizer_cls.__name__})"


def trainer_optimizer(
    optimizer_cls: type[torch.optim.Optimizer],
    /,
    *,
    training_args: TrainingArguments | None = None,
    **optimizer_kwargs: Any,
) -> tuple[functools.partial[NamedParametersFactory], dict[str, Any]]:
    """The value for ``Trainer(optimizer_cls_and_kwargs=...)``: ``optimizer_cls`` built from the
    model's *named* trainable parameters with ``optimizer_kwargs``.

    ``training_args``: when given, ``lr`` and ``weight_decay`` missing from
    ``optimizer_kwargs`` are taken from ``training_args.learning_rate`` / ``.weight_decay``,
    and a value given here that differs from ``TrainingArguments``' is used with a warning.
    Without it, missing values are the optimizer class's defaults (``TrainingArguments``
    never overrides them); :class:`LayerStatsCallback` warns about differences when
    training begins.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"trainer_optimizer: expected an optimizer class (e.g. lbopt.LAMB), got {optimizer_cls!r}")
    kwargs = dict(optimizer_kwargs)
    if training_args is not None:
        for key, field in _SHARED:
            if key not in kwargs:
                kwargs[key] = getattr(training_args, field)
        _warn_conflicts(optimizer_cls.__name__, training_args, {k: [v] for k, v in kwargs.items()})
    return functools.partial(NamedParametersFactory, optimizer_cls), kwargs


def _warn_conflicts(name: str, args: TrainingArguments, values: dict[str, list[Any]]) -> list[str]:
    """Warn (once per call) where the optimizer's lr / weight_decay differ from ``args``'."""
    notes = []
    for key, field in _SHARED:
        mine = {_as_float(v) for v in values.get(key, [])}
        theirs = float(getattr(args, field))
        if mine and any(not math.isclose(v, theirs, rel_tol=1e-12, abs_tol=0.0) for v in mine):
            runs = ", ".join(f"{v:g}" for v in sorted(mine))
            notes.append(f"{key}={runs} (TrainingArguments.{field}={theirs:g} is not used)")
    if notes:
        warnings.warn(
            f"{name} runs with its own " + "; ".join(notes) + ". Pass the same value to both (or "
            "training_args= to trainer_optimizer) to silence this.",
            UserWarning,
            stacklevel=3,
        )
    return notes


def _as_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer under Accelerate's / DeepSpeed's wrappers (``.optimizer`` chains)."""
    seen = 0
    while not hasattr(optimizer, "last_layer_stats") and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def check_trainer_hyperparameters(args: TrainingArguments, optimizer: Any) -> list[str]:
    """Warn where the optimizer's learning rate / weight decay differ from ``args``'; return the notes.

    The base learning rate is read as a scheduler saw it (``initial_lr``), so a warm-up that
    has already scaled ``lr`` is not a difference.
    """
    opt = unwrap_optimizer(optimizer)
    groups = getattr(opt, "param_groups", [])
    values = {
        "lr": [g.get("initial_lr", g.get("lr")) for g in groups if g.get("lr") is not None],
        "weight_decay": [g["weight_decay"] for g in groups if "weight_decay" in g],
    }
    return _warn_conflicts(type(opt).__name__, args, values)


class LayerStatsCallback(TrainerCallback):
    """Per-layer figures of the last optimizer step in every training log.

    Adds ``{prefix}{kind}/{layer}`` for each entry of the lbopt optimizer's
    ``last_layer_stats`` (kinds: ``lr`` — the layer's effective learning rate; ``trust_ratio``
    — LAMB's ``r_l``; ``curvature`` — CBLR/MCLR/LARS's ``Ĉ_l``), and with ``summary`` their
    ``min`` / ``median`` / ``max`` over layers (``{prefix}{kind}/min`` ...). ``kinds`` and
    ``layers`` (a regex searched in layer names) filter the per-layer keys.

    The figures go into ``Trainer.state.log_history`` and into the ``logs`` every later
    callback receives. The Trainer calls its ``report_to`` loggers (TensorBoard, W&B, ...)
    *before* callbacks passed as ``callbacks=[...]``; :func:`log_layer_stats` puts this
    callback ahead of them. When training begins it also warns if the optimizer's learning
    rate or weight decay differs from ``TrainingArguments``' (:func:`check_trainer_hyperparameters`).
    """

    def __init__(
        self,
        kinds: Iterable[str] | None = None,
        layers: str | None = None,
        *,
        per_layer: bool = True,
        summary: bool = True,
        prefix: str = "lbopt/",
    ) -> None:
        self.kinds = None if kinds is None else frozenset(kinds)
        self.layers = re.compile(layers) if layers is not None else None
        self.per_layer = per_layer
        self.summary = summary
        self.prefix = prefix

    def figures(self, optimizer: Any) -> dict[str, float]:
        """The keys this callback adds for ``optimizer`` (empty if it keeps no layer statistics)."""
        stats = getattr(unwrap_optimizer(optimizer), "last_layer_stats", None)
        if not stats:
            return {}
        by_kind: dict[str, list[float]] = {}
        out: dict[str, float] = {}
        for key, value in stats.items():
            kind, _, layer = key.partition("/")
            if self.kinds is not None and kind not in self.kinds:
                continue
            by_kind.setdefault(kind, []).append(value)
            if self.per_layer and (self.layers is None or self.layers.search(layer)):
                out[self.prefix + key] = value
        if self.summary:
            for kind, values in by_kind.items():
                ordered = sorted(values)
                n = len(ordered)
                out[f"{self.prefix}{kind}/min"] = ordered[0]
                out[f"{self.prefix}{kind}/median"] = 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
                out[f"{self.prefix}{kind}/max"] = ordered[-1]
        return out

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if kwargs.get("optimizer") is not None:
            check_trainer_hyperparameters(args, kwargs["optimizer"])

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs:  # training logs only (not eval / the final summary)
            return
        figures = self.figures(kwargs.get("optimizer"))
        logs.update(figures)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
            last.update(figures)


def log_layer_stats(trainer: Trainer, **kwargs: Any) -> LayerStatsCallback:
    """Add a :class:`LayerStatsCallback` (``kwargs`` as its) ahead of the Trainer's loggers; return it."""
    callback = LayerStatsCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
