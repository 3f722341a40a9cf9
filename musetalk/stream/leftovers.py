"""What a killed run left behind, removed by the next run that writes to the same place.

Every exit path we can see (an error, Ctrl-C, SIGTERM, SIGHUP, disk full) removes its temporary files itself. A
SIGKILL, an OOM kill or a power cut runs no code: a hidden ``.clip.<id>.partial.mp4`` stays beside the output and a
hidden ``.<name>.<id>`` folder beside the cached avatars. So every such temporary entry is *held* while its run
lives: an advisory lock (``flock``) on it, which the kernel drops when the process ends, however it ends. A later
run removes the entries of its own naming pattern in that folder that nobody holds and that have not changed for
``min_age_s`` (a run that has just created its entry may not hold it yet).

Where ``fcntl`` is missing (Windows) nothing is held and nothing is swept: a leftover stays rather than a live
run's file being removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MIN_AGE_S = 60.0
MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"  # what tempfile.mkdtemp appends to its prefix


class Hold:
    """A lock on a temporary file or folder for as long as this object lives (or until :meth:`release`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            # shared: several holders may share one entry. Blocking: a sweep's exclusive check lasts microseconds
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def _is_held(path: Path) -> bool:
    """True when a live process holds ``path`` (or it cannot be checked: then it is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the lock just taken
    return False


def sweep(folder: str | os.PathLike, pattern: re.Pattern[str], min_age_s: float = MIN_AGE_S) -> list[Path]:
    """Remove the entries of ``folder`` whose whole name matches ``pattern``, that no process holds and that have
    not been modified for ``min_age_s``. Returns what was removed; errors (another user's file) leave it there."""
    if fcntl is None:
        return []
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if now - entry.lstat().st_mtime < min_age_s or entry.is_symlink() or _is_held(entry):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:
            log.debug("left %s in place: %s", entry, err)
            continue
        log.info("removed %s, left behind by a run that was killed", entry)
        removed.append(entry)
    return removed


def held_temp_dir(prefix: str, parent: str | os.PathLike | None = None,
                  leftovers: re.Pattern[str] | None = None) -> tuple[Path, Hold]:
    """A new folder ``<parent>/<prefix><8 random characters>`` (``tempfile.mkdtemp``; ``parent`` defaults to the
    temporary folder) and the :class:`Hold` on it. What killed runs left in ``parent`` is swept first: the entries
    matching ``leftovers``, by default the folders this function names with the same ``prefix``."""
    folder = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep(folder, leftovers or re.compile(re.escape(prefix) + MKDTEMP_SUFFIX))
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    return path, Hold(path)
