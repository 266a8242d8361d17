"""Shared helpers of the recipe tests: import the recipe modules, launch them for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
ACCELERATE_CONFIGS = REPO / "integrations" / "accelerate"

if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("WORLD_SIZE", None)
    return env


def launch(config: str, recipe: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file integrations/accelerate/<config> recipes/<recipe> <args>``."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--main_process_port",
        str(free_port()),
        str(RECIPES / recipe),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)


def summary_of(proc: subprocess.CompletedProcess, output_dir: Path) -> dict:
    path = Path(output_dir) / "summary.json"
    assert proc.returncode == 0 and path.is_file(), f"recipe failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(path.read_text())
