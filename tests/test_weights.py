"""Safe, strict weight loading: every bad checkpoint gives a WeightsError naming the file and the fix."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from musetalk.errors import WeightsError
from musetalk.weights import load_into, load_state_dict

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/musetalk-pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle below is protocol 4 on purpose
def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/musetalk-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    torch.save({"weight": _RunsCode()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_state_dict(path)
    assert not marker.exists(), "the payload ran"
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(WeightsError):
        load_state_dict(raw)
    assert not marker.exists()


def test_missing_truncated_empty_and_lfs(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found") as exc:
        load_state_dict(tmp_path / "nope.pth", fix="run musetalk download")
    assert exc.value.fix == "run musetalk download"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(WeightsError, match="truncated|corrupt|cannot load"):
        load_state_dict(truncated)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_state_dict(tmp_path / "empty.bin")
    lfs = tmp_path / "lfs.bin"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(WeightsError, match="LFS"):
        load_state_dict(lfs)


def test_nested_state_dict_and_non_tensor_content(tmp_path: Path) -> None:
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, path)
    assert list(load_state_dict(path)) == ["a"]
    bad = tmp_path / "list.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(WeightsError, match="state dict"):
        load_state_dict(bad)


def test_strict_load_reports_key_and_shape_mismatch() -> None:
    module = torch.nn.Linear(3, 2)
    with pytest.raises(WeightsError, match="missing keys: bias"):
        load_into(module, {"weight": torch.zeros(2, 3)}, source="x.pth")
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_into(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, source="x.pth")
    with pytest.raises(WeightsError, match="unexpected keys: extra"):
        load_into(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "extra": torch.zeros(1)},
                  source="x.pth")
    # float16 values load into a float32 module (the goldens store BiSeNet/Whisper that way)
    load_into(module, {"weight": torch.ones(2, 3, dtype=torch.float16), "bias": torch.zeros(2)}, source="x.pth")
    assert module.weight.dtype == torch.float32 and float(module.weight.detach().sum()) == 6.0


def test_no_unsafe_loading_anywhere_in_the_package() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "musetalk").rglob("*.py"))
    assert "weights_only=False" not in source
    assert not re.search(r"torch\.load\s*=", source), "torch.load must never be patched"
    calls = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert all("weights_only=True" in c for c in calls), calls


def test_safetensors_files_load_and_corrupt_ones_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    assert torch.equal(load_state_dict(path)["w"], torch.arange(4.0))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:20])
    with pytest.raises(WeightsError, match="cannot read"):
        load_state_dict(broken)


# --- the registry, doctor and convert -------------------------------------------------------------------------


def test_layouts_evaluate_dwpose_and_tiny_weights_take_their_paths_from_the_registry(tiny_models: Path) -> None:
    from musetalk.quality.evaluate import SFD_FILE, SYNCNET_FILE
    from musetalk.stages.faces.dwpose import CHECKPOINT_RELPATH
    from musetalk.weights import LAYOUTS, WEIGHTS

    dests = {w.dest for w in WEIGHTS.values()}
    for parts in LAYOUTS.values():
        assert set(parts.required_files()) <= dests
        assert f"{parts.unet_dir}/{parts.unet_weights}" in dests and parts.face_parse_backbone in dests
    assert {SYNCNET_FILE, SFD_FILE, CHECKPOINT_RELPATH} <= dests
    written = {str(p.relative_to(tiny_models)) for p in tiny_models.rglob("*") if p.is_file()}
    registered_v = {w.dest for w in WEIGHTS.values() if w.group in ("v15", "v1", "common") and w.required}
    assert registered_v <= written  # every required file of both versions, under its registered name
    # no module types an official path itself any more
    source = {p: p.read_text() for p in (REPO / "musetalk").rglob("*.py") if p.name != "registry.py"}
    for dest in dests:
        typed = [str(p.relative_to(REPO)) for p, text in source.items() if f'"{dest}"' in text]
        assert not typed, f"{dest} is typed in {typed}; take it from musetalk.weights.registry"


def _real_looking_models(tiny_models: Path, tmp_path: Path) -> Path:
    """The tiny folder without its TINY_WEIGHTS marker: doctor then holds its files to the registry's figures."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    (models / "TINY_WEIGHTS").unlink()
    return models


