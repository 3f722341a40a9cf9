"""Run hooks: how a caller watches and steers one pipeline run, handed in (never imported by a stage).

The pipeline calls the hooks at fixed points of ``prepare_avatar``, ``stream`` and ``generate``:

- ``stage(name)``: a context manager around every model or host stage (``landmarks``, ``vae_encode``, ``unet``,
  ``vae_decode``, ``blend``, ``encode``, ...), on whichever thread runs it;
- ``frame_done()``: once per output frame, as it leaves the stream;
- ``progress(phase, done, total)``: ``phase`` is ``"prepare"`` (source frames) or ``"generate"`` (output frames);
  called with ``done=0`` when a phase starts (``total`` may be None when unknown);
- ``cancelled()``: polled between frames; True stops the run with :class:`musetalk.errors.Cancelled`, after the
  usual clean-up (no partial output, temporary avatars removed).

The profiler, the notebook's live dashboard, the server's job state and the batch runner implement it. Subclass
:class:`Hooks` and override what you need, or pass any object with these four methods.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import ContextManager, Iterator, Protocol, runtime_checkable

from musetalk.errors import Cancelled

PHASES = ("prepare", "generate")


@runtime_checkable
class RunHooks(Protocol):
    """What the pipeline calls during a run (see the module docstring)."""

    def stage(self, name: str) -> ContextManager[object]: ...

    def frame_done(self) -> None: ...

    def progress(self, phase: str, done: int, total: int | None) -> None: ...

    def cancelled(self) -> bool: ...


class Hooks:
    """Hooks that do nothing: the default, and a base class to override selectively."""

    def stage(self, name: str) -> ContextManager[object]:
        return nullcontext()

    def frame_done(self) -> None:
        return None

    def progress(self, phase: str, done: int, total: int | None) -> None:
        return None

    def cancelled(self) -> bool:
        return False


NO_HOOKS = Hooks()


class _Combined(Hooks):
    def __init__(self, hooks: list[RunHooks]) -> None:
        self.hooks = hooks

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.stage(name))
            yield

    def frame_done(self) -> None:
        for hook in self.hooks:
            hook.frame_done()

    def progress(self, phase: str, done: int, total: int | None) -> None:
        for hook in self.hooks:
            hook.progress(phase, done, total)

    def cancelled(self) -> bool:
        return any(hook.cancelled() for hook in self.hooks)


class _Partial(Hooks):
    """An object with only some of the hook methods (e.g. an older profiler with ``stage`` and ``frame_done``)."""

    def __init__(self, obj: object) -> None:
        for name in ("stage", "frame_done", "progress", "cancelled"):
            method = getattr(obj, name, None)
            if callable(method):
                setattr(self, name, method)


def as_hooks(obj: object) -> RunHooks:
    """``obj`` itself when it has every hook method, else a wrapper where the missing ones do nothing."""
    if isinstance(obj, RunHooks):
        return obj
    return _Partial(obj)


def combine(*hooks: object | None) -> RunHooks:
    """One hooks object that calls each given one in order (None entries are dropped); cancelled if any is.

    Objects with only some of the methods are accepted (the missing ones do nothing).
    """
    present = [as_hooks(h) for h in hooks if h is not None]
    if not present:
        return NO_HOOKS
    if len(present) == 1:
        return present[0]
    return _Combined(present)


def check_cancelled(hooks: RunHooks) -> None:
    """Raise :class:`Cancelled` when the hooks ask the run to stop."""
    if hooks.cancelled():
        raise Cancelled("the run was cancelled")


class ProgressBars(Hooks):
    """tqdm progress bars for the two phases (the CLI's and ``generate(progress=True)``'s view of a run)."""

    def __init__(self) -> None:
        self._bar = None
        self._phase: str | None = None

    def progress(self, phase: str, done: int, total: int | None) -> None:
        from tqdm.auto import tqdm

        if phase != self._phase:
            self.close()
            self._phase = phase
            self._bar = tqdm(total=total, desc=phase, unit="frame")
        if self._bar is not None:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
