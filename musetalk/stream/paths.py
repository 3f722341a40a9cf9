"""Output files that must never be inputs, and small atomic writes.

``musetalk generate --source clip.mp4 --output clip.mp4`` used to finish with exit 0 and the source gone: the
output is written under a temporary name and renamed onto its path at the end, which replaces whatever file that
path names. Every writer checks its output here first, before any work:

* the same path, spelled differently (``./clip.mp4``, ``sub/../clip.mp4``), or reached through a symlink: the
  paths' ``realpath`` are equal;
* another name of the same file (a hard link, or another case on a case-insensitive disk): the existing output
  has the input's ``(st_dev, st_ino)``;
* a frame of a source folder: the folder's files are inputs too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from musetalk.errors import InputError

PathLike = str | os.PathLike


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file a path names (symlinks followed); None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_of(path: Path) -> Iterator[Path]:
    """The path itself and, for a folder (a source of frames), every file directly in it."""
    yield path
    if path.is_dir():
        try:
            yield from (p for p in path.iterdir() if p.is_file())
        except OSError:  # an unreadable folder is refused later, by the reader, with its own message
            return


def find_input_clash(output: PathLike, inputs: Mapping[str, PathLike | None]) -> tuple[str, Path] | None:
    """The first input (its role, e.g. "source", and the file) that ``output`` would overwrite; None if none.

    inputs: role -> path (a file or a folder of frames); None values are skipped.
    """
    out = Path(output).expanduser()
    out_real = os.path.realpath(out)
    out_id = _identity(out)
    for role, given in inputs.items():
        if given is None:
            continue
        for candidate in _files_of(Path(given).expanduser()):
            if os.path.realpath(candidate) == out_real or (out_id is not None and _identity(candidate) == out_id):
                return role, candidate
    return None


def suggest_other_name(output: PathLike) -> Path:
    """``clip.mp4`` -> ``clip-lipsync.mp4`` (the fix offered when an output would overwrite an input)."""
    out = Path(output)
    return out.with_name(f"{out.stem}-lipsync{out.suffix}")


def check_output_not_input(output: PathLike, inputs: Mapping[str, PathLike | None], what: str = "the output"
                           ) -> None:
    """Raise InputError, naming the fix, when ``output`` resolves to the same file as one of ``inputs``."""
    clash = find_input_clash(output, inputs)
    if clash is None:
        return
    role, path = clash
    same = "" if Path(output).expanduser() == path else f" ({path})"
    raise InputError(f"{what} {output} is the same file as the {role}{same}: writing it would destroy the {role}",
                     f"write to another file, e.g. {suggest_other_name(output)}")


def file_key(path: PathLike) -> str:
    """One key for every spelling of a path (``./``, ``..``, symlinks), case-folded: two outputs with the same key
    would be one file (on a case-insensitive disk, names differing only in case are one file too)."""
    return os.path.normcase(os.path.realpath(Path(path).expanduser())).casefold()


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` under a hidden temporary name beside ``path``, then rename it onto ``path``.

    Readers (and a later run after an interruption) see the old file or the complete new one, never a part.
    """
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
