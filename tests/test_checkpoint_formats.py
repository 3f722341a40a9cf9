"""The official checkpoints' formats, generated here: legacy pickle, 0.1-era tar, mmengine training checkpoint.

Every fixture is written by these tests (no downloaded file): torch.save(..., _use_new_zipfile_serialization=False)
for the pre-1.6 stream; the tar layout torch's legacy reader reads (checked against torch itself); mmengine-style
checkpoints with numpy metadata and objects of classes that are not installed. Code-running variants must be
refused wherever they hide, and their payload must never run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from musetalk.errors import WeightsError
from musetalk.weights import OpaqueObject, load_state_dict, read_checkpoint, sniff_format

# --------------------------------------------------------------------------------------------------------------
# Writers for the old formats
# --------------------------------------------------------------------------------------------------------------


def save_legacy(obj: Any, path: Path) -> Path:
    """The pre-1.6 stream format (``79999_iter.pth``, ``syncnet_v2.model``, ``sfd_face.pth``)."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _pickle_bytes(obj: Any, persistent_id=None) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    if persistent_id is not None:
        pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return buffer.getvalue()


def save_tar(state: dict[str, torch.Tensor], path: Path, *, inject: dict[str, Any] | None = None) -> Path:
    """The 0.1-era tar layout that ``torch.serialization._legacy_load`` reads (the torchvision zoo's resnet18 file).

    Members: ``sys_info``; ``storages`` = count, then per storage a pickled (key, location, storage type) followed by
    int64 element count and raw bytes, then a pickled list of storage views; ``tensors`` = count, then per tensor a
    pickled (key, storage key, tensor type) followed by int32 ndim, 4 pad bytes, int64 sizes, strides and offset;
    ``pickle`` = the object, naming tensors by persistent id ``str(key)``. ``inject`` puts an extra object into
    the named member's first record (to hide a payload there).
    """
    inject = inject or {}
    storages: dict[int, tuple[int, torch.UntypedStorage, torch.dtype]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for tensor in state.values():
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), (len(storages) + 1, storage, tensor.dtype))
        tensors[1000 + len(tensors)] = tensor
    tensor_key = {id(t): k for k, t in tensors.items()}
    storage_types = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage,
                     torch.int64: torch.LongStorage, torch.uint8: torch.ByteStorage}
    tensor_types = {torch.float32: torch.FloatTensor, torch.float16: torch.HalfTensor,
                    torch.int64: torch.LongTensor, torch.uint8: torch.ByteTensor}

    storages_raw = io.BytesIO()
    storages_raw.write(_pickle_bytes(len(storages)))
    for key, storage, dtype in storages.values():
        record = (key, "cpu", storage_types[dtype]) + ((inject["storages"],) if "storages" in inject else ())
        storages_raw.write(_pickle_bytes(record))
        storages_raw.write(struct.pack("<q", storage.nbytes() // dtype.itemsize))
        storages_raw.write(torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes())
    storages_raw.write(_pickle_bytes([]))

    tensors_raw = io.BytesIO()
    tensors_raw.write(_pickle_bytes(len(tensors)))
    for key, tensor in tensors.items():
        storage_key = storages[tensor.untyped_storage().data_ptr()][0]
        tensors_raw.write(_pickle_bytes((key, storage_key, tensor_types[tensor.dtype])))
        tensors_raw.write(struct.pack("<i", tensor.dim()) + b"\0" * 4)
        tensors_raw.write(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
        tensors_raw.write(struct.pack(f"<{tensor.dim()}q", *tensor.stride()))
        tensors_raw.write(struct.pack("<q", tensor.storage_offset()))

    obj: Any = collections.OrderedDict(state)
    if "pickle" in inject:
        obj = {"state_dict": obj, "extra": inject["pickle"]}
    sys_info: Any = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    if "sys_info" in inject:
        sys_info = {**sys_info, "extra": inject["sys_info"]}
    members = {"sys_info": _pickle_bytes(sys_info),
               "pickle": _pickle_bytes(obj, lambda o: str(tensor_key[id(o)]) if id(o) in tensor_key else None),
               "tensors": tensors_raw.getvalue(), "storages": storages_raw.getvalue()}
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@contextlib.contextmanager
def installed_as(module_name: str, cls: type) -> Iterator[type]:
    """Pickle ``cls`` under ``module_name`` (e.g. an mmengine class) although no such package is installed."""
    names = module_name.split(".")
    added = []
    for i in range(1, len(names) + 1):
        name = ".".join(names[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    cls.__module__, cls.__qualname__ = module_name, cls.__name__
    setattr(sys.modules[module_name], cls.__name__, cls)
    try:
        yield cls
    finally:
        for name in added:
            del sys.modules[name]


class HistoryBuffer:
    """Stands for mmengine.logging.history_buffer.HistoryBuffer: numpy arrays in its __dict__."""

    def __init__(self) -> None:
        self._log_history = np.array([0.5, 0.25])
        self._count_history = np.array([1, 1])


class ConfigDict(dict):
    """Stands for mmengine.config.ConfigDict: a dict subclass (pickled with SETITEMS)."""


def mmengine_checkpoint(state: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    """What mmpose 1.x / mmengine training writes: weights, numpy metadata, config text, logger and optimizer."""
    return {
        "meta": {"epoch": 270, "iter": 12345, "seed": np.int64(21), "mmengine_version": "0.7.4",
                 "cfg": "model = dict(type='TopdownPoseEstimator')\n",
                 "model_cfg": ConfigDict(type="RTMPose", input_size=(288, 384)),
                 "dataset_meta": {"dataset_name": "coco_wholebody", "num_keypoints": 133,
                                  "flip_indices": list(range(133)),
                                  "keypoint_colors": np.arange(133 * 3, dtype=np.uint8).reshape(133, 3),
                                  "sigmas": np.linspace(0.01, 0.1, 133, dtype=np.float32),
                                  "dataset_keypoint_weights": np.ones(133, dtype=np.float64),
                                  "big_endian": np.arange(4, dtype=">i4"),
                                  "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                                  "mixed": np.array(["nose", 1], dtype=object),
                                  "float_dtype": np.dtype("<f2")}},
        "state_dict": collections.OrderedDict(state),
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"epoch": 270}},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 4e-3, "weight_decay": 0.05, "params": [0]}]},
        **extra,
    }


def save_mmengine(state: dict[str, torch.Tensor], path: Path, legacy: bool = False, **extra: Any) -> Path:
    checkpoint = mmengine_checkpoint(state, **extra)
    with installed_as("mmengine.logging.history_buffer", HistoryBuffer), \
            installed_as("mmengine.config.config", ConfigDict):
        torch.save(checkpoint, path, **({"_use_new_zipfile_serialization": False} if legacy else {}))
    return path


def sample_state() -> dict[str, torch.Tensor]:
    """fp32, fp16 (stored half, as the goldens' BiSeNet/Whisper), int64, a transposed view and a shared storage."""
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return {"conv.weight": base, "conv.weight_t": base.t(), "conv.slice": base[1:3, 2:5],
            "norm.weight": torch.randn(5).half(), "bn.num_batches_tracked": torch.tensor(7),
            "emb": torch.arange(12, dtype=torch.uint8).reshape(3, 4)}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


# --------------------------------------------------------------------------------------------------------------
# Reading each format
# --------------------------------------------------------------------------------------------------------------


def test_the_tar_writer_follows_the_layout_torch_reads(tmp_path: Path) -> None:
    """The fixture is faithful: torch's own legacy tar reader (unrestricted, on our benign file) agrees, and
    ``weights_only=True`` refuses the format outright, which is why the restricted reader exists."""
    state = sample_state()
    path = save_tar(state, tmp_path / "resnet18-5c106cde.pth")
    assert sniff_format(path) == "tar"
    assert_same(dict(torch.load(path, weights_only=False)), state)  # our own file, nothing foreign in it
    with pytest.raises(Exception, match="legacy .tar format"):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", ["zip", "legacy", "tar", "safetensors"])
def test_every_format_gives_the_stored_tensors(kind: str, tmp_path: Path) -> None:
    state = sample_state()
    path = tmp_path / "weights.pth"
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        save_legacy(state, path)
    elif kind == "tar":
        save_tar(state, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    assert sniff_format(path) == kind
    got = load_state_dict(path)
    assert_same(got, state)
    assert got["norm.weight"].dtype == torch.float16  # as stored: the module build casts, not the reader
    if kind in ("legacy", "tar"):  # views keep sharing one storage, as saved
        assert got["conv.weight_t"].untyped_storage().data_ptr() == got["conv.weight"].untyped_storage().data_ptr()
        assert got["conv.weight_t"].stride() == (1, 6)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process memory map (Linux)")
def test_zip_and_safetensors_loads_are_memory_maps(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(256, 256)}, tmp_path / "mapped.pth")
    training = save_mmengine({"w": torch.randn(256, 256)}, tmp_path / "mapped-training.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.randn(256, 256)}, str(tmp_path / "mapped.safetensors"))
    for path in (tmp_path / "mapped.pth", training, tmp_path / "mapped.safetensors"):
        state = load_state_dict(path)
        assert str(path) in Path("/proc/self/maps").read_text(), f"{path.name} was copied, not mapped"
        del state


def test_mmengine_checkpoint_numpy_meta_and_unknown_classes(tmp_path: Path) -> None:
    state = {"backbone.stem.0.conv.weight": torch.randn(8, 3, 3, 3).half()}
    for legacy in (False, True):
        path = save_mmengine(state, tmp_path / f"dw-{legacy}.pth", legacy=legacy)
        with pytest.raises(pickle.UnpicklingError):  # why the restricted reader is needed: torch's allow-list says no
            torch.load(path, weights_only=True)
        checkpoint = read_checkpoint(path)
        meta = checkpoint["meta"]["dataset_meta"]
        assert meta["keypoint_colors"].dtype == np.uint8 and meta["keypoint_colors"].shape == (133, 3)
        assert np.array_equal(meta["sigmas"], np.linspace(0.01, 0.1, 133, dtype=np.float32))
        assert meta["big_endian"].dtype == np.dtype(">i4") and meta["big_endian"].tolist() == [0, 1, 2, 3]
        assert meta["fortran"].flags.f_contiguous and meta["fortran"].tolist() == [[0, 1, 2], [3, 4, 5]]
        assert meta["mixed"].tolist() == ["nose", 1] and meta["float_dtype"] == np.dtype("<f2")
        assert checkpoint["meta"]["seed"] == 21 and isinstance(checkpoint["meta"]["seed"], np.int64)
        assert checkpoint["meta"]["cfg"].startswith("model = dict")
        buffer = checkpoint["message_hub"]["log_scalars"]["train/loss"]
        assert isinstance(buffer, OpaqueObject)
        assert (buffer.pickled_module, buffer.pickled_name) == ("mmengine.logging.history_buffer", "HistoryBuffer")
        assert np.array_equal(buffer.state["_log_history"], [0.5, 0.25])  # inert data, never a HistoryBuffer
        assert isinstance(checkpoint["meta"]["model_cfg"], OpaqueObject)
        assert ("type", "RTMPose") in checkpoint["meta"]["model_cfg"].items
        assert torch.equal(checkpoint["optimizer"]["state"][0]["step"], torch.tensor(3.0))
        assert_same(load_state_dict(path), state)
    assert not [m for m in sys.modules if m.startswith("mmengine")], "the reader imported a module from the file"


class Recorder:
    """A class that IS importable (this test module) and would leave a trace if built or restored."""

    marker: Path | None = None

    def __init__(self, marker: Path) -> None:
        self.marker_path = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker_path"]).write_text("restored")


def test_unknown_classes_are_never_built_even_when_importable(tmp_path: Path) -> None:
    marker = tmp_path / "restored"
    path = tmp_path / "with-object.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"hook": Recorder(marker)}}, path)
    pickle.loads(pickle.dumps(Recorder(marker)))  # the class really writes the marker when restored ...
    assert marker.exists()
    marker.unlink()
    checkpoint = read_checkpoint(path)  # ... and the reader never restores it
    assert not marker.exists()
    assert isinstance(checkpoint["meta"]["hook"], OpaqueObject)
    assert checkpoint["meta"]["hook"].state == {"marker_path": str(marker)}
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


# --------------------------------------------------------------------------------------------------------------
# Code-running pickles: refused wherever they hide, and the payload never runs
# --------------------------------------------------------------------------------------------------------------


class _Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args

    def __call__(self, *args: Any) -> Any:  # pickle wants the reduce callable to be callable; never called here
        raise AssertionError("not called")


def payloads(marker: Path) -> dict[str, _Reduce]:
    touch = f"touch {marker}"
    return {
        "os.system": _Reduce(os.system, touch),
        "builtins.eval": _Reduce(eval, f"__import__('os').system({touch!r})"),
        "builtins.exec": _Reduce(exec, f"import os; os.system({touch!r})"),
        "subprocess.call": _Reduce(subprocess.call, ["touch", str(marker)]),
        "functools.partial": _Reduce(functools.partial(os.system, touch)),
        "getattr(__import__('os'), 'system')": _Reduce(_Reduce(getattr, _Reduce(__import__, "os"), "system"), touch),
    }


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Each payload really runs under plain pickle (so the refusals below are meaningful)."""
    for name, payload in payloads(tmp_path / "live").items():
        pickle.loads(pickle.dumps(payload))
        assert (tmp_path / "live").exists(), name
        (tmp_path / "live").unlink()


@pytest.mark.parametrize("where", ["state_dict", "meta", "message_hub", "optimizer"])
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_code_running_pickles_are_refused_anywhere(where: str, kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, payload in payloads(marker).items():
        path = tmp_path / f"{name}.pth"
        checkpoint = mmengine_checkpoint({"w": torch.ones(3)})
        if where == "state_dict":
            checkpoint["state_dict"]["evil"] = payload
        elif where == "meta":
            checkpoint["meta"]["dataset_meta"]["hidden"] = [payload]
        else:
            checkpoint[where] = {"deep": {"deeper": (1, payload)}}
        with installed_as("mmengine.logging.history_buffer", HistoryBuffer), \
                installed_as("mmengine.config.config", ConfigDict):
            torch.save(checkpoint, path, **({"_use_new_zipfile_serialization": False} if kind == "legacy" else {}))
        with pytest.raises(WeightsError, match="refused") as exc:
            load_state_dict(path)
        assert str(path) in exc.value.message and exc.value.fix
        assert not marker.exists(), f"{name} in {where} ran"


@pytest.mark.parametrize("member", ["pickle", "storages", "sys_info"])
def test_code_running_pickles_are_refused_in_tar_members(member: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, payload in payloads(marker).items():
        path = save_tar(sample_state(), tmp_path / f"{name}.pth", inject={member: payload})
        with pytest.raises(WeightsError, match="refused"):
            load_state_dict(path)
        assert not marker.exists(), f"{name} in the tar member {member} ran"


def test_a_raw_pickle_and_numpy_tricks_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(payloads(marker)["os.system"], protocol=4))
    with pytest.raises(WeightsError, match="refused"):
        load_state_dict(raw)
    npy = tmp_path / "np.npy"
    np.save(npy, np.arange(3), allow_pickle=False)
    trick = tmp_path / "numpy-load.pth"
    torch.save({"w": torch.ones(1), "x": _Reduce(np.load, str(npy))}, trick)
    with pytest.raises(WeightsError, match="refused .*numpy"):
        load_state_dict(trick)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Broken files: one clear error naming the file and the fix
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "legacy", "tar"])
def test_truncated_files_of_every_format(kind: str, tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64)}
    path = tmp_path / "full.pth"
    {"zip": lambda: torch.save(state, path), "legacy": lambda: save_legacy(state, path),
     "tar": lambda: save_tar(state, path)}[kind]()
    data = path.read_bytes()
    end = len(data)
    if kind == "tar":  # a tar is padded with zero blocks after its last member: cut inside the content
        with tarfile.open(path) as tar:
            end = max(m.offset_data + m.size for m in tar.getmembers())
    for cut in (end // 3, end - 100):
        short = tmp_path / f"short-{cut}.pth"
        short.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated or corrupt") as exc:
            load_state_dict(short, fix="run musetalk download")
        assert str(short) in exc.value.message and exc.value.fix == "run musetalk download"


def test_wrong_content_is_named(tmp_path: Path) -> None:
    cases = {"page.pth": (b"<!DOCTYPE html><html>Entry not found</html>" * 40, "HTML"),
             "config.bin": (b'{"_class_name": "UNet2DConditionModel"}' * 40, "JSON"),
             "noise.pth": (bytes(range(256)) * 8, "not a known checkpoint format")}
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=needle):
            load_state_dict(tmp_path / name)


def test_a_training_checkpoint_without_tensor_weights_is_named(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": "text"}}, tmp_path / "text.pth")
    with pytest.raises(WeightsError, match="not tensors"):
        load_state_dict(tmp_path / "text.pth")


# --------------------------------------------------------------------------------------------------------------
# DWPose's training checkpoint, and the whole pipeline on legacy files
# --------------------------------------------------------------------------------------------------------------


def test_dwpose_loads_the_mmengine_training_checkpoint(tmp_path: Path) -> None:
    from musetalk.stages.faces.dwpose import DWPoseConfig, DWPoseNet, load_dwpose

    tiny = DWPoseConfig(deepen_factor=0.167, widen_factor=0.25, in_channels=256)
    torch.manual_seed(0)
    net = DWPoseNet(tiny)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}  # stored fp16
    for legacy in (False, True):
        path = save_mmengine(state, tmp_path / f"dw-ll_ucoco_384-{legacy}.pth", legacy=legacy)
        loaded = load_dwpose(path, tiny)
        for key, value in loaded.state_dict().items():
            assert value.dtype == torch.float32 or not value.is_floating_point()
            assert torch.equal(value, state[key].to(value.dtype)), key


def test_pipeline_runs_on_a_models_folder_of_legacy_files(tiny_models: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """BiSeNet and the UNet as pre-1.6 pickles and a tar-format ResNet-18 beside them: the same weights load, and
    a video comes out."""
    from musetalk.frontends.hub import doctor
    from musetalk.stages.audio import load_audio
    from musetalk.stream.pipeline import MuseTalkPipeline
    from musetalk.stream.video import open_frames
    from musetalk.weights import WEIGHTS
    from tests.conftest import write_wav

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    legacy = tmp_path / "models"
    shutil.copytree(tiny_models, legacy)
    for key in ("face-parse", "unet-v15"):
        path = legacy / WEIGHTS[key].dest
        save_legacy(torch.load(path, weights_only=True), path)
        assert sniff_format(path) == "legacy"
    torch.manual_seed(1)
    backbone = {"conv1.weight": torch.randn(64, 3, 7, 7), "bn1.running_mean": torch.zeros(64),
                "fc.weight": torch.randn(10, 512), "fc.bias": torch.zeros(10)}
    save_tar(backbone, legacy / WEIGHTS["face-parse-backbone"].dest)

    samples = Path(__file__).resolve().parents[1] / "samples"
    audio = write_wav(tmp_path / "a.wav", load_audio(samples / "speech.wav")[: int(0.2 * 16000)])
    pipe = MuseTalkPipeline.from_pretrained(legacy, version="v15", device="cpu", dtype="fp32")
    for module, key in ((pipe.unet.model, "unet-v15"), (pipe.parser.net, "face-parse")):  # the very same weights
        assert_same(module.state_dict(), torch.load(tiny_models / WEIGHTS[key].dest, weights_only=True))
    out = tmp_path / "legacy.mp4"
    result = pipe.generate(samples / "face.png", audio, out, pipe.default_config(fps=25), progress=False)
    assert result.num_frames == 5 and len(list(open_frames(out))) == 5

    assert_same(load_state_dict(legacy / WEIGHTS["face-parse-backbone"].dest), backbone)
    checks = {c.name: c for c in doctor(legacy)}
    backbone_check = checks["face-parse backbone (optional)"]
    assert backbone_check.ok and not backbone_check.required and "tar" in backbone_check.detail
    assert "legacy format" in checks[WEIGHTS["face-parse"].dest].detail


def _hand_written_legacy(path: Path, storage_type: Any, location: str, numel: int, data: bytes) -> Path:
    """A pre-1.6 stream written by hand, for what torch.save cannot make here (a GPU-saved file, a lying size)."""
    stream = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        stream.write(_pickle_bytes(header))
    storage_id = ("storage", storage_type, "0", location, numel, None)
    rebuild = torch._utils._rebuild_tensor_v2
    tensor = _Reduce(rebuild, "PID", 0, (numel,), (1,), False, collections.OrderedDict())
    stream.write(_pickle_bytes({"w": tensor}, lambda o: storage_id if o == "PID" else None))
    stream.write(_pickle_bytes(["0"]))
    stream.write(struct.pack("<q", numel) + data)
    path.write_bytes(stream.getvalue())
    return path


def test_gpu_saved_legacy_files_load_on_the_cpu_and_lying_sizes_are_caught(tmp_path: Path) -> None:
    values = torch.arange(6, dtype=torch.float32)
    gpu = _hand_written_legacy(tmp_path / "gpu.pth", torch.cuda.FloatStorage, "cuda:0", 6, values.numpy().tobytes())
    got = load_state_dict(gpu)["w"]
    assert got.device.type == "cpu" and torch.equal(got, values)
    huge = _hand_written_legacy(tmp_path / "huge.pth", torch.FloatStorage, "cpu", 10**15, b"")
    with pytest.raises(WeightsError, match="truncated"):  # refused before allocating 4 PB
        load_state_dict(huge)
