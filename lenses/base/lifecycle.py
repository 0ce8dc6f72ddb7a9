"""How a process ends: background work, signals and exit codes, in one place.

1. Exit codes (`EXIT`): 0 done, 2 the user's input (a `LensesError`), 3 a bug of ours (a crash log to
   report), 130 interrupted, 141 the reader of our output went away. Nothing else, never an abort.
2. Background threads start through `start_background` and are joined by `join_background` before the
   process ends: a thread inside the compiler when the interpreter shuts down aborts the process
   (``terminate called without an active exception``, status 134).
3. Ctrl-C and SIGTERM go through `Signals`: the first sets the flag `stop_requested` (and, where the
   caller asks, raises `KeyboardInterrupt` at once); jobs check the flag at safe boundaries
   (`check_stop`), so a `KeyboardInterrupt` lost inside a ``__del__`` still stops the run with 130. A
   further signal while background work is being joined ends the process at once (``os._exit(130)``:
   no C++ destructors run, so no abort).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT = {"done": 0, "input": 2, "bug": 3, "interrupted": 130, "broken pipe": 141}
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_threads: list[threading.Thread] = []
_stops = [0]  # signals received since the flag was last cleared
_joining = [False]
_depth = [0]  # nested `Signals` (a CLI around a job): the outermost starts with the flag cleared


# --------------------------------------------------------------------------- background work


def start_background(target: Callable[[], None], name: str) -> threading.Thread:
    """Run ``target`` in a thread that `join_background` waits for (and the interpreter too: not a daemon)."""
    thread = threading.Thread(target=target, name=name, daemon=False)
    _threads.append(thread)
    thread.start()
    return thread


def join_background() -> None:
    """Wait for every background thread (a compile cannot be cancelled; it ends in seconds). A signal
    meanwhile ends the process at once, cleanly (`quit_now`)."""
    _joining[0] = True
    try:
        while _threads:
            thread = _threads[0]
            while thread.is_alive():
                thread.join(0.1)
            _threads.pop(0)
    except KeyboardInterrupt:
        quit_now()
    finally:
        _joining[0] = False


def quit_now(status: int = EXIT["interrupted"]) -> None:
    """End the process now without running C++ destructors (nothing half-written: our files are written
    to a temporary name and renamed)."""
    print("interrupted: stopped at once", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --------------------------------------------------------------------------- signals


def stop_requested() -> bool:
    """Whether Ctrl-C or SIGTERM asked this process to stop."""
    return _stops[0] > 0


def check_stop() -> None:
    """At a safe boundary: raise `KeyboardInterrupt` if a signal asked us to stop (the CLIs map it to 130)."""
    if _stops[0]:
        raise KeyboardInterrupt


def clear_stop() -> None:
    _stops[0] = 0


class Signals:
    """Install the handler for Ctrl-C and SIGTERM (main thread only; elsewhere a no-op).

    ``raise_at_once``: the first signal also raises `KeyboardInterrupt` where the program is (the CLIs'
    default); without it, the first only sets the flag and the job stops at its next step boundary
    (training: checkpointed), and a second raises. While `join_background` runs, a signal quits at once.
    """

    def __init__(self, raise_at_once: bool = True):
        self.raise_at_once = raise_at_once
        self.old: dict = {}

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            if not _depth[0]:
                clear_stop()
            _depth[0] += 1
            self.old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        _stops[0] += 1
        if _joining[0]:
            quit_now()
        if self.raise_at_once or _stops[0] > 1:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> bool:
        if self.old:
            _depth[0] -= 1
            if not _depth[0]:
                clear_stop()  # the signal was answered (the CLI's status says so); later calls start afresh
        for s, old in self.old.items():
            signal.signal(s, old)
        return False
