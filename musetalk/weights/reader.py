"""One safe reader for every checkpoint format the official MuseTalk weights come in.

Formats, recognised from the file's first bytes (never from its name):
  zip          PyTorch >= 1.6 ``torch.save``: ``torch.load(weights_only=True, mmap=True)`` (tensors are memory maps);
               when torch's allow-list refuses it (an mmengine training checkpoint with numpy metadata and mmengine
               objects), the restricted unpickler below reads ``data.pkl`` and maps the tensors out of the same file.
  legacy       PyTorch < 1.6 (``79999_iter.pth``, ``syncnet_v2.model``, ``sfd_face.pth``): magic number, protocol,
               sys_info, the object pickle, its storage keys, then each storage's bytes.
  tar          PyTorch <= 0.1.x (the torchvision zoo's ``resnet18-5c106cde.pth``): members ``sys_info``, ``pickle``,
               ``storages`` and ``tensors``; ``torch.load(weights_only=True)`` refuses it unconditionally.
  safetensors  no pickle at all; memory-mapped by the safetensors library.

Safety model (every pickle in the file goes through :class:`_RestrictedUnpickler`, including branches we then drop):
  * allowed and rebuilt by our own code: tensors and storages, plain containers and scalars, ``OrderedDict``,
    numpy arrays, scalars and dtypes (rebuilt from their bytes here; numpy's ``_reconstruct`` is never called);
  * a global that runs code (``os.system``, ``builtins.eval``, ``subprocess``, ``functools.partial``, ``importlib``,
    ``torch.load`` ...) makes the whole file refused, wherever it appears;
  * any other global (``mmengine.logging.HistoryBuffer``, a training script's class) becomes an inert
    :class:`OpaqueObject`: its module is never imported and nothing of it is ever called.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import re
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import numpy as np
import torch

from musetalk.errors import WeightsError

log = logging.getLogger(__name__)

DEFAULT_FIX = "download the official file again (`musetalk download`)"
SAFE_FIX = "use the official checkpoint; never load files from untrusted sources"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001
CONVERTED_SUFFIX = ".safetensors"
# keys of the safetensors metadata `musetalk convert` writes: which file it came from, and that file's identity
META_SOURCE, META_SOURCE_SIZE, META_SOURCE_MTIME = "musetalk.source", "musetalk.source_size", "musetalk.source_mtime_ns"
_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

# --------------------------------------------------------------------------------------------------------------
# What a pickle may name
# --------------------------------------------------------------------------------------------------------------

# Modules whose globals run commands, evaluate or import code, open files or sockets, or call other callables.
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "builtins", "functools", "operator", "importlib",
    "runpy", "pickle", "_pickle", "pickletools", "marshal", "shelve", "dill", "cloudpickle", "joblib", "shutil",
    "socket", "ssl", "ctypes", "cffi", "code", "codeop", "pty", "tty", "platform", "webbrowser", "multiprocessing",
    "concurrent", "threading", "_thread", "asyncio", "signal", "types", "io", "_io", "pathlib", "tempfile", "glob",
    "inspect", "pdb", "bdb", "timeit", "trace", "cProfile", "profile", "shlex", "zipimport", "pkgutil", "site",
    "sysconfig", "distutils", "setuptools", "pip", "urllib", "http", "ftplib", "smtplib", "telnetlib", "xmlrpc",
    "logging", "gc", "weakref", "atexit", "resource", "mmap", "fcntl", "select", "selectors", "sqlite3", "commands",
    "popen2", "yaml", "jinja2", "IPython", "_posixsubprocess", "_winapi", "msvcrt", "winreg", "codecs", "_codecs",
    "copyreg", "numpy.lib", "numpy.ctypeslib", "numpy.testing", "numpy.distutils", "numpy.f2py",
    "torch._C", "torch.ops", "torch._ops", "torch.jit", "torch.hub", "torch.package", "torch.serialization",
    "torch.utils.cpp_extension", "torch.distributed", "torch.multiprocessing", "torch._dynamo", "torch.fx",
    "torch.compiler", "torch.library", "torch.backends", "torch.utils.data",
})
# Top-level names of torch and numpy that read files, load pickles or compile code.
_CODE_NAMES = frozenset({
    "torch.load", "torch.save", "torch.from_file", "torch.compile", "torch.vmap", "torch.cond", "torch.export",
    "torch.set_default_device", "numpy.load", "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap",
    "numpy.save", "numpy.savez", "numpy.savetxt", "numpy.fromregex", "numpy.vectorize", "numpy.frompyfunc",
    "numpy.piecewise", "numpy.apply_along_axis", "numpy.apply_over_axes", "numpy.fromfunction",
})
# Modules renamed between Python 2 and 3 (old checkpoints were pickled under Python 2).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_NUMPY_TYPECODE = re.compile(r"[<>|=]?[biufcSUO?][0-9]*")


def _runs_code(module: str, name: str) -> bool:
    if f"{module}.{name}" in _CODE_NAMES:
        return True
    parts = module.split(".")
    return any(".".join(parts[:i]) in _CODE_MODULES for i in range(1, len(parts) + 1))


class _Refused(Exception):
    """A global that would run code: the file is refused."""


class _Corrupt(Exception):
    """The bytes do not follow the format (truncated, inconsistent, or not a checkpoint)."""


# --------------------------------------------------------------------------------------------------------------
# Inert stand-ins and rebuilt values
# --------------------------------------------------------------------------------------------------------------

class OpaqueObject:
    """An object of a class the reader does not know. The class is never imported and nothing of it ever runs;
    what the pickle said about the object is kept as inert data (``args``, ``kwargs``, ``state``, ``items``)."""

    pickled_module = "?"
    pickled_name = "?"
    # set per object by __new__ / __setstate__ (object.__setattr__, as __setattr__ below records into ``items``)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "OpaqueObject":
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "kwargs", kwargs)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "items", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the pickle's arguments are kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: Any) -> None:  # pickle's BUILD may fall back to setattr
        self.items.append((name, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<opaque {self.pickled_module}.{self.pickled_name}>"


def _opaque_class(module: str, name: str) -> type[OpaqueObject]:
    # `type()` with a fixed base and a plain namespace: creates a class, imports and runs nothing of the file's
    return type(f"Opaque_{name}"[:80], (OpaqueObject,), {"pickled_module": module, "pickled_name": name})


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co: only its dtype matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    """Bytes of one storage (an untyped CPU storage: a memory map, or read from the file) and their dtype."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped = untyped
        self.dtype = dtype


