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

import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path

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
    return os.environ["TORCH_EXTENSIONS_DIR"]


def building_extension(thread_id: int) -> bool:
    """Whether the thread is compiling a torch extension itself (it holds the build lock then)."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_name == "_jit_compile" and frame.f_code.co_filename.endswith("cpp_extension.py"):
            return waiting_on_lock(thread_id) is None
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
        self._thread: threading.Thread | None = None
        if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints where this process is, any time
            faulthandler.register(signal.SIGUSR1, all_threads=True)
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
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            lock = waiting_on_lock(self._main) if self.lock_timeout_s > 0 else None
            if lock is None:
                self._lock_seen = None
            elif self._lock_seen is None or self._lock_seen[0] != lock:
                self._lock_seen = (lock, now)
            elif now - self._lock_seen[1] > self.lock_timeout_s:
                self._die(self._lock_message(lock, now - self._lock_seen[1]), stacks=False)
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

    def _lock_message(self, lock: str, waited: float) -> str:
        return (
            f"error: rank {self.rank}: stage '{self.name}' has waited {waited:.0f} s on the torch-extensions "
            f"build lock {lock} (--extension_lock_timeout_s {self.lock_timeout_s:g}). Another process is "
            "compiling this op, or one was killed while compiling and left the lock behind. If no process is "
            f"building (no compiler in `ps`), remove it: rm {lock} -- and build the op once with "
            "`bash scripts/setup.sh`. Separate virtual environments should not share TORCH_EXTENSIONS_DIR."
        )

    def _die(self, message: str, stacks: bool) -> None:
        print(message, file=sys.stderr, flush=True)
        if stacks:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_STUCK)
