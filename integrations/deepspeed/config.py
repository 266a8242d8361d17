"""The config route: ``"optimizer": {"type": "CBLR", "params": {...}}`` in a DeepSpeed config.

Names. ``"lbopt.<Name>"`` always means lbopt's class (``lbopt.LAMB``, ``lbopt.CBLR``, ...);
the bare names of :mod:`lbopt.registry` that DeepSpeed does not use (``CBLR``, ``MCLR``,
``LARS``, ``AdaGradNorm``, ``AdAdaGrad``, ``AdAdaGradNorm``) work too. ``"Lamb"`` (any case)
is DeepSpeed's own name and keeps DeepSpeed's meaning of its parameters
(:func:`deepspeed_lamb_kwargs`): it runs lbopt's LAMB, exact under ZeRO, with ``max_coeff``/
``min_coeff`` as the trust-ratio clip bounds and DeepSpeed's defaults, and says so in the log.
``"FusedLamb"`` selects DeepSpeed's CUDA kernel unchanged.

Two ways to use such a config:

- :func:`lbopt.integrations.deepspeed.initialize` (in :mod:`.binding`): builds the optimizer
  from the config itself and calls ``deepspeed.initialize`` with it; nothing in DeepSpeed is
  touched.
- :func:`install` for code that calls ``deepspeed.initialize`` itself (``accelerate launch``
  with a DeepSpeed config, HF ``Trainer(deepspeed=...)``): an explicit, opt-in call that wraps
  three ``DeepSpeedEngine`` methods (listed in :data:`.compat.CONFIG_ROUTE`) until
  :func:`uninstall`. Re-entrant and idempotent; ``LBOPT_DEEPSPEED=off`` in the environment makes
  it a no-op for users who want DeepSpeed untouched.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable
from typing import Any

from .compat import UnsupportedDeepSpeedConfig, check_deepspeed

__all__ = [
    "ENV_SWITCH",
    "build_config_optimizer",
    "deepspeed_lamb_kwargs",
    "install",
    "installed",
    "is_lbopt",
    "lbopt_optimizer_class",
    "uninstall",
]

ENV_SWITCH = "LBOPT_DEEPSPEED"
_OFF = {"0", "off", "false", "no"}
_DS_LAMB = "lamb"  # DeepSpeed lower-cases its own names ("Lamb", "LAMB") to this
_FUSED_LAMB = "fusedlamb"
_PREFIX = "lbopt."

# DeepSpeed's LAMB (deepspeed.ops.lamb.FusedLamb): its parameters and defaults.
_DS_LAMB_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "bias_correction": True,
    "max_coeff": 10.0, "min_coeff": 0.01, "eps_inside_sqrt": False, "amsgrad": False,
}


def is_lbopt(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of lbopt's (and so needs the binding under ZeRO)."""
    from lbopt.optim.base import LayerwiseOptimizer

    return isinstance(optimizer, LayerwiseOptimizer)


def lbopt_optimizer_class(name: str | None) -> type | None:
    """The lbopt class a config's ``optimizer.type`` names, or ``None`` when it is not lbopt's.

    ``"lbopt.X"`` is always lbopt's (``ValueError`` listing the names if ``X`` is unknown);
    DeepSpeed's ``"lamb"`` is lbopt's LAMB with DeepSpeed's parameter meaning (see
    :func:`deepspeed_lamb_kwargs`).
    """
    if not name:
        return None
    from lbopt.registry import OPTIMIZERS, get_optimizer_class

    key = str(name)
    if key.lower().startswith(_PREFIX):
        return get_optimizer_class(key[len(_PREFIX):])
    if key.lower() in OPTIMIZERS:
        return get_optimizer_class(key)
    return None


def deepspeed_lamb_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """lbopt LAMB arguments for the params of DeepSpeed's ``"Lamb"``, with DeepSpeed's meaning.

    ``min_coeff``/``max_coeff`` (defaults 0.01/10) become ``trust_clip``; ``eps`` defaults to
    1e-8 and ``weight_decay`` to 0 (DeepSpeed's defaults, not lbopt's 1e-6/0.01); every tensor
    gets a trust ratio (``exclude=False``), as DeepSpeed's kernel gives one to every tensor.
    Raises ``UnsupportedDeepSpeedConfig`` for options lbopt's LAMB does not have.
    """
    unknown = sorted(set(params) - set(_DS_LAMB_DEFAULTS))
    if unknown:
        raise UnsupportedDeepSpeedConfig(
            f"DeepSpeed's \"Lamb\" has no parameter(s) {unknown}; its parameters are "
            f"{sorted(_DS_LAMB_DEFAULTS)}. For lbopt's LAMB (trust_clip, exclude, ...) name \"lbopt.LAMB\"."
        )
    p = {**_DS_LAMB_DEFAULTS, **params}
    for option in ("eps_inside_sqrt", "amsgrad"):
        if p[option]:
            raise UnsupportedDeepSpeedConfig(
                f"DeepSpeed's \"Lamb\" with {option}=true has no lbopt equivalent; drop it (lbopt's LAMB runs, "
                "exact under ZeRO), or name \"FusedLamb\" for DeepSpeed's CUDA kernel (which computes trust ratios "
                "per ZeRO partition, not per layer)"
            )
    return dict(
        lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=p["weight_decay"],
        bias_correction=bool(p["bias_correction"]), trust_clip=(float(p["min_coeff"]), float(p["max_coeff"])),
        exclude=False,
    )