class _NumpyDType:
    """``numpy.dtype(spec, align, copy)`` plus its pickled state, rebuilt from a checked type code."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or not _NUMPY_TYPECODE.fullmatch(spec):
            raise _Corrupt(f"unsupported numpy dtype {spec!r} in the pickle")
        self.value = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5:
            raise _Corrupt("malformed numpy dtype state")
        byteorder, subdescr, names, fields = state[1:5]
        if subdescr is not None or names is not None or fields is not None:
            raise _Corrupt("structured numpy dtypes are not supported")
        if byteorder in ("<", ">") and self.value.itemsize > 1:
            self.value = self.value.newbyteorder(byteorder)


class _NumpyArray:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` followed by BUILD: the array from its bytes."""

    def __init__(self, *args: Any) -> None:
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Corrupt("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        dtype = _resolve_dtype(dtype)
        shape = _int_tuple(shape, "numpy shape")
        count = int(np.prod(shape, dtype=np.int64))
        if dtype.kind == "O":
            if not isinstance(raw, list) or len(raw) != count:
                raise _Corrupt("malformed numpy object array")
            flat = np.empty(count, dtype=object)
            flat[:] = raw
        else:
            if isinstance(raw, str):  # Python 2 pickles hold the bytes as a latin-1 string
                raw = raw.encode("latin1")
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
                raise _Corrupt("numpy array bytes do not match its shape and dtype")
            flat = np.frombuffer(raw, dtype=dtype).copy()
        self.value = flat.reshape(shape, order="F" if fortran else "C")


def _resolve_dtype(value: Any) -> np.dtype:
    if isinstance(value, _NumpyDType):
        return value.value
    raise _Corrupt("a numpy value without a dtype")


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(type(v) is int and v >= 0 for v in value):
        raise _Corrupt(f"malformed {what}: {value!r}"[:200])
    return tuple(value)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _resolve_dtype(dtype)
    if dtype.kind == "O":
        return data
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _Corrupt("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    dtype = _resolve_dtype(dtype)
    shape = _int_tuple(shape, "numpy shape")
    if not isinstance(buffer, (bytes, bytearray)) or len(buffer) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise _Corrupt("numpy buffer does not match its shape")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if order == "F" else "C").copy()


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor(_v2)``: a tensor viewing ``storage`` (requires_grad and hooks are dropped)."""
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise _Corrupt("a tensor without a valid storage")
    size, stride = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise _Corrupt("tensor size and stride differ in length")
    numel = storage.untyped.nbytes() // storage.dtype.itemsize
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise _Corrupt(f"a tensor of size {size} reaches past its storage of {numel} elements")
    return torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise _Corrupt("a parameter without a tensor")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any = None) -> torch.Tensor:
    """``torch._tensor._rebuild_from_type_v2``: only our own tensor rebuilds are called; the subclass is dropped."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(args, tuple):
        raise _Corrupt("an unexpected tensor rebuild")
    return func(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles store ``bytes``; only text codecs are accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return text.encode(encoding)


def _bytes(*args: Any) -> bytes:
    if not args:
        return b""
    if isinstance(args[0], (bytes, bytearray)) and len(args) == 1:
        return bytes(args[0])
    return _encode(*args)


def _bytearray(*args: Any) -> bytearray:
    return bytearray(_bytes(*args))


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects), for our inert classes and plain containers only."""
    if isinstance(cls, type) and issubclass(cls, OpaqueObject):
        return cls()
    if cls in (dict, list, collections.OrderedDict, object) and base in (object, dict, list):
        return cls()
    raise _Refused(f"copyreg._reconstructor of {cls!r}")


def _defaultdict(*_factory: Any) -> collections.defaultdict:
    return collections.defaultdict()  # the default factory is dropped: nothing from the file is kept callable


_SAFE_BUILTINS: dict[str, Any] = {
    "set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple, "int": int, "float": float,
    "complex": complex, "str": str, "bool": bool, "slice": slice, "object": object, "bytes": _bytes,
    "bytearray": _bytearray,
}


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle may name as ``module.name``, or None."""
    if module == "builtins":
        return _SAFE_BUILTINS.get(name)
    if module in ("_codecs", "codecs") and name == "encode":
        return _encode
    if module == "copyreg" and name == "_reconstructor":
        return _reconstructor
    if module == "collections":
        return {"OrderedDict": collections.OrderedDict, "defaultdict": _defaultdict}.get(name)
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        return _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module in ("torch._tensor", "torch._utils") and name == "_rebuild_from_type_v2":
        return _rebuild_from_type
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
        return _StorageType(torch.uint8)
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and name == "device":
        return torch.device
    if module in _NUMPY_MULTIARRAY and name == "_reconstruct":
        return _NumpyArray
    if module in _NUMPY_MULTIARRAY and name == "scalar":
        return _numpy_scalar
    if module in _NUMPY_NUMERIC and name == "_frombuffer":
        return _numpy_frombuffer
    if module == "numpy" and name == "dtype":
        return _NumpyDType
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles with :func:`_allowed_global`; code-running globals raise :class:`_Refused`, others are opaque.

    ``persistent``: how this format resolves persistent ids (storages); None = the pickle may hold none.
    """

    def __init__(self, file: Any, persistent: Callable[[Any], Any] | None = None) -> None:
        # latin1: Python 2 byte strings (old checkpoints) come out unchanged; ASCII keys read the same either way
        super().__init__(file, encoding="latin1")
        self._persistent = persistent
        self._opaque: dict[tuple[str, str], type[OpaqueObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        allowed = _allowed_global(module, name)
        if allowed is not None:
            return allowed
        if _runs_code(module, name):
            raise _Refused(f"{module}.{name}")
        key = (module, name)
        if key not in self._opaque:
            self._opaque[key] = _opaque_class(module, name)
        return self._opaque[key]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _Corrupt("a persistent id where none is expected")
        return self._persistent(pid)


def _unpickle(file: Any, persistent: Callable[[Any], Any] | None = None) -> Any:
    return _RestrictedUnpickler(file, persistent).load()


def _finish(obj: Any) -> Any:
    """Replace the numpy stand-ins by their arrays and dtypes, in containers and opaque objects alike."""
    seen: set[int] = set()

    def walk(value: Any) -> Any:
        if isinstance(value, (_NumpyArray, _NumpyDType)):
            return value.value
        if isinstance(value, (str, bytes, int, float, torch.Tensor, np.ndarray)) or value is None:
            return value
        if id(value) in seen:
            return value
        seen.add(id(value))
        if isinstance(value, dict):
            for key in list(value):
                value[key] = walk(value[key])
        elif isinstance(value, list):
            value[:] = [walk(v) for v in value]
        elif isinstance(value, tuple) and type(value) is tuple:
            return tuple(walk(v) for v in value)
        elif isinstance(value, OpaqueObject):
            for attr in ("args", "state"):
                object.__setattr__(value, attr, walk(getattr(value, attr)))
            value.items[:] = [walk(v) for v in value.items]
        return value

    return walk(obj)


# --------------------------------------------------------------------------------------------------------------
# Byte-level helpers
# --------------------------------------------------------------------------------------------------------------

def _read_storage_bytes(file: Any, nbytes: int, into: torch.UntypedStorage | None = None) -> torch.UntypedStorage:
    """Exactly ``nbytes`` from ``file`` into ``into`` (else a fresh, aligned CPU storage); short reads = truncation."""
    buffer = torch.empty(nbytes, dtype=torch.uint8) if into is None else torch.empty(0, dtype=torch.uint8).set_(into)
    view = buffer.numpy().data  # a writable memoryview of the storage's bytes
    done = 0
    while done < nbytes:
        n = file.readinto(view[done:])
        if not n:
            raise _Corrupt(f"truncated: a storage needs {nbytes} bytes, the file holds {done}")
        done += n
    return buffer.untyped_storage()


def _read_int64(file: Any) -> int:
    raw = file.read(8)
    if len(raw) != 8:
        raise _Corrupt("truncated: the file ends inside a storage header")
    return struct.unpack("<q", raw)[0]


def _storage_key(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _storage_type(value: Any) -> torch.dtype:
    if not isinstance(value, _StorageType):
        raise _Corrupt(f"unknown storage type {value!r}"[:200])
    return value.dtype


def _check_sys_info(info: Any) -> None:
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise _Corrupt("the checkpoint was written on a big-endian machine")


# --------------------------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------------------------

def sniff_format(path: str | os.PathLike) -> str:
    """``zip``, ``tar``, ``legacy`` (a pickle stream), ``safetensors`` or ``unknown``, from the first bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80":
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    return "unknown"


def _read_legacy(path: Path) -> Any:
    """The pre-1.6 stream: magic, protocol, sys_info, object pickle, storage keys, then each storage's bytes."""
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}
    file_size = path.stat().st_size

    def persistent(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise _Corrupt("malformed persistent id")
        kind = _storage_key(pid[0])
        if kind == "module":  # a pickled nn.Module class (with its source): kept as the inert class
            return pid[1]
        if kind != "storage" or len(pid) != 6:
            raise _Corrupt(f"unknown persistent id {kind!r}")
        _, storage_type, key, _location, numel, view = pid
        dtype, key = _storage_type(storage_type), _storage_key(key)
        if type(numel) is not int or numel < 0:
            raise _Corrupt("malformed storage size")
        if numel * dtype.itemsize > file_size:  # checked before allocating: the bytes must be in this file
            raise _Corrupt(f"truncated: storage {key} needs {numel * dtype.itemsize} bytes, the file has {file_size}")
        if key not in roots:  # bytes are filled in after the pickle; tensors already view this storage
            roots[key] = _Storage(torch.UntypedStorage(numel * dtype.itemsize), dtype)
        root = roots[key]
        if view is None:
            return root
        view_key, offset, size = view
        view_key = _storage_key(view_key)
        if view_key not in views:
            start = offset * dtype.itemsize
            views[view_key] = _Storage(root.untyped[start:start + size * dtype.itemsize], dtype)
        return views[view_key]

    with open(path, "rb") as f:
        if _unpickle(f) != LEGACY_MAGIC_NUMBER:
            raise _Corrupt("not a PyTorch checkpoint (no legacy magic number)")
        if _unpickle(f) != LEGACY_PROTOCOL_VERSION:
            raise _Corrupt("unknown legacy protocol version")
        _check_sys_info(_unpickle(f))
        obj = _unpickle(f, persistent)
        keys = _unpickle(f)
        if not isinstance(keys, list):
            raise _Corrupt("malformed storage key list")
        for key in keys:
            root = roots.get(_storage_key(key))
            if root is None:
                raise _Corrupt(f"storage {key!r} is listed but never used")
            numel = _read_int64(f)
            if numel * root.dtype.itemsize != root.untyped.nbytes():
                raise _Corrupt(f"storage {key!r} holds {numel} elements, its tensors expect "
                               f"{root.untyped.nbytes() // root.dtype.itemsize}")
            _read_storage_bytes(f, root.untyped.nbytes(), into=root.untyped)
    return obj


def _read_tar(path: Path) -> Any:
    """The 0.1.x tar: ``storages`` (bytes), ``tensors`` (geometry), then ``pickle`` naming them by key."""
    objects: dict[str, Any] = {}

    def member(tar: tarfile.TarFile, name: str) -> Any:
        try:
            file = tar.extractfile(name)
        except KeyError:
            raise _Corrupt(f"not a PyTorch tar checkpoint (no {name!r} member)") from None
        if file is None:
            raise _Corrupt(f"tar member {name!r} is not a file")
        return file

    def persistent(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid:  # a pickled container class: the inert class itself
            return pid[0]
        key = _storage_key(pid)
        if key not in objects:
            raise _Corrupt(f"the pickle names tensor {key!r}, which the file does not hold")
        return objects[key]

    with tarfile.open(path, mode="r:", format=tarfile.PAX_FORMAT) as tar:
        names = set(tar.getnames())
        if "sys_info" in names:
            _check_sys_info(_unpickle(member(tar, "sys_info")))
        storages_size = tar.getmember("storages").size if "storages" in names else 0
        with member(tar, "storages") as f:
            for _ in range(_count(_unpickle(f))):
                record = _unpickle(f)
                if not isinstance(record, tuple) or len(record) != 3:
                    raise _Corrupt("malformed storage record")
                key, _location, storage_type = record
                dtype = _storage_type(storage_type)
                numel = _read_int64(f)
                if not 0 <= numel * dtype.itemsize <= storages_size:  # before allocating
                    raise _Corrupt(f"truncated: a storage of {numel} elements does not fit its tar member")
                objects[_storage_key(key)] = _Storage(_read_storage_bytes(f, numel * dtype.itemsize), dtype)
            for target, root, offset, numel in _unpickle(f):
                base = objects[_storage_key(root)]
                start = offset * base.dtype.itemsize
                objects[_storage_key(target)] = _Storage(
                    base.untyped[start:start + numel * base.dtype.itemsize], base.dtype)
        with member(tar, "tensors") as f:
            for _ in range(_count(_unpickle(f))):
                record = _unpickle(f)
                if not isinstance(record, tuple) or len(record) != 3:
                    raise _Corrupt("malformed tensor record")
                key, storage_id, _tensor_type = record
                storage = objects.get(_storage_key(storage_id))
                ndim = struct.unpack("<i", _read_exact(f, 4))[0]
                _read_exact(f, 4)  # the legacy encoding wrote ndim as 8 bytes
                size = struct.unpack(f"<{ndim}q", _read_exact(f, 8 * ndim))
                stride = struct.unpack(f"<{ndim}q", _read_exact(f, 8 * ndim))
                offset = struct.unpack("<q", _read_exact(f, 8))[0]
                objects[_storage_key(key)] = _rebuild_tensor(storage, offset, size, stride)
        with member(tar, "pickle") as f:
            return _unpickle(f, persistent)


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise _Corrupt("malformed record count")
    return value


def _read_exact(file: Any, n: int) -> bytes:
    if n < 0:
        raise _Corrupt("negative length")
    raw = file.read(n)
    if len(raw) != n:
        raise _Corrupt("truncated record")
    return raw


def _read_zip(path: Path, mmap: bool) -> Any:
    """torch's own weights-only loader; when its allow-list says no, the restricted unpickler decides."""
    _check_zip_directory(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # an unlisted global: maybe code, maybe an mmengine object or numpy meta
        log.debug("%s: torch's weights-only loader refused it (%s); reading it with the restricted reader",
                  path, str(exc).splitlines()[0] if str(exc) else "")
    return _read_zip_restricted(path, mmap)


def _check_zip_directory(path: Path) -> None:
    """Every record lies inside the file (a cut download loses the central directory or the records' ends)."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:  # BadZipFile when the central directory at the end is gone
        for info in archive.infolist():
            if info.header_offset + info.compress_size > size:
                raise _Corrupt(f"truncated: record {info.filename} ends past the end of the file")


def _read_zip_restricted(path: Path, mmap: bool) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _Corrupt("not a PyTorch zip checkpoint (no single data.pkl record)")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
            raise _Corrupt("the checkpoint was written on a big-endian machine")
        # torch types from_file on the storage base class; on UntypedStorage it returns an UntypedStorage
        whole = cast(torch.UntypedStorage, torch.UntypedStorage.from_file(str(path), shared=False,
                                                                          nbytes=path.stat().st_size)) if mmap else None
        storages: dict[str, _Storage] = {}

        def persistent(pid: Any) -> Any:
            if not isinstance(pid, tuple) or len(pid) != 5 or _storage_key(pid[0]) != "storage":
                raise _Corrupt("malformed persistent id")
            _, storage_type, key, _location, numel = pid
            dtype, key = _storage_type(storage_type), _storage_key(key)
            if key not in storages:
                storages[key] = _Storage(_zip_record(archive, f"{prefix}data/{key}", numel * dtype.itemsize, whole,
                                                     path), dtype)
            return storages[key]

        return _unpickle(io.BytesIO(archive.read(pickles[0])), persistent)


def _zip_record(archive: zipfile.ZipFile, name: str, nbytes: int, whole: torch.UntypedStorage | None,
                path: Path) -> torch.UntypedStorage:
    """A storage record's bytes: a slice of the file's memory map (records are stored uncompressed), or a copy."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _Corrupt(f"storage record {name} is missing") from None
    if info.file_size < nbytes:
        raise _Corrupt(f"storage record {name} holds {info.file_size} bytes, its tensors need {nbytes}")
    if whole is not None and info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = _read_exact(f, 30)
        if header[:4] != b"PK\x03\x04":
            raise _Corrupt(f"bad local header for {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + nbytes > whole.nbytes():
            raise _Corrupt(f"truncated: storage record {name} ends past the end of the file")
        return whole[start:start + nbytes]
    with archive.open(name) as f:
        return _read_storage_bytes(f, nbytes)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")  # memory-mapped by the library


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------

def _check_file(path: Path, fix: str) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}", fix)
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"weights file is empty: {path}", fix)
    if size <= 1024:
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX:
                raise WeightsError(f"{path} is a Git LFS pointer, not the weights", "run `git lfs pull` or " + fix)


def _describe_unknown(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    lower = head.lower()
    if lower.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "it is an HTML/XML page (a failed download?), not weights"
    if head.startswith((b"{", b"[")):
        return "it is JSON text, not weights"
    if head[:2] == b"\x1f\x8b":
        return "it is gzip-compressed; unpack it first"
    return f"its content is not a known checkpoint format (starts with {head[:16]!r})"


def read_checkpoint(path: str | os.PathLike, *, fix: str | None = None, mmap: bool = True) -> Any:
    """Read any supported checkpoint into Python objects, safely (see the module docstring).

    Tensors come out on the CPU with their stored dtype (memory maps for zip and safetensors files when ``mmap``);
    numpy arrays and dtypes are rebuilt; objects of unknown classes are :class:`OpaqueObject`.
    Raises :class:`WeightsError` naming the file and ``fix`` for a missing, empty, truncated, Git-LFS-pointer,
    code-running or unrecognised file.
    """
    path = Path(path)
    fix = fix or DEFAULT_FIX
    _check_file(path, fix)
    kind = sniff_format(path)
    try:
        if kind == "safetensors" or path.suffix == CONVERTED_SUFFIX:
            return _read_safetensors_checked(path, fix)
        if kind == "zip":
            return _finish(_read_zip(path, mmap))
        if kind == "legacy":
            return _finish(_read_legacy(path))
        if kind == "tar":
            return _finish(_read_tar(path))
    except WeightsError:
        raise
    except _Refused as exc:
        raise WeightsError(
            f"refused to load {path}: it holds a pickle that would run code or import modules ({exc}); "
            "MuseTalk Studio never runs anything from a weights file", SAFE_FIX) from None
    except Exception as exc:  # the file's bytes are wrong: EOFError, zip/tar/pickle/struct errors, torch's checks
        raise _format_error(path, kind, exc, fix) from None
    raise WeightsError(f"cannot load {path}: {_describe_unknown(path)}", fix)


def _read_safetensors_checked(path: Path, fix: str) -> dict[str, torch.Tensor]:
    try:
        return _read_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError: the file is wrong
        raise WeightsError(f"cannot read {path} as safetensors ({exc})", fix) from None


def _format_error(path: Path, kind: str, exc: Exception, fix: str) -> WeightsError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    truncated = isinstance(exc, (EOFError, zipfile.BadZipFile, tarfile.ReadError)) or any(
        needle in text.lower() for needle in ("truncat", "central directory", "pytorchstreamreader", "zip archive",
                                              "unexpected end", "ran out of input"))
    if truncated:
        return WeightsError(f"{path} is truncated or corrupt ({kind} format: {text})", fix)
    return WeightsError(f"cannot load {path} ({kind} format: {type(exc).__name__}: {text})", fix)


def converted_path(path: str | os.PathLike) -> Path:
    """Where `musetalk convert` puts the safetensors copy of ``path``: same folder, same stem."""
    return Path(path).with_suffix(CONVERTED_SUFFIX)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (read without loading any tensor)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            return {}
        length = struct.unpack("<Q", raw)[0]
        if length > 100_000_000:
            return {}
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def source_identity(path: str | os.PathLike) -> dict[str, str]:
    """What a converted file records about its source, to tell a current copy from a stale one."""
    stat = Path(path).stat()
    return {META_SOURCE: Path(path).name, META_SOURCE_SIZE: str(stat.st_size), META_SOURCE_MTIME: str(stat.st_mtime_ns)}


def converted_is_current(source: Path, converted: Path) -> bool:
    """True when ``converted`` was written by `musetalk convert` from ``source`` as it is now."""
    if not converted.is_file() or not source.is_file():
        return False
    meta = safetensors_metadata(converted)
    return all(meta.get(k) == v for k, v in source_identity(source).items())


def _pick_file(path: Path) -> Path:
    """``path``, or its current converted copy; a stale copy (its source changed since) gives way to the source."""
    if path.suffix != CONVERTED_SUFFIX:
        converted = converted_path(path)
        if not converted.is_file():
            return path
        if converted_is_current(path, converted):
            return converted
        stale, source = converted, path
    else:
        name = safetensors_metadata(path).get(META_SOURCE) if path.is_file() else None
        source = path.with_name(name) if name else path
        if source == path or not source.is_file() or converted_is_current(source, path):
            return path
        stale = path
    log.warning("%s is not a current conversion of %s (the source changed); reading the source. "
                "Run `musetalk convert --to safetensors` again.", stale, source.name)
    return source


def load_state_dict(path: str | os.PathLike, *, fix: str | None = None, mmap: bool = True,
                    prefer_converted: bool = True) -> dict[str, torch.Tensor]:
    """Load a state dict (``.safetensors``, ``.pth``, ``.bin``, ``.pt``, ``.model``; any format above) on the CPU.

    A training checkpoint's ``state_dict`` entry is taken (mmengine/mmpose files); values keep their stored dtype.
    With ``prefer_converted``, a current ``.safetensors`` copy written by `musetalk convert` beside ``path`` is read
    instead (same tensors, a memory map); a stale one is ignored with a warning.
    Raises :class:`WeightsError` naming the file and ``fix``; see :func:`read_checkpoint`.
    """
    path = _pick_file(Path(path)) if prefer_converted else Path(path)
    obj = read_checkpoint(path, fix=fix, mmap=mmap)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})",
                           fix or DEFAULT_FIX)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path} does not hold a state dict of tensors ({len(bad)} entries are not tensors, "
                           f"e.g. {bad[0]!r})", fix or DEFAULT_FIX)
    return dict(obj)
