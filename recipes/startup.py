"""Start-up of a recipe run: name each stage as it begins, and never hang silently.

A launch goes through a few slow stages before its first optimizer step: creating the process
group (under DeepSpeed this loads, or compiles, its CPU communication op), loading the model,
setting up the engine, resuming, the first step. :class:`StartupWatchdog` prints each stage as it
begins and runs a daemon thread that ends the process (exit code :data:`EXIT_STUCK`) with a
message naming the stage when

- a stage lasts longer than ``timeout_s`` (stacks of every thread are dumped to stderr; time the
  process itself spends compiling an op does not count: stopping a build would leave its lock), or
- the main thread has waited more than ``lock_timeout_s`` on a torch-extensions build lock
  (``<TORCH_EXTENSIONS_DIR>/<op>/lock``). torch's ``FileBaton`` waits for that file to vanish
  with no output and no limit; a process killed while building leaves it behind for good.

:func:`default_extensions_dir` gives each virtual environment its own extensions folder, so two
environments never rebuild (and lock) each other's ops.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_STUCK = 75  # a start-up stage (or a build lock) made no progress in time

__all__ = [
    "EXIT_STUCK",
    "StartupWatchdog",
    "building_extension",
    "default_extensions_dir",
    "use_venv_extensions_dir",
    "waiting_on_lock",
]


def default_extensions_dir() -> Path:
    """``<sys.prefix>/torch_extensions``: one folder of compiled ops per virtual environment."""
    return Path(sys.prefix) / "torch_extensions"


def use_venv_extensions_dir() -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to :func:`default_extensions_dir` unless the user chose one; return it.

    Must run before DeepSpeed loads an op (torch reads the variable at build time).
    """
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(default_extensions_dir())
    # One ninja for every build of this folder: ninja versions hash command lines differently
    # (1.11 vs 1.13), so alternating the system's and the virtualenv's ninja recompiles the op on
    # every launch (minutes, under the lock). Prefer the virtualenv's when it has one.
    venv_bin = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (venv_bin / "ninja").exists() and not path.startswith(str(venv_bin) + os.pathsep):
        os.environ["PATH"] = str(venv_bin) + os.pathsep + path
    return os.environ["TORCH_EXTENSIONS_DIR"]


def building_extension(thread_id: int) -> bool:
    """Whether the thread is running torch's ninja build of an extension (it holds the build lock then)."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == "_run_ninja_build" and frame.f_code.co_filename.endswith("cpp_extension.py"):
            return True
        frame = frame.f_back
    return False


def waiting_on_lock(thread_id: int) -> str | None:
    """The lock file the thread is waiting on in torch's ``FileBaton.wait``, if it is."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "wait" and code.co_filename.endswith("file_baton.py"):
            baton = frame.f_locals.get("self")
            return getattr(baton, "lock_file_path", None)
        frame = frame.f_back
    return None


