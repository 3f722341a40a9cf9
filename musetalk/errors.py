"""User-facing errors: each one says what went wrong and how to fix it.

The CLI and server catch :class:`MuseTalkError` and print its message (no traceback); anything else is a bug.
"""

from __future__ import annotations


class MuseTalkError(Exception):
    """Base class of errors caused by the user's input or set-up (not by a bug)."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)


class WeightsError(MuseTalkError):
    """A checkpoint is missing, truncated, unsafe or does not fit the model."""


class InputError(MuseTalkError):
    """A source, audio or parameter given by the user cannot be used."""


class NoFaceError(InputError):
    """No face was found in any frame of the source."""


class Cancelled(Exception):
    """A run stopped because its hooks asked for it (:meth:`musetalk.hooks.RunHooks.cancelled`).

    Not a :class:`MuseTalkError`: nothing was wrong with the input; the caller that cancelled knows why.
    """


class StorageError(MuseTalkError):
    """Writing an output or a cache entry failed: disk full, file size limit, quota, permissions."""
