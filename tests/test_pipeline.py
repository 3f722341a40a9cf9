"""End to end on tiny weights: real mp4s from the shipped samples, avatar reuse, streaming, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musetalk.stages.audio import load_audio
from musetalk.errors import InputError, MuseTalkError, NoFaceError
from musetalk.stream.pipeline import MuseTalkPipeline, pingpong
from musetalk.stream.video import VideoWriter, open_frames, probe
from tests.conftest import write_wav

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> MuseTalkPipeline:
    return MuseTalkPipeline.from_pretrained(tiny_models, version="v15", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def short_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 1.3 s of the sample speech (16 kHz mono PCM16)."""
    return write_wav(tmp_path_factory.mktemp("audio") / "short.wav", load_audio(SAMPLES / "speech.wav")[: int(1.3 * 16000)])


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 frames of the sample clip (keeps the per-source-frame work of the tests small)."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with VideoWriter(path, fps=25) as writer:
        for i, frame in enumerate(open_frames(SAMPLES / "face.mp4")):
            if i == 12:
                break
            writer.write(frame)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSETALK_CACHE", str(tmp_path / "cache"))


def test_pingpong_cycles_forward_then_backward() -> None:
    assert [pingpong(i, 3) for i in range(8)] == [0, 1, 2, 2, 1, 0, 0, 1]
    assert [pingpong(i, 1) for i in range(3)] == [0, 0, 0]


def test_image_source_makes_a_playable_mp4(pipe: MuseTalkPipeline, short_audio: Path, tmp_path: Path) -> None:
    out = tmp_path / "image.mp4"
    result = pipe.generate(SAMPLES / "face.png", short_audio, out, pipe.default_config(fps=25), progress=False)
    info = probe(out)
    n_expected = int(np.floor(len(load_audio(short_audio)) / 16000 * 25))
    assert result.num_frames == info.num_frames == n_expected
    assert info.fps == pytest.approx(25) and info.has_audio
    assert info.video_codec == "h264" and info.pix_fmt == "yuv420p"
    assert info.duration_s == pytest.approx(n_expected / 25, abs=0.05)
    assert info.audio_duration_s == pytest.approx(n_expected / 25, abs=0.1)
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_video_source_cycles_and_reuses_a_prepared_avatar(pipe: MuseTalkPipeline, short_clip: Path,
                                                          short_audio: Path, tmp_path: Path) -> None:
    calls = {"n": 0}
    real = pipe.landmarker("dlib")

    class Counting:
        name = "dlib"

        def detect(self, frame):
            calls["n"] += 1
            return real.detect(frame)

    counting = Counting()
    pipe = MuseTalkPipeline(pipe.audio_encoder, pipe.vae, pipe.unet, pipe.parser,
                            landmarker_factory=lambda _name: counting)
    config = pipe.default_config()
    avatar = pipe.prepare_avatar(short_clip, config, name="sample")
    n_source = len(avatar)
    assert calls["n"] == n_source and avatar.meta.faces == n_source
    again = pipe.prepare_avatar(short_clip, config, name="sample")
    assert calls["n"] == n_source, "a valid cached avatar must not be prepared again"
    assert again.meta.key == avatar.meta.key
    out = tmp_path / "video.mp4"
    result = pipe.generate(short_clip, short_audio, out, config, avatar="sample", progress=False)
    assert calls["n"] == n_source
    info = probe(out)
    assert result.num_frames == info.num_frames == int(len(load_audio(short_audio)) / 16000 * 25)
    assert info.num_frames > n_source, "the sample audio is longer than the clip: the cycle must go backward"
    # a changed setting invalidates the cache
    pipe.prepare_avatar(short_clip, pipe.default_config(bbox_shift=3), name="sample")
    assert calls["n"] == 2 * n_source


def test_frames_without_a_face_pass_through_untouched(pipe: MuseTalkPipeline, short_audio: Path,
                                                      tmp_path: Path) -> None:
    face = next(iter(open_frames(SAMPLES / "face.png")))
    grey = np.full_like(face, 90)
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2

    for i, frame in enumerate([face, grey, face]):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    config = pipe.default_config()
    avatar = pipe.prepare_avatar(folder, config)
    assert list(avatar.has_face) == [True, False, True]
    frames = list(pipe.stream(avatar, short_audio, config))
    assert len(frames) == int(len(load_audio(short_audio)) / 16000 * 25)
    for i, frame in enumerate(frames):
        source = pingpong(i, 3)
        if source == 1:
            np.testing.assert_array_equal(frame, grey)
        else:
            assert frame.shape == face.shape and not np.array_equal(frame, face)  # the mouth region was replaced