def test_doctor_names_a_truncated_file_with_its_fix(tiny_models: Path, tmp_path: Path) -> None:
    from musetalk.frontends.hub import doctor
    from musetalk.weights import WEIGHTS

    models = _real_looking_models(tiny_models, tmp_path)
    checks = {c.name: c for c in doctor(models)}
    unet = checks[WEIGHTS["unet-v15"].dest]
    size = (models / WEIGHTS["unet-v15"].dest).stat().st_size
    assert not unet.ok and unet.required and f"truncated: {size:,} of 3,400,074,924 bytes" in unet.detail
    assert "musetalk download" in unet.fix and WEIGHTS["unet-v15"].dest in unet.fix
    vae = checks[WEIGHTS["vae"].dest]
    assert not vae.ok and vae.required and "of 334,707,217 bytes" in vae.detail
    v1 = checks[WEIGHTS["unet-v1"].dest]
    assert v1.ok and not v1.required and "size not published" in v1.detail  # no figure, no verdict; never blocks
    tiny = {c.name: c for c in doctor(tiny_models)}
    assert tiny[WEIGHTS["unet-v15"].dest].ok and "random test weights" in tiny[WEIGHTS["unet-v15"].dest].detail


def test_doctor_verify_checks_hashes_only_when_asked(tiny_models: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    from dataclasses import replace

    from musetalk.frontends.hub import doctor
    from musetalk.weights import WEIGHTS

    models = _real_looking_models(tiny_models, tmp_path)
    path = models / WEIGHTS["face-parse"].dest
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    entry = replace(WEIGHTS["face-parse"], size=path.stat().st_size, sha256=digest)
    monkeypatch.setitem(WEIGHTS, "face-parse", entry)  # this folder's file plays the published one
    name = entry.dest
    assert {c.name: c for c in doctor(models)}[name].ok
    assert "SHA-256 ok" in {c.name: c for c in doctor(models, verify=True)}[name].detail
    monkeypatch.setitem(WEIGHTS, "face-parse", replace(entry, sha256="f" * 64))
    assert {c.name: c for c in doctor(models)}[name].ok  # without --verify: no hashing
    bad = {c.name: c for c in doctor(models, verify=True)}[name]
    assert not bad.ok and f"SHA-256 {digest}" in bad.detail and "musetalk download" in bad.fix


def test_convert_writes_identical_safetensors_that_loaders_prefer(tiny_models: Path, tmp_path: Path) -> None:
    import os
    import shutil

    from safetensors.torch import load_file

    from musetalk.stream.pipeline import MuseTalkPipeline
    from musetalk.weights import WEIGHTS
    from musetalk.weights.convert import convert_models

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    written = convert_models(models, log=lambda _: None)
    weights = [w for w in WEIGHTS.values() if w.is_weights and (models / w.dest).is_file()]
    assert len(written) == len(weights) >= 5
    for entry in weights:
        source, converted = models / entry.dest, (models / entry.dest).with_suffix(".safetensors")
        original = torch.load(source, weights_only=True)
        copy = load_file(str(converted))
        assert set(copy) == set(original)
        assert all(torch.equal(copy[k], v) and copy[k].dtype == v.dtype for k, v in original.items()), entry.dest
    # loaders read the copy: the original's bytes can be garbage (same size and time) and loading still works
    unet = models / WEIGHTS["unet-v15"].dest
    stat, keep = unet.stat(), unet.read_bytes()
    unet.write_bytes(b"\0" * stat.st_size)
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    converted_pipe = MuseTalkPipeline.from_pretrained(models, version="v15", device="cpu", dtype="fp32")
    reference = MuseTalkPipeline.from_pretrained(tiny_models, version="v15", device="cpu", dtype="fp32")
    for a, b in ((converted_pipe.unet.model, reference.unet.model), (converted_pipe.vae.model, reference.vae.model),
                 (converted_pipe.audio_encoder.encoder, reference.audio_encoder.encoder),
                 (converted_pipe.parser.net, reference.parser.net)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    # a changed source makes its copy stale: the source is read again (here: the zeros, refused as not weights)
    unet.write_bytes(keep)
    assert torch.equal(load_state_dict(unet)["conv_in.weight"], reference.unet.model.state_dict()["conv_in.weight"])
    unet.write_bytes(b"\0" * stat.st_size)
    with pytest.raises(WeightsError, match="unet.pth"):
        load_state_dict(unet)


def test_convert_command(tiny_models: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    proc = subprocess.run([sys.executable, "-m", "musetalk", "convert", "--to", "safetensors", "--models", str(models)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "wrote    musetalkV15/unet.safetensors" in proc.stdout and "safetensors file(s) current" in proc.stdout
    assert (models / "face-parse-bisent" / "79999_iter.safetensors").is_file()
    assert not list(models.rglob("*.part"))


def test_write_safetensors_matches_the_library(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from musetalk.weights.convert import write_safetensors

    state = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
             "i64": torch.arange(3), "u8": torch.arange(5, dtype=torch.uint8), "b": torch.tensor([True, False]),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "view": torch.randn(4, 6).t()}
    path = write_safetensors(state, tmp_path / "x.safetensors", metadata={"k": "v"})
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    from musetalk.weights.reader import safetensors_metadata

    assert safetensors_metadata(path) == {"k": "v"}
