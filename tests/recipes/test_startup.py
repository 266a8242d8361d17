"""The start-up watchdog (recipes/startup.py) in small subprocesses: it ends a stuck process, naming why."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.recipes.helpers import RECIPES

import startup  # noqa: E402  isort: skip


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    prelude = f"import sys, time; sys.path.insert(0, {str(RECIPES)!r}); from startup import StartupWatchdog\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_a_stage_without_progress_ends_the_process_naming_it():
    proc = run_script(
        """
        w = StartupWatchdog(timeout_s=1, lock_timeout_s=0, poll_s=0.1)
        w.stage("model and data (some/model)")
        time.sleep(30)
        """
    )
    assert proc.returncode == startup.EXIT_STUCK
    assert "start-up stage 'model and data (some/model)' made no progress for 1 s" in proc.stderr
    assert "in <module>" in proc.stderr  # the stacks say where the main thread was


def test_progress_and_finish_keep_the_watchdog_quiet():
    proc = run_script(
        """
        w = StartupWatchdog(timeout_s=1.5, lock_timeout_s=1, poll_s=0.1)
        for name in ("process group", "model", "engine set-up", "first step"):
            w.stage(name)
            time.sleep(0.8)
        w.finish()
        time.sleep(2)
        print("survived")
        """
    )
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr
    assert "[start-up" in proc.stderr and "first step done" in proc.stderr


def test_a_stale_torch_extensions_lock_names_the_path_and_the_fix(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # what a process killed while compiling leaves behind
    proc = run_script(
        f"""
        from torch.utils.file_baton import FileBaton
        w = StartupWatchdog(timeout_s=0, lock_timeout_s=1, poll_s=0.1)
        w.stage("process group")
        FileBaton({str(lock)!r}).wait()  # torch waits here forever
        """
    )
    assert proc.returncode == startup.EXIT_STUCK
    assert f"has waited 1 s on the torch-extensions build lock {lock}" in proc.stderr
    assert f"rm {lock}" in proc.stderr
