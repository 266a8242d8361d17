"""How much memory an optimizer keeps between steps.

``persistent_bytes(opt)`` is the memory an optimizer holds *between* ``step()`` calls, in
bytes: its state tensors (moments, momentum, secant history), per-layer state, and the
work buffers it keeps alive (lbopt keeps a few on CPU so that every step does not page its
memory in again). Shared storages count once; views into a larger storage count the whole
storage. This is the figure that decides host RAM under ZeRO-Offload, where the optimizer
state lives on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["persistent_bytes", "tensors_of"]


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable through dicts, lists and tuples in ``obj``."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors_of(v)


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def persistent_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of state and kept work buffers of ``optimizer`` (unique storages).

    Counts ``optimizer.state`` (torch's and lbopt's per-parameter state), lbopt's per-layer
    ``layer_state`` and the work buffers lbopt keeps between steps. Parameters and
    gradients are not counted (they belong to the model).
    """
    found = list(tensors_of(dict(optimizer.state)))
    found += list(tensors_of(getattr(optimizer, "layer_state", {})))
    found += list(tensors_of(dict(getattr(optimizer, "_workspaces", {}))))
    return _unique_storage_bytes(found)
