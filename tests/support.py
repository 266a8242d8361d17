"""Helpers every test package uses: ports, launch environments, parameter comparisons."""

from __future__ import annotations

import os
import socket

import torch
from torch import nn


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """Environment for launched training processes: offline, CPU DeepSpeed, one thread each."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("WORLD_SIZE", None)  # the launcher sets it per process
    return env


def flat(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance ``‖a − b‖ / ‖b‖``."""
    return float((a - b).norm() / b.norm())


def end_worker() -> None:
    """Leave a launched worker without interpreter teardown, once its results are written.

    Barrier, destroy the process group, flush, ``os._exit(0)``. A process that built several
    DeepSpeed engines (or ZeRO-3 engines) occasionally aborts in C++ teardown at a normal exit
    ("terminate called without an active exception": a thread still joinable when its owner is
    destroyed), after every result was saved; seen in CI on tests/batch/loop_worker.py (three
    ZeRO-2 engines in one process) and earlier on ZeRO-3 workers. Skipping teardown keeps such
    an abort from failing a run whose numbers are already on disk and checked by the test.
    """
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