def test_stream_is_deterministic_and_matches_batch_size_one(pipe: MuseTalkPipeline, short_audio: Path) -> None:
    config = pipe.default_config(batch_size=4)
    avatar = pipe.prepare_avatar(SAMPLES / "face.png", config)
    first = list(pipe.stream(avatar, short_audio, config))[:6]
    single = list(pipe.stream(avatar, short_audio, pipe.default_config(batch_size=1)))[:6]
    for a, b in zip(first, single):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_source_without_any_face_fails_and_writes_nothing(pipe: MuseTalkPipeline, short_audio: Path,
                                                           tmp_path: Path) -> None:
    import cv2

    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((256, 256, 3), 120, np.uint8))
    out = tmp_path / "out.mp4"
    with pytest.raises(NoFaceError, match="no face"):
        pipe.generate(grey, short_audio, out, progress=False)
    assert not out.exists() and not any(p.suffix == ".mp4" for p in tmp_path.iterdir())


def test_interrupted_run_leaves_no_output(pipe: MuseTalkPipeline, short_audio: Path, tmp_path: Path) -> None:
    class Interrupt:
        def __init__(self) -> None:
            self.frames = 0

        def stage(self, name):
            from contextlib import nullcontext

            return nullcontext()

        def frame_done(self) -> None:
            self.frames += 1
            if self.frames == 5:
                raise KeyboardInterrupt

    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        pipe.generate(SAMPLES / "face.png", short_audio, out, progress=False, profiler=Interrupt())
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output and no temporary file may remain"


@pytest.mark.parametrize("case", ["missing_source", "unreadable_video", "silent", "zero_length", "not_audio",
                                  "missing_audio", "bad_output"])
