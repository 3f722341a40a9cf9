"""SIGTERM and SIGHUP stop a command exactly as cleanly as Ctrl-C does.

Ctrl-C raises KeyboardInterrupt in the main thread, and every writer already cleans up on it: the video writer
deletes its hidden ``.partial`` file, a temporary avatar removes its folder, a batch records its rows as cancelled
and removes its staging folder. SIGTERM (what ``kill``, systemd, Docker, Ray and job schedulers send) and SIGHUP (a
closed terminal or SSH session) kill Python outright by default, so none of that ran. Inside
:func:`stop_signals_as_interrupt` they raise :class:`Terminated`, a KeyboardInterrupt carrying the signal number,
so the same cleanup runs; the command then exits with ``128 + signal`` (:func:`exit_status`), as a shell reports a
process killed by that signal. The block also ignores SIGXFSZ (see FILE_SIZE_SIGNAL).

Only the first signal raises: a second SIGTERM while the cleanup runs must not interrupt that cleanup (a supervisor
that loses patience sends SIGKILL, which no handler sees anyway). SIGINT raises KeyboardInterrupt as Python's own
handler does, every time.

A handler's exception can be lost. Python runs the handler at the next bytecode of the main thread, wherever that
is, and some extension code drops the exceptions raised in the Python it calls: a SIGTERM that landed in PyAV's
error check while an audio frame was being encoded vanished silently (1 run in 15), and the run went on to write its
output and exit 0. So the signal is also recorded, and :class:`StopSignalHooks` (handed to the pipeline by the
front ends) raises it again between frames, where nothing can swallow it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator

from musetalk.hooks import Hooks

# SIGHUP does not exist on Windows
STOP_SIGNALS: tuple[int, ...] = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                                      if s is not None)

# SIGXFSZ (a write past the file size limit, `ulimit -f`) kills the process by default, mid-write, leaving the partial
# file; ignored, the write fails with EFBIG instead, and the writer cleans up and reports it like a full disk.
FILE_SIZE_SIGNAL: int | None = getattr(signal, "SIGXFSZ", None)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread for SIGTERM / SIGHUP inside :func:`stop_signals_as_interrupt`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    """``15`` -> ``"SIGTERM"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_signal(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: its ``signum`` for :class:`Terminated`; else the stop signal the last
    block received (a library may re-raise our exception as a plain KeyboardInterrupt: Ray does when a signal
    lands in ``ray.wait``); else SIGINT (Ctrl-C)."""
    signum = getattr(exc, "signum", None)
    if signum is None:
        signum = _received if _received is not None else signal.SIGINT
    return int(signum)


def exit_status(exc: BaseException) -> int:
    """``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP (what a shell shows for a killed process)."""
    return 128 + interrupt_signal(exc)


class _Handler:
    """The installed handler: raises Terminated once, then ignores repeats until re-armed; SIGINT raises every time."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        global _received
        if signum == signal.SIGINT:
            _received = signum
            raise KeyboardInterrupt
        if self.fired:
            return
        self.fired = True
        _received = signum
        raise Terminated(signum)


_active: _Handler | None = None  # the handler of the innermost active context (main thread only)
_received: int | None = None  # the stop signal the latest block received (None: none)


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread; handlers restored after.

    Catch the interrupt inside the block to read its signal (:func:`interrupt_signal`, :func:`exit_status`).

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    global _active, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Handler()
    _received = None
    previous: dict[int, Any] = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (`cmd &`)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    if FILE_SIZE_SIGNAL is not None:  # a write past `ulimit -f` then fails with EFBIG, which the writers report
        previous[FILE_SIZE_SIGNAL] = signal.signal(FILE_SIZE_SIGNAL, signal.SIG_IGN)
    outer, _active = _active, handler
    try:
        yield
    finally:  # the caller reads the signal (interrupt_signal) inside the block, in its except clause
        _active, _received = outer, None
        for sig, old in previous.items():
            signal.signal(sig, old)


def reclaim() -> None:
    """Re-install this module's handlers if a library replaced them inside an active block.

    ``ray.init`` sets its own SIGTERM handler in the driver (it calls ``sys.exit(15)``: no message, exit status 15);
    call this right after such a library call. Does nothing outside a block or outside the main thread.
    """
    if _active is None or threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not _active:
            signal.signal(sig, _active)


def raise_if_stopped() -> None:
    """Raise the interrupt of a signal the active block received, again (see the module docstring): Terminated for
    SIGTERM / SIGHUP, KeyboardInterrupt for SIGINT. Does nothing when none was received."""
    if _received is None:
        return
    if _received == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(_received)


class StopSignalHooks(Hooks):
    """Run hooks whose cancel poll re-raises a received stop signal (:func:`raise_if_stopped`): a signal whose
    first exception an extension swallowed still stops the run, at the next frame."""

    def cancelled(self) -> bool:
        raise_if_stopped()
        return False