def _tuples(params: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if k in ("betas", "trust_clip") and isinstance(v, list) else v for k, v in params.items()}


def build_config_optimizer(name: str | None, params: dict[str, Any] | None,
                           model_parameters: Iterable[Any]) -> tuple[Any, str] | None:
    """Build the lbopt optimizer a config section names; return ``(optimizer, log line)`` or ``None``.

    ``None`` when ``name`` is not lbopt's (DeepSpeed builds its own optimizer then).
    """
    params = dict(params or {})
    if name is not None and str(name).lower() == _DS_LAMB:
        from lbopt.optim.lamb import LAMB

        kwargs = deepspeed_lamb_kwargs(params)
        line = (
            f"lbopt: config optimizer {name!r} is DeepSpeed's LAMB; it runs as lbopt.LAMB (per-layer trust ratios, "
            f"exact under ZeRO) with DeepSpeed's parameter meaning: trust_clip=(min_coeff, max_coeff)="
            f"{kwargs['trust_clip']}, eps={kwargs['eps']}, weight_decay={kwargs['weight_decay']}, every tensor "
            "adapted (exclude=False). Name \"lbopt.LAMB\" for lbopt's defaults, \"FusedLamb\" for DeepSpeed's kernel."
        )
        return LAMB(model_parameters, **kwargs), line
    cls = lbopt_optimizer_class(name)
    if cls is None:
        return None
    optimizer = cls(model_parameters, **_tuples(params))
    return optimizer, f"lbopt: config optimizer {name!r} runs as lbopt.{cls.__name__}({_short(params)})"


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def check_config_name(name: str) -> None:
    """Raise ``ValueError`` listing the valid names unless ``name`` is lbopt's, DeepSpeed's or torch.optim's."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if str(name).lower() == _FUSED_LAMB:
        return
    try:
        if lbopt_optimizer_class(name) is not None:
            return
    except ValueError as exc:  # "lbopt.Typo"
        raise ValueError(f"Unknown optimizer type {name!r}; valid names: {_valid_names()}") from exc
    if str(name).lower() in DEEPSPEED_OPTIMIZERS or getattr(torch.optim, str(name), None) is not None:
        return
    raise ValueError(
        f"Unknown DeepSpeed optimizer type {name!r} in the config's \"optimizer\" section; "
        f"valid names: {_valid_names()}"
    )


def _valid_names() -> str:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    from lbopt.registry import optimizer_names

    ours = optimizer_names()
    theirs = sorted({n for n in DEEPSPEED_OPTIMIZERS if n.lower() not in {o.lower() for o in ours}} | {"FusedLamb"})
    return (
        f"lbopt: {', '.join(ours)} (or lbopt.<Name>); DeepSpeed: {', '.join(theirs)}; or the name of any "
        "torch.optim class (e.g. AdamW, SGD)"
    )


# --------------------------------------------------------------------------- install / uninstall
_LOCK = threading.RLock()
_ORIGINALS: dict[str, Any] = {}  # DeepSpeedEngine member -> its original; empty when not installed
_MARK = "__lbopt_original__"


class _SuspendedStep:
    """Stands in for an lbopt optimizer's ``step`` while DeepSpeed builds its wrapper.

    ``FP16_UnfusedOptimizer`` calls ``step()`` once with zero gradients to create optimizer
    state eagerly; for lbopt that would count a step and store a secant history.
    """

    def __call__(self, closure: Any = None) -> None:
        return None


def suspend_step(optimizer: Any) -> None:
    """Make ``optimizer.step()`` a no-op until :func:`resume_step` (re-entrant)."""
    if not isinstance(vars(optimizer).get("step"), _SuspendedStep):
        optimizer.step = _SuspendedStep()


def resume_step(optimizer: Any) -> None:
    if optimizer is not None and isinstance(vars(optimizer).get("step"), _SuspendedStep):
        del optimizer.step


def disabled_by_environment() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF


def installed() -> bool:
    """Whether :func:`install` has wrapped DeepSpeed's engine methods (and :func:`uninstall` not yet undone it)."""
    return bool(_ORIGINALS)


