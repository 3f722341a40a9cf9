"""The MLX backend (UNet + VAE): parity with torch, half precision gates, weight conversion and its cache,
backend selection, and that everything works without MLX.

MLX runs here through its CPU build (``mlx[cpu]``, in the ``dev`` extra; the module is skipped only where no MLX
wheel exists, e.g. Intel Macs, and the rest of the suite is the no-MLX run there); its reference BLAS is ~10x slower
than torch's, so the parity checks use small spatial sizes (64x64 crops, 8x8 latents): the layers are the same
at any size. The full 256x256 path is covered by the golden verifier test (marked slow).
"""

from __future__ import annotations

import os
import shutil
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.errors import InputError, WeightsError
from musetalk.stages.mlx import INSTALL_HINT, mlx_available, resolve_backend

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"

mx = pytest.importorskip("mlx.core", reason="no MLX wheel for this platform (the dev extra installs it elsewhere)")

from musetalk.stages.mlx import convert  # noqa: E402  (needs mlx)
from musetalk.stages.mlx.unet import MLXUNet  # noqa: E402
from musetalk.stages.mlx.vae import MLXVAE  # noqa: E402
from musetalk.stages.unet import UNet  # noqa: E402
from musetalk.stages.vae import VAE  # noqa: E402

TOL_UNET_FP32 = 1e-4  # max abs, float32 vs torch float32 (the golden tolerance is 1e-3)
TOL_LATENTS_FP32 = 1e-4  # max abs (the golden tolerance for latents)
HALF_PSNR_DB = 40.0  # decoded faces, half precision vs MLX float32
HALF_MEAN_LEVELS = 1.0  # mean |delta| in grey levels, decoded faces
HALF_UNET_MEAN_REL = 0.03  # UNet: mean |delta| / mean |output| (measured: fp16 0.002, bf16 0.016)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor | np.ndarray]:
    rng = np.random.default_rng(0)
    return {"latents8": torch.from_numpy(rng.normal(size=(2, 8, 32, 32)).astype(np.float32)),
            "windows": torch.from_numpy(rng.normal(size=(2, 50, 384)).astype(np.float32)),
            "small_latents": torch.from_numpy(rng.normal(size=(2, 4, 8, 8)).astype(np.float32)),
            "crops": rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def torch_vae(tiny_models: Path) -> VAE:
    return VAE.from_pretrained(tiny_models / "sd-vae")


@pytest.fixture(scope="module")
def mlx_vae(tiny_models: Path) -> MLXVAE:
    return MLXVAE.from_pretrained(tiny_models / "sd-vae", cache=False)


def copy_models(tiny_models: Path, dest: Path, *parts: str) -> Path:
    for part in parts:
        shutil.copytree(tiny_models / part, dest / part)
    return dest


# -- parity with torch, float32 ---------------------------------------------------------------------------
@pytest.mark.parametrize("unet_dir,filename", [("musetalkV15", "unet.pth"), ("musetalk", "pytorch_model.bin")])
def test_unet_matches_torch_for_each_checkpoint_layout(tiny_models: Path, inputs: dict, unet_dir: str,
                                                       filename: str) -> None:
    """v1.5 ``musetalkV15/unet.pth`` and v1 ``musetalk/pytorch_model.bin`` convert and run like the torch UNet."""
    config, weights = tiny_models / unet_dir / "musetalk.json", tiny_models / unet_dir / filename
    expected = UNet.from_pretrained(config, weights)(inputs["latents8"], inputs["windows"]).numpy()
    unet = MLXUNet.from_pretrained(config, weights, cache=False)
    got = unet(inputs["latents8"], inputs["windows"])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (2, 4, 32, 32)
    assert np.abs(got.numpy() - expected).max() <= TOL_UNET_FP32
    assert unet.fingerprint.startswith("mlx:" + filename)
    # numpy at the boundary works too, as for the torch stage
    assert np.array_equal(unet(inputs["latents8"].numpy(), inputs["windows"].numpy()).numpy(), got.numpy())


def test_models_loaded_on_one_thread_run_on_another(tiny_models: Path, inputs: dict) -> None:
    """The pipeline loads on the caller's thread and runs the models in its worker thread."""
    import threading

    config, weights = tiny_models / "musetalkV15" / "musetalk.json", tiny_models / "musetalkV15" / "unet.pth"
    unet = MLXUNet.from_pretrained(config, weights, cache=False)
    here = unet(inputs["latents8"][:1], inputs["windows"][:1])
    results: list = []
    worker = threading.Thread(target=lambda: results.append(unet(inputs["latents8"][:1], inputs["windows"][:1])))
    worker.start()
    worker.join()
    assert len(results) == 1 and np.array_equal(results[0].numpy(), here.numpy())


def test_vae_encode_and_decode_match_torch(torch_vae: VAE, mlx_vae: MLXVAE, inputs: dict) -> None:
    latents = mlx_vae.unet_input(inputs["crops"])
    assert latents.shape == (2, 8, 8, 8) and latents.dtype == torch.float32
    assert np.abs(latents.numpy() - torch_vae.unet_input(inputs["crops"]).numpy()).max() <= TOL_LATENTS_FP32
    faces = mlx_vae.decode(inputs["small_latents"])
    expected = torch_vae.decode(inputs["small_latents"])
    assert faces.dtype == np.uint8 and faces.shape == expected.shape == (2, 64, 64, 3)
    diff = np.abs(faces.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99  # the golden tolerance: 1 grey level
    assert mlx_vae.scaling_factor == torch_vae.scaling_factor
    assert mlx_vae.fingerprint == "mlx:" + torch_vae.fingerprint  # avatars keep each backend's latents apart


def test_vae_legacy_attention_keys_convert(tiny_models: Path, tmp_path: Path, mlx_vae: MLXVAE, inputs: dict) -> None:
    """sd-vae-ft-mse's .bin stores attention as query/key/value/proj_attn 1x1 convs; a .safetensors file loads too."""
    from safetensors.torch import save_file

    from musetalk.weights import load_state_dict

    state = load_state_dict(tiny_models / "sd-vae" / "diffusion_pytorch_model.bin")
    legacy = {}
    for key, value in state.items():
        if ".attentions." in key:
            for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                             (".to_out.0.", ".proj_attn.")):
                if new in key:
                    key = key.replace(new, old)
                    value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    for folder, write in (("legacy", lambda d: torch.save(legacy, d / "diffusion_pytorch_model.bin")),
                          ("safetensors", lambda d: save_file(state, str(d / "diffusion_pytorch_model.safetensors")))):
        vae_dir = tmp_path / folder / "sd-vae"
        vae_dir.mkdir(parents=True)
        shutil.copy(tiny_models / "sd-vae" / "config.json", vae_dir)
        write(vae_dir)
        vae = MLXVAE.from_pretrained(vae_dir, cache=False)
        assert np.array_equal(vae.decode(inputs["small_latents"]), mlx_vae.decode(inputs["small_latents"])), folder


# -- half precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float32(tiny_models: Path, mlx_vae: MLXVAE, inputs: dict, dtype: torch.dtype) -> None:
    """PSNR and mean |delta|, not max: batched half precision drifts by several levels on single pixels."""
    vae = MLXVAE.from_pretrained(tiny_models / "sd-vae", dtype=dtype, cache=False)
    assert vae.dtype == dtype and vae.model.decoder.conv_in.weight.dtype == convert_dtype(dtype)
    faces, reference = vae.decode(inputs["small_latents"]), mlx_vae.decode(inputs["small_latents"])
    assert psnr(faces, reference) >= HALF_PSNR_DB
    assert np.abs(faces.astype(float) - reference.astype(float)).mean() <= HALF_MEAN_LEVELS
    config, weights = tiny_models / "musetalkV15" / "musetalk.json", tiny_models / "musetalkV15" / "unet.pth"
    half = MLXUNet.from_pretrained(config, weights, dtype=dtype, cache=False)(inputs["latents8"][:1],
                                                                            inputs["windows"][:1]).numpy()
    full = MLXUNet.from_pretrained(config, weights, cache=False)(inputs["latents8"][:1], inputs["windows"][:1]).numpy()
    assert np.isfinite(half).all()
    assert np.abs(half - full).mean() <= HALF_UNET_MEAN_REL * np.abs(full).mean()


def convert_dtype(dtype: torch.dtype):
    from musetalk.stages.mlx import mlx_dtype

    return mlx_dtype(dtype)


# -- the converted-weights cache --------------------------------------------------------------------------
def test_weights_cache_is_written_once_reused_and_invalidated(tiny_models: Path, tmp_path: Path, inputs: dict,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    models = copy_models(tiny_models, tmp_path, "sd-vae")
    source = models / "sd-vae" / "diffusion_pytorch_model.bin"
    conversions = []
    real = convert.to_mlx_layout
    monkeypatch.setattr(convert, "to_mlx_layout", lambda state: conversions.append(1) or real(state))

    first = MLXVAE.from_pretrained(models / "sd-vae").decode(inputs["small_latents"])
    cached = convert.cache_path(source)
    assert conversions == [1] and cached.is_file() and cached.parent == source.parent
    assert sorted(p.name for p in source.parent.iterdir()) == sorted(["config.json", source.name, cached.name])

    again = MLXVAE.from_pretrained(models / "sd-vae").decode(inputs["small_latents"])
    assert conversions == [1], "a valid cache must be read, not converted again"
    assert np.array_equal(first, again)

    # a new source file (other weights, new mtime) gets a new cache; the stale one goes
    from musetalk.weights import load_state_dict

    state = {k: v * 0.5 if k.startswith("decoder.conv_out") else v for k, v in load_state_dict(source).items()}
    torch.save(state, source.with_suffix(".new"))  # replaced as a download would be: the loaded file is memory-mapped
    os.replace(source.with_suffix(".new"), source)
    changed = MLXVAE.from_pretrained(models / "sd-vae").decode(inputs["small_latents"])
    assert conversions == [1, 1] and not cached.exists() and convert.cache_path(source).is_file()
    assert not np.array_equal(changed, first)
    torch_changed = VAE.from_pretrained(models / "sd-vae").decode(inputs["small_latents"])
    assert np.abs(changed.astype(int) - torch_changed.astype(int)).max() <= 1

    # a damaged cache is rebuilt, never trusted
    convert.cache_path(source).write_bytes(b"not a safetensors file")
    assert np.array_equal(MLXVAE.from_pretrained(models / "sd-vae").decode(inputs["small_latents"]), changed)
    assert conversions == [1, 1, 1]


def test_a_failed_cache_write_still_loads_and_leaves_no_temp_file(tiny_models: Path, tmp_path: Path,
                                                                  inputs: dict) -> None:
    models = copy_models(tiny_models, tmp_path, "musetalkV15")
    weights = models / "musetalkV15" / "unet.pth"
    convert.cache_path(weights).mkdir()  # the cache name is taken by a folder: os.replace fails
    unet = MLXUNet.from_pretrained(models / "musetalkV15" / "musetalk.json", weights)
    assert unet(inputs["latents8"][:1], inputs["windows"][:1]).shape == (1, 4, 32, 32)
    assert not [p for p in weights.parent.iterdir() if p.name.endswith(".tmp.safetensors")]


def test_mismatched_weights_raise_weights_error_with_the_keys(tiny_models: Path) -> None:
    from mlx.utils import tree_flatten

    config = tiny_models / "musetalkV15" / "musetalk.json"
    unet = MLXUNet.from_pretrained(config, tiny_models / "musetalkV15" / "unet.pth", cache=False)
    weights = dict(tree_flatten(unet.model.parameters()))
    del weights["conv_out.bias"]
    weights["extra.weight"] = mx.zeros((2,))
    weights["conv_in.bias"] = mx.zeros((3,))
    with pytest.raises(WeightsError, match=r"1 missing keys: conv_out\.bias; 1 unexpected keys: extra\.weight; "
                                           r"1 shape mismatches: conv_in\.bias"):
        convert.load_weights_strict(unet.model, weights, mx.float32, "unet.pth")
    with pytest.raises(WeightsError, match="does not match the MLX AutoencoderKL"):  # a UNet file as the VAE
        vae_dir = tiny_models / "sd-vae"
        convert.load_weights_strict(MLXVAE.from_pretrained(vae_dir, cache=False).model, weights, mx.float32, "x")


def test_unsupported_unet_options_are_refused(tiny_models: Path, tmp_path: Path) -> None:
    import json

    config = json.loads((tiny_models / "musetalkV15" / "musetalk.json").read_text())
    (tmp_path / "musetalk.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(WeightsError, match="class_embed_type") as info:
        MLXUNet.from_pretrained(tmp_path / "musetalk.json", tiny_models / "musetalkV15" / "unet.pth", cache=False)
    assert "--backend torch" in info.value.fix


# -- backend selection and switching ----------------------------------------------------------------------
@pytest.mark.parametrize("asked,apple,available,expected", [
    ("auto", True, True, "mlx"), ("auto", True, False, "torch"), ("auto", False, True, "torch"),
    ("auto", False, False, "torch"), ("torch", True, True, "torch"), ("mlx", False, True, "mlx"),
])
def test_backend_auto_selection(asked: str, apple: bool, available: bool, expected: str) -> None:
    assert resolve_backend(asked, apple_silicon=apple, available=available) == expected


def test_backend_errors_say_how_to_fix() -> None:
    with pytest.raises(InputError) as info:
        resolve_backend("mlx", available=False)
    assert info.value.fix == INSTALL_HINT == 'pip install "musetalk[mlx]"'
    with pytest.raises(InputError, match="unknown backend"):
        resolve_backend("metal")
    from musetalk.config import preset

    assert preset("v15", backend="mlx").runtime.backend == "mlx"
    with pytest.raises(InputError, match="backend"):
        preset("v15", backend="metal")


def test_switching_backends_in_one_process(tiny_models: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """torch, then MLX, then torch again: each pipeline streams the same frames (within the blend tolerance)."""
    from musetalk.stages.audio import load_audio
    from musetalk.stream.pipeline import MuseTalkPipeline

    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))
    models = copy_models(tiny_models, tmp_path / "models", "musetalkV15", "sd-vae", "whisper", "face-parse-bisent")
    wav = load_audio(SAMPLES / "speech.wav")[: int(0.12 * 16000)]  # 3 frames at 25 fps: one batch
    pipes = {backend: MuseTalkPipeline.from_pretrained(models, device="cpu", dtype="fp32", backend=backend)
             for backend in ("torch", "mlx")}
    runs = []
    for backend in ("torch", "mlx", "torch"):  # the torch pipeline again after MLX ran: nothing leaked between them
        pipe = pipes[backend]
        assert getattr(pipe.unet, "backend", "torch") == getattr(pipe.vae, "backend", "torch") == backend
        assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
        config = pipe.default_config(batch_size=4)
        avatar = pipe.prepare_avatar(SAMPLES / "face.png", config, name="switch")
        runs.append((avatar.meta.key, np.stack(list(islice(pipe.stream(avatar, wav, config), 3)))))
    (key_t, frames_t), (key_m, frames_m), (key_t2, frames_t2) = runs
    assert key_m != key_t == key_t2  # the MLX VAE's latents are cached apart from torch's
    assert np.array_equal(frames_t, frames_t2)
    close = np.abs(frames_m.astype(int) - frames_t.astype(int)) <= 2
    assert close.mean() >= 0.995
    assert list(models.glob("*/*.mlx-*.safetensors")), "the MLX pipeline caches its converted weights"


# -- without MLX ------------------------------------------------------------------------------------------
def test_everything_works_without_mlx(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import failure of mlx (absent package) leaves torch as the backend and doctor says how to add MLX."""
    from musetalk.frontends.hub import _mlx_check
    from musetalk.profiling.memory import MemoryMonitor
    from musetalk.stream.pipeline import MuseTalkPipeline

    monkeypatch.setitem(sys.modules, "mlx", None)  # `import mlx.core` now raises ImportError
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    assert not mlx_available()
    assert resolve_backend("auto", apple_silicon=True) == "torch"
    pipe = MuseTalkPipeline.from_pretrained(tiny_models, device="cpu", dtype="fp32", backend="auto")
    assert isinstance(pipe.unet, UNet) and isinstance(pipe.vae, VAE)
    with pytest.raises(InputError):
        MuseTalkPipeline.from_pretrained(tiny_models, device="cpu", dtype="fp32", backend="mlx")
    check = _mlx_check()
    assert not check.ok and not check.required and check.fix == 'pip install "musetalk[mlx]"'
    assert not any(k.startswith("mlx") for k in MemoryMonitor(device="cpu").sample())


def test_doctor_and_profiler_report_mlx(mlx_vae: MLXVAE, inputs: dict) -> None:
    from musetalk.frontends.hub import _mlx_check
    from musetalk.profiling.memory import MemoryMonitor

    check = _mlx_check()
    assert check.ok and mx.__version__ in check.detail
    with MemoryMonitor(interval=0.01, device="cpu") as monitor:
        mlx_vae.decode(inputs["small_latents"])
    peak = monitor.peak()
    assert {"mlx_active_memory", "mlx_peak_memory", "mlx_cache_memory"} <= set(peak)
    assert peak["mlx_peak_memory"] > 0  # the decode's activations


# -- goldens ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_golden_verifier_passes_with_the_mlx_backend(v15_golden: Path, capsys: pytest.CaptureFixture) -> None:
    """The stages of the MuseTalk golden set that run the UNet and the VAE (model stages, the chained run) on MLX,
    within the golden tolerances. The other groups run no MLX code: test_golden checks them once."""
    from musetalk.testing.golden import main

    status = main(["--backend", "mlx", "--stages", "models,chained", str(v15_golden)])
    out = capsys.readouterr().out
    assert "backend mlx" in out and "unet: one step at t=0" in out and "chained:" in out
    assert "audio:" not in out and "parsing:" not in out
    assert status == 0, out
    assert not list(v15_golden.glob("models/**/*.mlx-*")), "the verifier must not write into the golden set"