def test_bad_inputs_give_clear_errors_and_no_file(case: str, pipe: MuseTalkPipeline, short_audio: Path,
                                                  tmp_path: Path) -> None:
    source, audio, out = SAMPLES / "face.png", short_audio, tmp_path / "out.mp4"
    if case == "missing_source":
        source = tmp_path / "nope.mp4"
    elif case == "unreadable_video":
        source = tmp_path / "broken.mp4"
        source.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    elif case in ("silent", "zero_length"):
        audio = tmp_path / f"{case}.wav"
        n = 16000 if case == "silent" else 0
        import wave

        with wave.open(str(audio), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes(b"\x00\x00" * n)
    elif case == "not_audio":
        audio = tmp_path / "notes.wav"
        audio.write_text("these are not samples\n" * 50)
    elif case == "missing_audio":
        audio = tmp_path / "missing.wav"
    elif case == "bad_output":
        out = tmp_path / "out.txt"
    with pytest.raises(InputError) as exc:
        pipe.generate(source, audio, out, progress=False)
    assert exc.value.fix, "every input error names its fix"
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_missing_weights_and_unknown_version(tmp_path: Path) -> None:
    with pytest.raises(MuseTalkError, match="musetalk download"):
        MuseTalkPipeline.from_pretrained(tmp_path / "empty", version="v15", device="cpu")
    with pytest.raises(MuseTalkError, match="unknown MuseTalk version"):
        MuseTalkPipeline.from_pretrained(tmp_path, version="v3", device="cpu")


def test_video_writer_round_trip_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "w.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, fps=25) as writer:
            writer.write(np.zeros((64, 64, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_two_processes_preparing_the_same_avatar_both_succeed(tiny_models: Path, tmp_path: Path) -> None:
    """Concurrent clients (CLI + server, two CLI runs) may prepare one avatar name at the same moment."""
    import subprocess
    import sys

    code = ("import sys; from musetalk.stream.pipeline import MuseTalkPipeline; "
            "p = MuseTalkPipeline.from_pretrained(sys.argv[1], device='cpu', dtype='fp32'); "
            "a = p.prepare_avatar(sys.argv[2], name='shared'); print(len(a), a.meta.key)")
    env = {**__import__("os").environ, "MUSETALK_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_models), str(SAMPLES / "face.png")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    avatars = tmp_path / "cache" / "avatars"
    assert [p.name for p in avatars.iterdir()] == ["shared"], "no temporary or moved-aside folder may remain"


def test_temporary_avatars_clean_up_after_themselves(pipe: MuseTalkPipeline) -> None:
    import gc

    avatar = pipe.prepare_avatar(SAMPLES / "face.png")
    folder = avatar.path.parent
    assert avatar.temporary and folder.is_dir()
    with avatar:
        assert len(avatar) == 1
    assert not folder.exists()
    avatar = pipe.prepare_avatar(SAMPLES / "face.png")
    folder = avatar.path.parent
    del avatar
    gc.collect()
    assert not folder.exists(), "a dropped temporary avatar must not leak its folder"


def test_avatar_cache_key_follows_the_vae_weights_and_dtype(pipe: MuseTalkPipeline, tiny_models: Path,
                                                            tmp_path: Path) -> None:
    """Latents depend on the VAE: other weights (or another dtype) must not reuse a cached avatar."""
    from musetalk.stages.tiny import write_tiny_models

    config = pipe.default_config()
    first = pipe.prepare_avatar(SAMPLES / "face.png", config, name="keyed")
    other_models = write_tiny_models(tmp_path / "other", seed=1)
    other = MuseTalkPipeline.from_pretrained(other_models, version="v15", device="cpu", dtype="fp32")
    assert other.prepare_avatar(SAMPLES / "face.png", config, name="keyed").meta.key != first.meta.key
    bf16 = MuseTalkPipeline.from_pretrained(tiny_models, version="v15", device="cpu", dtype="bf16")
    assert bf16.prepare_avatar(SAMPLES / "face.png", config, name="keyed").meta.key != first.meta.key
    again = pipe.prepare_avatar(SAMPLES / "face.png", config, name="keyed")
    assert again.meta.key == first.meta.key


def test_prepare_matches_frame_by_frame_materials(pipe: MuseTalkPipeline, short_clip: Path) -> None:
    """Batched parsing + threaded preparation store what the one-frame-at-a-time path makes (fp32, exact)."""
    from musetalk.stages.blending import prepare_blend_material
    from musetalk.stages.faces.crop import crop_face

    config = pipe.default_config(batch_size=4)
    avatar = pipe.prepare_avatar(short_clip, config)
    blend = config.blend
    for i, frame in enumerate(open_frames(short_clip)):
        assert avatar.has_face[i]
        np.testing.assert_array_equal(avatar.frame(i), frame)
        material = prepare_blend_material(frame, avatar.face_box(i), pipe.parser, blend)
        np.testing.assert_array_equal(avatar.mask(i), material.mask)
        assert tuple(avatar.mask_boxes[i]) == material.crop_box
    crops = np.stack([crop_face(f, avatar.face_box(i)) for i, f in enumerate(open_frames(short_clip))])
    np.testing.assert_allclose(avatar.latents, pipe.vae.unet_input(crops).numpy(), atol=1e-5, rtol=0)


def test_prepare_reader_thread_errors_surface_and_leave_nothing(pipe: MuseTalkPipeline, short_clip: Path,
                                                                tmp_path: Path) -> None:
    """Landmarks run in a reader thread: its failure is raised to the caller as is, no avatar folder and no
    thread are left behind."""
    import threading

    class Failing:
        def __init__(self, inner) -> None:
            self.inner, self.calls, self.threads = inner, 0, set()

        def detect(self, frame: np.ndarray):
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            if self.calls == 6:
                raise RuntimeError("detector crashed")
            return self.inner.detect(frame)

    config = pipe.default_config(batch_size=2)
    failing = Failing(pipe.landmarker(config.crop.landmarks))
    broken = MuseTalkPipeline(pipe.audio_encoder, pipe.vae, pipe.unet, pipe.parser,
                              landmarker_factory=lambda _name: failing)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="detector crashed"):
        broken.prepare_avatar(short_clip, config, name="broken")
    assert failing.threads == {"musetalk-avatar-reader"}
    assert list((tmp_path / "cache" / "avatars").iterdir()) == []  # neither the avatar nor its temporary folder
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("musetalk-avatar")] == []


def test_on_the_cpu_the_heap_is_handed_back_after_every_batch(pipe: MuseTalkPipeline, short_clip: Path,
                                                               short_audio: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's heaps kept each batch's freed activations and fragmented: the run's memory crept up batch after batch
    (full size: +0.27 GB over 75 frames). The stream releases free memory once per model batch, preparation once
    at its end (per chunk it bought nothing: its peak is not the run's)."""
    import musetalk.stream.pipeline as pipeline_module

    released: list[str] = []
    monkeypatch.setattr(pipeline_module, "release_free_memory", lambda: released.append("x") or True)
    config = pipe.default_config(batch_size=4)
    pipe.prepare_avatar(short_clip, config, name="heap")
    assert len(released) == 1
    released.clear()
    result = pipe.generate(short_clip, short_audio, tmp_path / "out.mp4", config, avatar="heap", progress=False)
    assert len(released) == -(-result.num_frames // 4)


def test_on_the_cpu_preparation_keeps_freed_activations_in_the_heap_and_the_stream_does_not(
        pipe: MuseTalkPipeline, short_clip: Path, short_audio: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparation's VAE encodes run where glibc reuses freed large blocks instead of faulting them in on every
    call (``devices.freed_blocks_kept_in_heap``); the stream's decodes do not (kept there, they raised the
    run's peak)."""
    import contextlib

    import musetalk.stream.pipeline as pipeline_module

    inside: list[bool] = []
    seen: dict[str, list[bool]] = {"unet_input": [], "decode": []}

    @contextlib.contextmanager
    def recording_heap():
        inside.append(True)
        try:
            yield True
        finally:
            inside.pop()

    monkeypatch.setattr(pipeline_module, "freed_blocks_kept_in_heap", recording_heap)
    for name, calls in seen.items():
        method = getattr(pipe.vae, name)
        monkeypatch.setattr(pipe.vae, name, lambda *a, _m=method, _c=calls, **k: _c.append(bool(inside)) or _m(*a, **k))
    config = pipe.default_config(batch_size=4)
    pipe.prepare_avatar(short_clip, config, name="heap-kept")
    pipe.generate(short_clip, short_audio, tmp_path / "out.mp4", config, avatar="heap-kept", progress=False)
    assert seen["unet_input"] and all(seen["unet_input"]), seen
    assert seen["decode"] and not any(seen["decode"]), seen
    assert inside == []  # left on the way out


@pytest.mark.parametrize("keep", [False, True])
def test_landmark_models_are_freed_after_preparing_unless_kept(pipe: MuseTalkPipeline, short_clip: Path,
                                                                keep: bool) -> None:
    """Generation never uses the landmark model (dlib's holds 70 MB): by default nothing keeps it alive once an
    avatar is prepared and the next preparation builds it again; a server or batch worker keeps it."""
    import gc
    import weakref

    inner = pipe.landmarker("dlib")

    class Counted:
        def detect(self, frame: np.ndarray):
            return inner.detect(frame)

    built: list[weakref.ref] = []

    def factory(_name: str) -> Counted:
        built.append(weakref.ref(backend := Counted()))
        return backend

    other = MuseTalkPipeline(pipe.audio_encoder, pipe.vae, pipe.unet, pipe.parser, landmarker_factory=factory,
                             keep_landmarkers=keep)
    config = other.default_config(batch_size=2)
    other.prepare_avatar(short_clip, config, name="first")
    gc.collect()
    assert (built[0]() is not None) == keep
    other.prepare_avatar(short_clip, config, name="second")
    assert len(built) == (1 if keep else 2)


def test_after_preparing_the_vae_encoder_pages_are_released(pipe: MuseTalkPipeline, short_clip: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream only decodes: the encoder's mapped weights (fp32 CPU, 0.13 GB full size) leave the resident
    memory once per preparation, and the next preparation encodes as before."""
    calls: list[int] = []
    release = pipe.vae.release_encoder_pages
    monkeypatch.setattr(pipe.vae, "release_encoder_pages", lambda: calls.append(release()) or calls[-1])
    config = pipe.default_config(batch_size=4)
    first = pipe.prepare_avatar(short_clip, config, name="pages-1")
    second = pipe.prepare_avatar(short_clip, config, name="pages-2")
    assert len(calls) == 2
    np.testing.assert_array_equal(np.asarray(first.latents), np.asarray(second.latents))
