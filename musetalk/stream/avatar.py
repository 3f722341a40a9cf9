"""Avatar: everything that depends only on the source, computed once per source frame and kept on disk.

The reference's "realtime" mode, made general: landmarks, crop box, the 8-channel latents and the paste-back
mask of every source frame. A generation run then only needs the audio. The on-disk store is keyed by the
source's content hash and by every setting that changes what is stored, so a changed source or setting
invalidates it. CLI, notebooks and server share one cache folder (``$MUSETALK_CACHE`` or
``~/.cache/musetalk``), under ``avatars/<name>``.

Layout of an avatar folder (bounded memory: frames are read back one at a time):
  meta.json         key, settings, number of frames, fps, frame size, has_face count
  frames/NNNNNN.png source frames (lossless), BGR
  masks/NNNNNN.png  paste-back mask of the expanded crop (uint8), one per frame with a face
  arrays.npz        has_face (S,), landmarks (S, 68, 2) int32, face_boxes (S, 4), mask_boxes (S, 4)
  latents.npy       (S, 8, 32, 32) float32 UNet input latents (zeros where no face), memory-mapped on read
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from musetalk.errors import InputError, MuseTalkError, StorageError
from musetalk.stream.leftovers import MKDTEMP_SUFFIX, Hold, held_temp_dir

FORMAT_VERSION = 1
# matched whole with fullmatch: with match and "$", "name\n" passed ("$" also matches before a final newline)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def cache_root() -> Path:
    """``$MUSETALK_CACHE`` when set, else ``~/.cache/musetalk``."""
    return Path(os.environ.get("MUSETALK_CACHE", Path.home() / ".cache" / "musetalk"))


def check_avatar_name(name: str) -> str:
    """Avatar names become folder names: letters, digits, '_', '-', '.', at most 64, no path parts."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InputError(f"invalid avatar name {name!r}",
                         "use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


def hash_source(path: str | os.PathLike) -> str:
    """sha256 of a source's content (a file, or every file of a frame folder in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode() if path.is_dir() else b"")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def avatar_key(source_hash: str, settings: dict) -> str:
    """The cache key: source content + every setting that changes what is stored."""
    blob = json.dumps({"format": FORMAT_VERSION, "source": source_hash, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class AvatarMeta:
    key: str
    source: str
    num_frames: int
    fps: float
    width: int
    height: int
    faces: int  # number of frames with a face
    settings: dict
    created: float


class Avatar:
    """A prepared source, read from its folder. Frames and masks are loaded one at a time.

    A temporary avatar (prepared without a name) owns its folder: it is removed by :meth:`close`, at the end of a
    ``with`` block, when the object is garbage-collected, or at interpreter exit, whichever comes first.
    """

    def __init__(self, path: Path, owned_dir: Path | None = None) -> None:
        self.path = Path(path)
        # weakref.finalize, not __del__: it also runs at interpreter exit and never resurrects the object
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(owned_dir), True) if owned_dir else None
        self._hold = Hold(owned_dir) if owned_dir else None  # a later run's sweep of the temp dir leaves it alone
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = AvatarMeta(**meta)
        arrays = np.load(self.path / "arrays.npz")
        self.has_face: np.ndarray = arrays["has_face"]
        self.landmarks: np.ndarray = arrays["landmarks"]
        self.face_boxes: np.ndarray = arrays["face_boxes"]
        self.mask_boxes: np.ndarray = arrays["mask_boxes"]
        self.latents: np.ndarray = np.load(self.path / "latents.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.meta.num_frames

    @property
    def temporary(self) -> bool:
        return self._cleanup is not None

    def close(self) -> None:
        """Remove a temporary avatar's folder now (named avatars stay in the cache)."""
        if self._cleanup is not None:
            self.latents = np.zeros((0, 8, 32, 32), np.float32)  # drop the memory map before its file goes
            self._cleanup()
            if self._hold is not None:
                self._hold.release()

    def __enter__(self) -> "Avatar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frame(self, index: int) -> np.ndarray:
        """Source frame ``index`` as (H, W, 3) uint8 BGR."""
        return self._read_png("frames", "frame", index, cv2.IMREAD_COLOR)

    def mask(self, index: int) -> np.ndarray:
        """Paste-back mask of frame ``index`` (uint8, size of its expanded crop)."""
        return self._read_png("masks", "mask", index, cv2.IMREAD_GRAYSCALE)

    def _read_png(self, folder: str, what: str, index: int, flags: int) -> np.ndarray:
        """One stored PNG; a missing or unreadable one means the avatar is damaged (InputError with the fix)."""
        image = cv2.imread(str(self.path / folder / f"{index:06d}.png"), flags)
        if image is None:
            raise InputError(f"avatar {self.path} is damaged ({what} {index} unreadable)",
                             "prepare it again: `musetalk avatar prepare --force ...`")
        return image

    def face_box(self, index: int) -> tuple[int, int, int, int] | None:
        return _box(self.face_boxes[index]) if self.has_face[index] else None


