"""Ctrl-C while a trainer's loop runs: always a stop, always between two steps.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. In a
training loop that may be inside a finaliser (`__del__`, a weakref callback) that the garbage
collector runs while a figure is drawn or a checkpoint is serialised: Python then prints the
exception as "Exception ignored in ..." and carries on, so the run went on to its end and exited 0
(issue 21, fault 5). Inside `StopRequests` the first Ctrl-C only sets a flag, which the loop reads
between steps (`check`) and turns into a KeyboardInterrupt there, where nothing can swallow it and
every file is whole; a second Ctrl-C raises at once, for a step that takes too long to wait for.
"""

from __future__ import annotations

import signal
import threading


class StopRequests:
    """`with StopRequests() as stop: ... stop.check()` (module docstring). Outside the main thread
    (where no signal handler can be installed) Ctrl-C keeps Python's behaviour; where SIGINT is
    ignored (a job started with `nohup`, or in the background of a non-interactive shell) it stays
    ignored: such a run is meant to outlive the terminal's Ctrl-C."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self, requested: bool | None = None):
        """Raise KeyboardInterrupt when Ctrl-C was pressed (`requested`: the flag as every process
        of a distributed run sees it, so that all stop at the same step)."""
        if self.requested if requested is None else requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
