"""Checkpoints that are complete or invisible: written aside, marked, then renamed into place.

Layout under ``<output_dir>/checkpoints/``:

- ``step_<N>/``: a complete checkpoint -- ``accelerator.save_state`` files (DeepSpeed shards,
  RNG states, the LR scheduler and the recipe's progress) plus :data:`MARKER`, a small JSON file
  naming the step, the optimizer and the run's shape. The marker is written last, and the
  folder only gets its final name by a rename once every rank has finished writing, so a crash
  during a save leaves at most a ``.incomplete-step_<N>/`` folder, never a ``step_<N>/`` one.
- ``.incomplete-step_<N>/``: a save in progress or one that was interrupted; never resumed from,
  removed by the next successful save.

``latest`` (``--resume_from_checkpoint latest``) is the complete checkpoint with the highest step.
``--save_total_limit K`` keeps the newest K complete ones. All paths assume a file system every
rank sees (as DeepSpeed's own resume does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

MARKER = "lbopt_checkpoint.json"
INCOMPLETE = ".incomplete-"
# test hook: the main process kills itself (SIGKILL) in the middle of saving this step
KILL_DURING_SAVE_ENV = "LBOPT_RECIPES_KILL_DURING_SAVE"

__all__ = [
    "MARKER",
    "checkpoint_dir",
    "complete_checkpoints",
    "describe",
    "latest_checkpoint",
    "prune",
    "save_atomically",
]


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Final folder of the checkpoint at ``step``."""
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def describe(folder: Path) -> dict | None:
    """The checkpoint's marker (a dict), or None when the folder is not a complete recipe checkpoint."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest (lowest step) first."""
    found = []
    for folder in (Path(output_dir) / "checkpoints").glob("step_*"):
        info = describe(folder)
        if folder.is_dir() and info is not None and isinstance(info.get("step"), int):
            found.append((info["step"], folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def save_atomically(accelerator, output_dir: Path, step: int, marker: dict) -> Path:
    """``accelerator.save_state`` into a temporary folder, then marker, then rename (collective).

    Every rank must call it. Returns the final folder.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(INCOMPLETE + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's shards are on disk
    if accelerator.is_main_process:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / MARKER).write_text(json.dumps({**marker, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _remove_incomplete(final.parent)
    accelerator.wait_for_everyone()
    return final


def prune(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep`` <= 0: keep all); return the deleted."""
    if keep <= 0:
        return []
    old = complete_checkpoints(output_dir)[:-keep]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def _remove_incomplete(folder: Path) -> None:
    for stale in folder.glob(INCOMPLETE + "*"):
        shutil.rmtree(stale, ignore_errors=True)
