"""DeepSpeed adapter: exact layer statistics on ZeRO partitions, bound explicitly, version-checked.

Importing lbopt never touches DeepSpeed. An engine is bound to its lbopt optimizer in one of
three explicit ways:

- ``engine, *_ = lbopt.integrations.deepspeed.initialize(model=..., config=..., ...)``:
  ``deepspeed.initialize`` plus the binding; an lbopt optimizer may be passed or named in the
  config (``"optimizer": {"type": "CBLR"}``). Nothing in DeepSpeed is patched.
- ``lbopt.integrations.deepspeed.bind(engine)`` after your own ``deepspeed.initialize`` with
  an lbopt optimizer (ZeRO stages 0-3, bf16 with ZeRO; not fp16/bf16 without ZeRO, whose
  wrapper steps the optimizer while it is built: use ``initialize`` or ``install`` there).
- ``lbopt.integrations.deepspeed.install()`` once, for code that calls ``deepspeed.initialize``
  itself (``accelerate launch`` with a DeepSpeed config, HF ``Trainer(deepspeed=...)``): config
  names such as ``"CBLR"`` become valid and every engine built with an lbopt optimizer is
  bound. It wraps three ``DeepSpeedEngine`` methods until ``uninstall()``; ``LBOPT_DEEPSPEED=off``
  makes it a no-op.

Each route yields a :class:`DeepSpeedBinding` (``engine.lbopt_binding``) that says which
implementation runs, in which DeepSpeed wrapper, and what it replaced on that wrapper
instance; a log line on rank 0 says the same. The package is split by job:

- :mod:`.compat` — every DeepSpeed internal the adapter touches, checked once
  (:func:`check_deepspeed`), failing with the DeepSpeed version and the missing member;
- :mod:`.partitions` — reading the wrapper's partitions; the optimizer's layout resolver;
- :mod:`.step` — one ``step()`` over all groups where a method's statistics span groups;
- :mod:`.checkpoint` — universal checkpoints (:func:`to_universal`);
- :mod:`.config` — config names (DeepSpeed's ``"Lamb"`` keeps its meaning), ``install()``;
- :mod:`.binding` — :func:`bind`, :func:`initialize`;
- :mod:`.batch` — :func:`attach_deepspeed`, :func:`deepspeed_steps` for a growing batch.

Unsupported set-ups (pipeline or tensor parallelism, MoE expert groups, ZeRO++ hpZ,
ZenFlow, NVMe optimizer swapping with cross-group steps) raise
:class:`UnsupportedDeepSpeedConfig`. Importing this package does not import DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from .binding import DeepSpeedBinding, bind, binding_of, initialize
from .checkpoint import to_universal
from .compat import DeepSpeedVersionError, UnsupportedDeepSpeedConfig, check_deepspeed
from .config import ENV_SWITCH, install, installed, lbopt_optimizer_class, uninstall
from .partitions import DeepSpeedLayouts

__all__ = [
    "ENV_SWITCH",
    "DeepSpeedBinding",
    "DeepSpeedLayouts",
    "DeepSpeedVersionError",
    "UnsupportedDeepSpeedConfig",
    "attach_deepspeed",
    "bind",
    "binding_of",
    "check_deepspeed",
    "deepspeed_steps",
    "initialize",
    "install",
    "installed",
    "lbopt_optimizer_class",
    "to_universal",
    "uninstall",
]


def __getattr__(name: str) -> Any:  # the batch plumbing imports the controller only when asked for
    if name in ("attach_deepspeed", "deepspeed_steps"):
        from . import batch

        return getattr(batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