def lock_holders(lock: str) -> list[int] | None:
    """Pids of live processes that hold ``lock`` open (torch's ``FileBaton`` keeps its descriptor
    while it builds); ``[]``: nobody, a stale lock; ``None``: cannot tell (no ``/proc``)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(lock)
    holders = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd.path) == target for fd in os.scandir(f"/proc/{entry.name}/fd")):
                holders.append(int(entry.name))
        except OSError:  # the process ended, or is not ours to inspect
            continue
    return holders


def held_baton(frame) -> Any:
    """The torch ``FileBaton`` this thread acquired and is building under, if any (from its frames)."""
    while frame is not None:
        if frame.f_code.co_name == "_jit_compile" and frame.f_code.co_filename.endswith("cpp_extension.py"):
            baton = frame.f_locals.get("baton")
            return baton if getattr(baton, "fd", None) is not None else None
        frame = frame.f_back
    return None


def _release_lock_and_terminate(signum: int, frame) -> None:
    """SIGTERM during start-up: a rank stopped while compiling (torchrun stops every rank when one
    fails) removes the build lock it holds, so later launches do not wait on it forever."""
    baton = held_baton(frame)
    if baton is not None:
        with contextlib.suppress(OSError):
            os.remove(baton.lock_file_path)
            print(f"released the build lock {baton.lock_file_path} (terminated while compiling)", file=sys.stderr)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class StartupWatchdog:
    """Prints start-up stages; ends the process when one makes no progress in time.

    ``timeout_s`` bounds every stage (0 disables that check); ``lock_timeout_s`` bounds a wait
    on a torch-extensions build lock (0 disables). Call :meth:`stage` as each stage begins and
    :meth:`finish` once the first optimizer step is done.
    """

    def __init__(self, timeout_s: float, lock_timeout_s: float, rank: int = 0, poll_s: float = 0.5) -> None:
        # ranks other than 0 often wait for rank 0 (a barrier): give it the first word on what is stuck
        grace = 15.0 if rank and timeout_s > 0 else 0.0
        self.timeout_s, self.lock_timeout_s, self.rank, self.poll_s = timeout_s + grace, lock_timeout_s, rank, poll_s
        self.limit_s = timeout_s
        self.name = "start-up"
        self.since = time.monotonic()
        self.started = self.since
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._lock_seen: tuple[str, float] | None = None
        self._checked, self._told = 0.0, False
        self._thread: threading.Thread | None = None
        if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints where this process is, any time
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        self._previous_term = None
        if threading.current_thread() is threading.main_thread():
            self._previous_term = signal.signal(signal.SIGTERM, _release_lock_and_terminate)
        if timeout_s > 0 or lock_timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="lbopt-startup-watchdog", daemon=True)
            self._thread.start()

    def stage(self, name: str) -> None:
        """Start stage ``name`` (printed by rank 0, with the seconds since start-up began)."""
        self.name, self.since = name, time.monotonic()
        if self.rank == 0:
            print(f"[start-up {self.since - self.started:5.1f}s] {name}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        """Start-up is over (the first step is done): stop watching."""
        if self.rank == 0 and not self._stop.is_set():
            print(f"[start-up {time.monotonic() - self.started:5.1f}s] first step done", file=sys.stderr, flush=True)
        self.stop()

    def stop(self) -> None:
        """Stop watching (quietly) and give SIGTERM back its previous handler."""
        if self._previous_term is not None and not self._stop.is_set():
            signal.signal(signal.SIGTERM, self._previous_term)
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            lock = waiting_on_lock(self._main) if self.lock_timeout_s > 0 else None
            if lock is None:
                self._lock_seen = None
            elif self._lock_seen is None or self._lock_seen[0] != lock:
                self._lock_seen = (lock, now)
                self._checked, self._told = now, False
            elif self._lock_overdue(now) and now - self._checked >= min(5.0, self.lock_timeout_s):
                self._checked = now
                holders = lock_holders(lock)
                if not holders:  # stale (or cannot tell): say so and stop
                    self._die(self._lock_message(lock, now - self._lock_seen[1], holders), stacks=False)
                if not self._told:
                    print(
                        f"rank {self.rank}: waiting for process {', '.join(map(str, holders))}, which holds the build "
                        f"lock {lock} (compiling the op; this happens once per virtualenv)",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._told = True
            if lock is not None and self._lock_overdue(now):
                self.since = now  # a live process is compiling: waiting for it is progress
                continue
            if building_extension(self._main):
                # never stop a process that is compiling: it would leave the lock behind for every later launch
                self.since = now
                continue
            if self.timeout_s > 0 and now - self.since > self.timeout_s:
                self._die(
                    f"error: rank {self.rank}: start-up stage '{self.name}' made no progress for "
                    f"{now - self.since:.0f} s (--startup_timeout_s {self.limit_s:g}); stacks of every thread "
                    "follow. Raise --startup_timeout_s if this stage is just slow (a big model, a slow disk), "
                    "or 0 to disable the watchdog.",
                    stacks=True,
                )

    def _lock_overdue(self, now: float) -> bool:
        return self._lock_seen is not None and now - self._lock_seen[1] > self.lock_timeout_s

    def _lock_message(self, lock: str, waited: float, holders: list[int] | None) -> str:
        why = (
            "No running process holds it: a process was killed while compiling and left it behind."
            if holders == []
            else "Another process may be compiling this op, or one was killed while compiling and left it behind."
        )
        return (
            f"error: rank {self.rank}: stage '{self.name}' has waited {waited:.0f} s on the torch-extensions "
            f"build lock {lock} (--extension_lock_timeout_s {self.lock_timeout_s:g}). {why} Fix: rm {lock} "
            "(if no compiler is running), then build the op once with `bash scripts/setup.sh`; separate "
            "virtual environments should not share TORCH_EXTENSIONS_DIR."
        )

    def _die(self, message: str, stacks: bool) -> None:
        print(message, file=sys.stderr, flush=True)
        if stacks:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_STUCK)


def build_ops(lock_timeout_s: float = 60.0) -> str:
    """Compile (or check, a no-op when up to date) DeepSpeed's CPU communication op into this
    virtualenv's extensions folder, under the watchdog; return the folder. ``scripts/setup.sh`` runs it
    so that no launch ever compiles."""
    folder = use_venv_extensions_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    watchdog = StartupWatchdog(timeout_s=0, lock_timeout_s=lock_timeout_s)
    watchdog.stage(f"building DeepSpeed's CPU communication op into {folder} (once; minutes the first time)")
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
    watchdog.stop()
    return folder


if __name__ == "__main__":
    if sys.argv[1:] != ["build-ops"]:
        raise SystemExit("usage: python recipes/startup.py build-ops")
    print(f"[setup] DeepSpeed's CPU communication op is built in {build_ops()}")