def install() -> bool:
    """Let every ``deepspeed.initialize`` in this process build and bind lbopt optimizers.

    Wraps ``DeepSpeedEngine._configure_basic_optimizer`` (config names), ``_is_supported_optimizer``
    (the config's sanity check) and ``_configure_optimizer`` (binds the engine with
    :func:`lbopt.integrations.deepspeed.bind` once DeepSpeed has wrapped an lbopt optimizer).
    Other optimizers go through DeepSpeed's own code unchanged. Idempotent and safe to call
    again while it runs (an import of DeepSpeed inside it can never install twice).

    Returns ``False`` without touching DeepSpeed when ``LBOPT_DEEPSPEED=off``; ``True`` otherwise.
    Raises :class:`.compat.DeepSpeedVersionError` if the installed DeepSpeed lacks a member it wraps.
    """
    if disabled_by_environment():
        return False
    with _LOCK:
        if _ORIGINALS:
            return True
        import deepspeed.runtime.engine as ds_engine

        if _ORIGINALS:  # installed while DeepSpeed was being imported
            return True
        check_deepspeed()
        cls = ds_engine.DeepSpeedEngine
        for name, make in (
            ("_configure_basic_optimizer", _configure_basic_optimizer),
            ("_is_supported_optimizer", _is_supported_optimizer),
            ("_configure_optimizer", _configure_optimizer),
        ):
            current = cls.__dict__[name]
            original = getattr(current, _MARK, current)  # never wrap a wrapper
            wrapper = make(original)
            setattr(wrapper, _MARK, original)
            _ORIGINALS[name] = original
            setattr(cls, name, wrapper)
        return True


def uninstall() -> None:
    """Restore DeepSpeed's engine methods (engines already bound stay bound)."""
    with _LOCK:
        if not _ORIGINALS:
            return
        import deepspeed.runtime.engine as ds_engine

        for name, original in _ORIGINALS.items():
            setattr(ds_engine.DeepSpeedEngine, name, original)
        _ORIGINALS.clear()


def log_rank0(line: str) -> None:
    """One line on rank 0, at WARNING so that DeepSpeed's default log level shows it.

    Used for what a user must be able to see: which implementation runs.
    """
    import logging

    from deepspeed.utils import log_dist

    log_dist(line, ranks=[0], level=logging.WARNING)


def _config_params(engine: Any) -> dict[str, Any]:
    return dict(engine.optimizer_params() or {})


def _configure_basic_optimizer(original: Any) -> Any:
    @functools.wraps(original)
    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        name = self.optimizer_name()
        built = build_config_optimizer(name, _config_params(self), model_parameters)
        if built is not None:
            optimizer, line = built
            log_rank0(line)
            suspend_step(optimizer)  # resumed by _configure_optimizer once the wrapper exists
            self._config.zero_allow_untested_optimizer = True  # an lbopt optimizer is bound, hence exact
            return optimizer
        if name is not None and str(name).lower() == _FUSED_LAMB:
            from deepspeed.ops.lamb import FusedLamb

            log_rank0("lbopt: config optimizer 'FusedLamb' runs DeepSpeed's FusedLamb kernel (trust ratios per tensor "
                 "it is handed: per ZeRO partition under ZeRO)")
            return FusedLamb(model_parameters, **_config_params(self))
        return original(self, model_parameters)

    return _configure_basic_optimizer


def _is_supported_optimizer(original: Any) -> Any:
    @functools.wraps(original)
    def _is_supported_optimizer(self: Any, optimizer_name: str) -> bool:
        check_config_name(optimizer_name)
        return True

    return _is_supported_optimizer


def _configure_optimizer(original: Any) -> Any:
    @functools.wraps(original)
    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        from .binding import bind

        config = self._config
        saved = {k: getattr(config, k) for k in ("zero_force_ds_cpu_optimizer", "zero_allow_untested_optimizer")}
        if client_optimizer is not None and is_lbopt(client_optimizer):
            # lbopt optimizers run on offloaded CPU partitions by design, and are exact once bound
            config.zero_force_ds_cpu_optimizer = False
            config.zero_allow_untested_optimizer = True
            suspend_step(client_optimizer)
        try:
            out = original(self, client_optimizer, model_parameters)
        finally:
            for k, v in saved.items():
                setattr(config, k, v)
            resume_step(client_optimizer)
            resume_step(getattr(self, "basic_optimizer", None))
        if is_lbopt(getattr(self, "basic_optimizer", None)):
            bind(self)
        return out

    return _configure_optimizer
