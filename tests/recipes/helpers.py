"""Shared helpers of the recipe tests: import the recipe modules, launch them for real."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import free_port, launch_env  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
ACCELERATE_CONFIGS = REPO / "integrations" / "accelerate"

if str(RECIPES) not in sys.path:
    sys.path.insert(0, str(RECIPES))


def launch(
    config: str,
    recipe: str,
    args: list[str],
    timeout: float = 300,
    env: dict[str, str | None] | None = None,
    launcher_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file integrations/accelerate/<config> <launcher_args> recipes/<recipe> <args>``.

    ``env`` adds to (or, with a value of None, removes from) the launch environment."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--main_process_port",
        str(free_port()),
        *launcher_args,
        str(RECIPES / recipe),
        *args,
    ]
    full_env = launch_env()
    # a start-up that makes no progress ends well inside the test's own limit, naming its stage
    full_env["LBOPT_STARTUP_TIMEOUT_S"] = str(int(min(180, timeout / 2)))
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    # own session: on timeout the launcher *and* its ranks are killed, not just the launcher
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "(no output: the ranks still held the pipes)"
        raise AssertionError(f"launch timed out after {timeout} s:\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its ranks (torchrun starts each rank in a session of its own, so
    killing the launcher's process group alone leaves them running)."""
    for victim in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def strict_json(path: Path) -> dict:
    """Parse a JSON file, refusing the NaN / Infinity literals strict parsers reject."""

    def refuse(name: str):
        raise ValueError(f"{path} holds the non-JSON literal {name}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def summary_of(proc: subprocess.CompletedProcess, output_dir: Path) -> dict:
    path = Path(output_dir) / "summary.json"
    assert proc.returncode == 0 and path.is_file(), f"recipe failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(path.read_text())
