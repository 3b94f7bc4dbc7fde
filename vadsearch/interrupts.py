"""Ctrl-C (or SIGTERM) in a `worker` or `launch` process: acted on once, never lost, and a second copy
breaks nothing. SIGTERM (systemd, Slurm's time limit, `docker stop`, `kill`) stops the work as Ctrl-C does,
and so does SIGHUP (the terminal closed, the ssh session dropped) unless it is ignored (`nohup`).

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives, which fails two ways:

- Inside a finalizer or weakref callback (torch and SQLAlchemy run them at any moment) the exception is
  printed as "Exception ignored in ..." and dropped: the worker went on to the end of the study, and
  `launch` waited for it. `check()` raises it again where the work can stop cleanly.
- One Ctrl-C often arrives twice: a terminal sends it to every process of its foreground group, and
  `launch` passes it on to its workers (as systemd does with KillMode=control-group). The copy landed in
  the worker's cleanup: a traceback, exit code 1 or -2 instead of 130, the interrupted trial not queued
  again. A copy that comes within REPEAT_WINDOW of the first is ignored.
- Inside a database call, the exception can leave SQLAlchemy's connection inside its transaction, holding
  SQLite's write lock: the worker's own next call (marking its trial interrupted) and every other worker
  on that file then wait out the busy timeout, again and again. A first stop signal that arrives within
  `deferred()` (each storage call, reconnect.py) is raised when the call returns; a later one, the user
  insisting, raises at once.
- Inside torch, where its C++ calls back into Python (importing it, a training step), the exception
  aborted the process (`std::terminate`, exit -6) or left CPython's flag of an unhandled Ctrl-C set, so the
  worker killed itself with SIGINT as it exited (-2 where 143 was due). A trial runs within `deferred()`
  and raises a held stop at its stop points (`stop_point()`: between training steps, after building the
  model); torch is imported within it too. Nor does a held stop land in a finalizer ("Exception ignored").
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

REPEAT_WINDOW = 5.0
"""Seconds after a SIGINT in which another is a copy of it; a later one is the user insisting: it raises."""

_first: tuple[float, int] | None = None  # when the first stop signal came, and which one
_active = False  # within `handled()`: elsewhere (a library caller, a later command in-process) check() is a no-op
_depth = 0  # nesting of `deferred()` blocks in the main thread
_held = False  # a stop signal came within them: raised as the outermost one ends


def _handler(signum, frame) -> None:
    global _first, _held
    now = time.monotonic()
    if _first is not None and now - _first[0] < REPEAT_WINDOW:
        return
    if _first is None:
        _first = (now, signum)
        if _depth:
            _held = True
            return
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_starting: dict[int, object] = {}  # the handlers `while_starting` replaced


def _exit_at_once(signum, frame) -> None:
    raise SystemExit(128 + signum)


def while_starting() -> None:
    """Until `started()`: a stop signal ends the process at once, quietly, with its exit code. Before a command
    begins there is nothing to stop cleanly, and `launch` passes a Ctrl-C on to workers that may still be
    starting: their logs held a KeyboardInterrupt traceback from the argument parser."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:  # `nohup`, or a shell's `cmd &`: left ignored
            _starting[signum] = signal.signal(signum, _exit_at_once)


def started() -> None:
    """Put back the handlers `while_starting` replaced: the command handles stop signals its own way."""
    while _starting:
        signum, previous = _starting.popitem()
        signal.signal(signum, previous)


def stopped() -> tuple[str, int]:
    """What stopped this process, in words, and the exit code that says so (128 + the signal's number)."""
    signum = _first[1] if _first is not None else signal.SIGINT
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return what, 128 + signum


def check() -> None:
    """Raise the KeyboardInterrupt of a stop signal that was swallowed where it landed."""
    global _held
    if _active and _first is not None:
        _held = False  # raised now: not again as a `deferred()` block ends
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """Within: a first stop signal is held until the block ends (see above). Signals reach only the main
    thread, so elsewhere (Optuna's heartbeat thread) this does nothing."""
    global _depth, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _held:
            _held = False
            raise KeyboardInterrupt  # in place of any exception the call raised: stopping comes first


def stop_point() -> None:
    """Within `deferred()`: raise the stop signal held so far. Long work calls it where stopping is safe
    (between training steps), so a stop waits for one step, not for the whole block."""
    global _held
    if _held:
        _held = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled():
    """Within: SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt once, as described above."""
    global _first, _active, _held
    _first, _held = None, False
    # Under `nohup` a hang-up is ignored on purpose: the worker outlives its terminal.
    caught = [s for s in STOP_SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)]
    previous = {signum: signal.signal(signum, _handler) for signum in caught}
    _active = True
    try:
        yield
    finally:
        _active = False
        for signum in caught:
            # Stopping on a signal: a late copy must not break the exit (at shutdown Python puts the default
            # action back for a handler of its own, and a copy then kills the process: exit -2, not 130).
            signal.signal(signum, signal.SIG_IGN if _first is not None else previous[signum])