def _box(values: Sequence[int] | np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) as Python ints."""
    x1, y1, x2, y2 = (int(v) for v in values)
    return x1, y1, x2, y2


# the hidden folders of AvatarWriter (mkdtemp's 8-character suffix) and of _swap_in (an old avatar moved aside)
LEFTOVER_FOLDER = re.compile(rf"\..+\.(?:{MKDTEMP_SUFFIX}|old-\d+-\d+)")


class AvatarWriter:
    """Builds an avatar folder frame by frame in a temporary folder; ``commit`` moves it in place atomically."""

    def __init__(self, final_path: Path) -> None:
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        # what a killed preparation of any avatar left here goes first
        self.tmp, self._hold = held_temp_dir(f".{self.final_path.name}.", self.final_path.parent, LEFTOVER_FOLDER)
        (self.tmp / "frames").mkdir()
        (self.tmp / "masks").mkdir()
        self.has_face: list[bool] = []
        self.landmarks: list[np.ndarray] = []
        self.face_boxes: list[tuple[int, int, int, int]] = []
        self.mask_boxes: list[tuple[int, int, int, int]] = []
        self._latent_chunks: list[Path] = []

    def add_frame(self, frame_bgr: np.ndarray, landmarks: np.ndarray | None, face_box: Sequence[int] | None,
                  mask: np.ndarray | None, mask_box: Sequence[int] | None) -> int:
        """Frame ``index`` (returned); a frame with a face comes with its paste-back mask and the mask's box."""
        index = len(self.has_face)
        self._write_png(self.tmp / "frames" / f"{index:06d}.png", frame_bgr)
        face, crop = (-1, -1, -1, -1), (-1, -1, -1, -1)  # no face: boxes stored as -1
        if face_box is not None:
            assert mask is not None and mask_box is not None, "a face frame needs its mask and mask box"
            self._write_png(self.tmp / "masks" / f"{index:06d}.png", mask)
            face, crop = _box(face_box), _box(mask_box)
        self.has_face.append(face_box is not None)
        self.landmarks.append(np.zeros((68, 2), np.int32) if landmarks is None else np.asarray(landmarks, np.int32))
        self.face_boxes.append(face)
        self.mask_boxes.append(crop)
        return index

    def _write_png(self, path: Path, image: np.ndarray) -> None:
        # PNG level 1: lossless and fast to write; decoding it back costs ~5 ms per 720p frame. Encoded here and
        # written by Python, not cv2.imwrite: that one returns False on a full disk, and the avatar would be
        # committed with a missing frame.
        ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise MuseTalkError(f"cannot encode frame {path.name} of the avatar as PNG", "please report this")
        with self._storage(), open(path, "wb") as f:
            f.write(data.tobytes())

    @contextmanager
    def _storage(self) -> Iterator[None]:
        """A failed write (disk full, file size limit, permissions) becomes one clear error; prepare_avatar then
        aborts: the half-built folder is removed and nothing is committed that a later run would trust."""
        try:
            yield
        except OSError as err:
            raise StorageError(f"storing the avatar {self.final_path.name} in {self.final_path.parent} failed: "
                                f"{err.strerror or err}", "free disk space (or raise the file size limit, "
                                "`ulimit -f`) and run again; nothing half-written was kept") from None

    def add_latents(self, latents: np.ndarray) -> None:
        """Latents of the next frames in order, (k, 8, 32, 32); written to disk at once (bounded memory)."""
        path = self.tmp / f"latents.{len(self._latent_chunks):05d}.npy"
        with self._storage():
            np.save(path, np.asarray(latents, np.float32))
        self._latent_chunks.append(path)

    def commit(self, meta: AvatarMeta, owned_dir: Path | None = None) -> Avatar:
        """Complete the folder (latents, arrays, meta.json last) and rename it onto the final path atomically."""
        with self._storage():
            self._complete(meta)
        return self._swap_in(meta, owned_dir)

    def _complete(self, meta: AvatarMeta) -> None:
        n = len(self.has_face)
        # plain sequential writes, not a writable memory map: a full disk then raises ENOSPC here instead of
        # killing the process with SIGBUS when a page of the (sparse) map cannot be allocated
        pos = 0
        with open(self.tmp / "latents.npy", "wb") as out:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (n, 8, 32, 32)}
            np.lib.format.write_array_header_1_0(out, header)
            for chunk in self._latent_chunks:
                data = np.ascontiguousarray(np.load(chunk), np.float32)
                out.write(data.tobytes())
                pos += len(data)
                chunk.unlink()
        if pos != n:
            raise RuntimeError(f"avatar latents cover {pos} of {n} frames")
        np.savez(self.tmp / "arrays.npz", has_face=np.array(self.has_face, bool), landmarks=np.stack(self.landmarks),
                 face_boxes=np.array(self.face_boxes, np.int64), mask_boxes=np.array(self.mask_boxes, np.int64))
        (self.tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2))

    def _swap_in(self, meta: AvatarMeta, owned_dir: Path | None) -> Avatar:
        # swap in atomically: an old avatar of the same name is moved aside first, then removed
        old = None
        try:
            if self.final_path.exists():
                old = self.final_path.with_name(f".{self.final_path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                os.replace(self.final_path, old)
            os.replace(self.tmp, self.final_path)
        except OSError:
            # another process (a second CLI run, the server) committed the same name at the same moment:
            # use its avatar when it holds the same content, else report the clash
            self.abort()
            same = load_avatar(self.final_path, meta.key)
            if same is None:
                raise
            return same
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._hold.release()
        return Avatar(self.final_path, owned_dir=owned_dir)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._hold.release()


def load_avatar(path: Path, expected_key: str | None = None) -> Avatar | None:
    """The avatar at ``path`` when it exists, is complete and (if given) has ``expected_key``; else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if expected_key is not None and meta.get("key") != expected_key:
        return None
    try:
        return Avatar(path)
    except (OSError, KeyError, ValueError, TypeError):
        return None


def list_avatars(root: Path | None = None) -> list[AvatarMeta]:
    """Metadata of every complete avatar in the cache."""
    root = (root or cache_root()) / "avatars"
    out = []
    for path in sorted(root.glob("*")) if root.is_dir() else []:
        avatar = load_avatar(path) if not path.name.startswith(".") else None
        if avatar is not None:
            out.append(avatar.meta)
    return out
