"""Run integration code when (and only when) an engine such as DeepSpeed is imported.

``import lbopt`` must stay fast and must not import DeepSpeed, yet a DeepSpeed config that
names ``"CBLR"`` has to work without any extra call. :func:`when_imported` solves both: if
the module is already imported the callback runs at once; otherwise a small meta-path
finder wraps the module's loader so that the callback runs right after the module has
finished executing (so the callback sees a fully initialised package).

Callbacks are ``"module:function"`` strings, imported only when they fire.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

__all__ = ["install_integration_hooks", "when_imported"]

_HOOKS: dict[str, list[str]] = {}
_LOCK = threading.RLock()

# Engines lbopt adapts to, and the function that installs each adapter.
INTEGRATIONS: dict[str, str] = {
    "deepspeed": "lbopt.integrations.deepspeed:install",
}


def _run(target: str, module_name: str) -> None:
    mod, _, attr = target.partition(":")
    try:
        getattr(importlib.import_module(mod), attr)()
    except Exception as exc:  # never break the user's import of the engine
        warnings.warn(
            f"lbopt: could not install the {module_name} integration ({target}): {exc!r}; "
            f"lbopt optimizers will refuse {module_name} partitions rather than compute wrong statistics",
            RuntimeWarning,
            stacklevel=2,
        )


class _HookLoader(importlib.abc.Loader):
    """Delegates to the real loader, then fires the hooks registered for the module."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            targets = _HOOKS.pop(self._name, [])
        for target in targets:
            _run(target, self._name)

    def __getattr__(self, item: str) -> Any:  # get_source, is_package, resource readers, ...
        return getattr(self._loader, item)


class _HookFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _HOOKS or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookLoader(spec.loader, fullname)
        return spec


_FINDER = _HookFinder()


def when_imported(module_name: str, target: str) -> None:
    """Call ``target`` (``"module:function"``) once ``module_name`` has been imported.

    Runs immediately when the module is already in ``sys.modules``.
    """
    if module_name in sys.modules:
        _run(target, module_name)
        return
    with _LOCK:
        hooks = _HOOKS.setdefault(module_name, [])
        if target not in hooks:
            hooks.append(target)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def install_integration_hooks() -> None:
    """Arrange for every known engine adapter to install itself when its engine is imported."""
    for module_name, target in INTEGRATIONS.items():
        when_imported(module_name, target)
