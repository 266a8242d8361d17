"""The start-up watchdog (recipes/startup.py) in small subprocesses: it ends a stuck process, naming why."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

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
    assert re.search(rf"has waited \d+ s on the torch-extensions build lock {re.escape(str(lock))}", proc.stderr)
    assert "No running process holds it" in proc.stderr and f"rm {lock}" in proc.stderr


def test_a_lock_held_by_a_live_build_is_waited_for(tmp_path):
    """A peer that is really compiling holds the lock open: wait for it (and say so), never time out."""
    lock, ready = tmp_path / "lock", tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)\n"
         f"while not os.path.exists({str(ready)!r}): time.sleep(0.05)\n"
         f"time.sleep(3); os.close(fd); os.remove({str(lock)!r})"]
    )  # fmt: skip
    try:
        while not lock.exists():
            time.sleep(0.05)
        proc = run_script(
            f"""
            from pathlib import Path
            from torch.utils.file_baton import FileBaton
            w = StartupWatchdog(timeout_s=1.5, lock_timeout_s=1, poll_s=0.1)
            w.stage("process group")
            Path({str(ready)!r}).touch()
            FileBaton({str(lock)!r}).wait()
            print("built by the peer")
            """
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0 and "built by the peer" in proc.stdout, proc.stderr
    assert f"waiting for process {holder.pid}, which holds the build lock {lock}" in proc.stderr


def test_sigterm_while_compiling_releases_the_lock(tmp_path):
    """torchrun stops every rank when one fails; a rank stopped mid-build must not leave its lock behind."""
    fake = tmp_path / "fake" / "cpp_extension.py"  # stands in for torch's builder: same function name
    fake.parent.mkdir()
    fake.write_text(
        "import time\nfrom torch.utils.file_baton import FileBaton\n\n"
        "def _jit_compile(path):\n    baton = FileBaton(path)\n    assert baton.try_acquire()\n"
        "    print('compiling', flush=True)\n    time.sleep(60)\n"
    )
    lock = tmp_path / "lock"
    code = (
        f"import sys; sys.path[:0] = [{str(RECIPES)!r}, {str(fake.parent)!r}]\n"
        "from startup import StartupWatchdog\nimport cpp_extension\n"
        f"w = StartupWatchdog(timeout_s=0, lock_timeout_s=60)\ncpp_extension._jit_compile({str(lock)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "compiling" and lock.exists()
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -15 and not lock.exists(), err
    assert f"released the build lock {lock}" in err
