"""Fetching the registered weight files: resumable (HTTP Range into ``<file>.part``), size- and hash-checked, atomic.

A file is only ever renamed into place once it has its registered size and hash; until then it lives in
``<dest>.part`` beside it, which the next run resumes. A file whose hash is wrong is removed, never kept.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from musetalk.errors import WeightsError
from musetalk.weights.reader import converted_path, load_state_dict, safetensors_metadata, META_SOURCE
from musetalk.weights.registry import WeightFile, files_in

CHUNK = 1 << 20
ATTEMPTS = 4  # per file: a dropped connection resumes from the bytes already in .part
TIMEOUT_S = 60.0
Log = Callable[[str], None]


def plan(versions: Iterable[str], dwpose: bool = False, syncnet: bool = False) -> list[WeightFile]:
    """The registered files `musetalk download` fetches for these options (table order)."""
    groups = [*versions, "common"] + (["dwpose"] if dwpose else []) + (["syncnet"] if syncnet else [])
    return files_in(groups)


def sha256_of(path: Path, chunk: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_hash(entry: WeightFile, digest: str) -> bool:
    """True when ``digest`` matches the registered hash (or its known prefix); True when nothing is known."""
    if entry.sha256:
        return digest == entry.sha256
    if entry.sha256_prefix:
        return digest.startswith(entry.sha256_prefix)
    return True


def size_problem(entry: WeightFile, path: Path) -> str | None:
    """None when ``path`` has the registered size (or none is registered), else a sentence saying how it differs."""
    if entry.size is None:
        return None
    size = path.stat().st_size
    if size == entry.size:
        return None
    if size < entry.size:
        return f"truncated: {size:,} of {entry.size:,} bytes"
    return f"wrong size: {size:,} bytes, expected {entry.size:,}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _reachable(url: str, timeout: float = 5.0) -> bool:
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def fetch(entry: WeightFile, models_dir: Path, *, endpoint: str | None = None, attempts: int = ATTEMPTS,
          log: Log = print) -> Path:
    """Download one file to ``models_dir / entry.dest``, resuming ``.part``; checks size and hash, then renames.

    Raises :class:`WeightsError` naming the file: unreachable, incomplete after ``attempts`` (the ``.part`` is kept
    for the next run), wrong size, or wrong hash (the ``.part`` is removed).
    """
    target = models_dir / entry.dest
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    url = entry.source_url(endpoint)
    fix = f"run `musetalk download` again (it resumes from {part.name})"
    for attempt in range(1, attempts + 1):
        try:
            if _transfer(url, part, entry):
                break
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise WeightsError(f"cannot fetch {entry.dest} from {url}: HTTP {exc.code} {exc.reason}",
                                   "check the address (HF_ENDPOINT) or download the file by hand into "
                                   f"{target}") from None
            log(f"         {entry.dest}: transfer broke ({type(exc).__name__}: {exc})")
        if attempt < attempts:
            log(f"         {entry.dest}: incomplete; resuming from {part.stat().st_size if part.exists() else 0:,} "
                f"bytes (attempt {attempt + 1} of {attempts})")
    else:
        have = part.stat().st_size if part.exists() else 0
        raise WeightsError(f"{entry.dest} is incomplete after {attempts} attempts ({have:,} bytes so far, kept in "
                           f"{part})", fix)
    problem = size_problem(entry, part)
    if problem:
        part.unlink(missing_ok=True)
        raise WeightsError(f"{url} sent a file of the wrong size for {entry.dest} ({problem}); it was removed",
                           "check HF_ENDPOINT / the mirror, then run `musetalk download` again")
    digest = sha256_of(part)
    if not check_hash(entry, digest):
        part.unlink(missing_ok=True)
        expected = entry.sha256 or f"{entry.sha256_prefix}..."
        raise WeightsError(f"{entry.dest} from {url} has SHA-256 {digest}, expected {expected}; it was removed",
                           "check HF_ENDPOINT / the mirror (a modified or corrupt copy), then download again")
    _drop_stale_conversion(target)
    os.replace(part, target)
    return target


def _transfer(url: str, part: Path, entry: WeightFile) -> bool:
    """One HTTP request appending to ``part`` from its current size; True when the body arrived whole."""
    start = part.stat().st_size if part.exists() else 0
    if entry.size is not None and start > entry.size:  # a .part from something else: start over
        part.unlink()
        start = 0
    if entry.size is not None and start == entry.size:
        return True
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    token = os.environ.get("HF_TOKEN")
    if token and entry.repo and not entry.url:
        request.add_unredirected_header("Authorization", f"Bearer {token}")  # never forwarded to a redirect target
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # range not satisfiable: .part is already whole (or bogus: the checks say)
            return True
        raise
    with response:
        resumed = start > 0 and response.status == 206 and _range_start(response) == start
        expected = response.headers.get("Content-Length")
        with open(part, "ab" if resumed else "wb") as f:
            received = 0
            while block := response.read(CHUNK):
                f.write(block)
                received += len(block)
    return expected is None or received == int(expected)


def _range_start(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _drop_stale_conversion(target: Path) -> None:
    """A safetensors copy made by `musetalk convert` from the file being replaced no longer matches it."""
    converted = converted_path(target)
    if converted.is_file() and safetensors_metadata(converted).get(META_SOURCE) == target.name:
        converted.unlink()


def download(models_dir: Path, versions: list[str], *, dwpose: bool = False, syncnet: bool = False,
             convert: bool = False, log: Log = print) -> list[Path]:
    """Fetch the official files into ``models_dir``; present files of the right size are kept.

    Honours HF_ENDPOINT (a mirror), HF_HUB_OFFLINE (fails at once when files are missing) and HF_TOKEN.
    Every weight file is then read once through the safe reader; ``convert`` also writes its safetensors copy.
    """
    entries = plan(versions, dwpose, syncnet)
    todo = []
    for entry in entries:
        path = models_dir / entry.dest
        if path.is_file() and size_problem(entry, path) is None:
            log(f"present  {entry.dest}")
        else:
            if path.is_file():
                log(f"replace  {entry.dest} ({size_problem(entry, path)})")
            todo.append(entry)
    _check_reachable(todo, models_dir)
    fetched = []
    for entry in todo:
        log(f"fetch    {entry.source()} -> {entry.dest}")
        fetched.append(fetch(entry, models_dir, log=log))
    verify_downloaded(models_dir, entries)
    if convert:
        from musetalk.weights.convert import convert_models

        convert_models(models_dir, entries, log=log)
    return fetched


def _check_reachable(todo: list[WeightFile], models_dir: Path) -> None:
    hub = [e for e in todo if not e.url]
    if hub and _offline():
        raise WeightsError(f"HF_HUB_OFFLINE is set and {len(hub)} files are missing from {models_dir}",
                           "unset HF_HUB_OFFLINE on a machine with internet access, or copy the files in")
    checked: set[str] = set()
    for entry in todo:
        url = entry.source_url()
        host = urllib.parse.urlparse(url).netloc
        if host in checked:
            continue
        if not _reachable(url):
            if entry.url:
                raise WeightsError(f"cannot reach {url}", f"download it by hand into {models_dir / entry.dest}")
            raise WeightsError(f"cannot reach {host} (no network?); {len(hub)} files are missing",
                               "run `musetalk download` where the hub is reachable (or set HF_ENDPOINT to a mirror) "
                               "and copy models/ here; for a pipeline test without real weights use "
                               "`musetalk tiny-weights --dir models-tiny`")
        checked.add(host)


def verify_downloaded(models_dir: Path, entries: Iterable[WeightFile]) -> None:
    """Every weight file reads as a safe state dict (memory-mapped where the format allows); JSON files parse."""
    for entry in entries:
        path = models_dir / entry.dest
        if entry.format == "json":
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                raise WeightsError(f"{path} is not valid JSON ({exc})", "delete it and run `musetalk download` again"
                                   ) from None
        else:
            load_state_dict(path, fix=f"delete {path} and run `musetalk download` again")
