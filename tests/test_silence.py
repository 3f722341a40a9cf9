"""Silence handling: the VAD on real speech with an inserted pause, the per-frame plan and its cross-fades, the
closed-mouth frame, the front-end fields, and the stream: off == today's frames, silent frames skip the models."""

from __future__ import annotations

import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk.config import preset, user_settings, with_overrides
from musetalk.errors import InputError, WeightsError
from musetalk.stages import silence
from musetalk.stages.audio import load_audio
from musetalk.stream.pipeline import MuseTalkPipeline, pingpong

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FPS = 25.0
SR = 16_000


@pytest.fixture(scope="module")
def vad() -> silence.SileroVAD:
    return silence.SileroVAD.from_pretrained()


@pytest.fixture(scope="module")
def paused_speech() -> np.ndarray:
    """0.8 s of the sample speech (with its own 0.16 s gap between words), 1 s of silence, 0.6 s more speech."""
    wav = load_audio(SAMPLES / "speech.wav")
    return np.concatenate([wav[: int(0.8 * SR)], np.zeros(SR, np.float32), wav[int(0.6 * SR): int(1.2 * SR)]])


# -- the detector ------------------------------------------------------------------------------------------------
def test_vad_finds_the_inserted_second_and_keeps_short_gaps_as_speech(vad, paused_speech) -> None:
    probs = silence.speech_probabilities(vad, paused_speech)
    assert probs.shape == (int(np.ceil(len(paused_speech) / silence.CHUNK)),)
    frame_probs = silence.frame_probabilities(probs, 60, FPS)
    silent = silence.silent_frames(frame_probs, FPS, threshold=0.5, min_silence_s=0.3)
    # the inserted second covers frames 20..44; the VAD may trail a frame or two into it, never more
    assert silent[23:43].all()
    assert not silent[:19].any(), "the 0.16 s gap between words (frames 11-14) is shorter than the minimum"
    assert not silent[47:].any()
    assert len(silence.silent_runs(silent)) == 1


def test_minimum_silence_decides_which_pauses_count(vad, paused_speech) -> None:
    frame_probs = silence.frame_probabilities(silence.speech_probabilities(vad, paused_speech), 60, FPS)
    assert not silence.silent_frames(frame_probs, FPS, min_silence_s=1.5).any()
    every_gap = silence.silent_frames(frame_probs, FPS, min_silence_s=0.0, pad_s=0.0)
    default = silence.silent_frames(frame_probs, FPS, min_silence_s=0.3)
    assert (every_gap >= default).all() and every_gap[12:14].any()  # the gap between words shows up unfiltered


def test_our_silero_network_agrees_with_the_package_torchscript_model(vad, paused_speech) -> None:
    """The safetensors weights in our torch module make the same speech / silence calls as silero's own model."""
    jit = torch.jit.load(str(silence.bundled_weights().parent / "silero_vad.jit"), map_location="cpu").eval()
    x = torch.nn.functional.pad(torch.from_numpy(paused_speech), (0, (-len(paused_speech)) % 512))
    with torch.no_grad():
        theirs = np.array([float(jit(x[i:i + 512][None], 16000)) for i in range(0, len(x), 512)])
    ours = silence.speech_probabilities(vad, paused_speech)
    assert np.mean((ours >= 0.5) == (theirs >= 0.5)) >= 0.95
    assert np.corrcoef(ours, theirs)[0, 1] > 0.9


def test_vad_loads_offline_without_importing_silero_or_touching_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the VAD tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    threads = torch.get_num_threads()
    model = silence.SileroVAD.from_pretrained()
    assert silence.speech_probabilities(model, np.zeros(SR, np.float32)).max() < 0.5  # digital silence
    assert torch.get_num_threads() == threads  # silero_vad's import would have set 1 thread for the process
    assert "silero_vad" not in sys.modules
    assert sum(p.numel() for p in model.parameters()) < 400_000


def test_missing_package_is_a_weights_error_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(silence.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError) as err:
        silence.SileroVAD.from_pretrained()
    assert "pip install silero-vad" in err.value.fix and "--silence off" in err.value.fix


def test_vad_rejects_stereo() -> None:
    with pytest.raises(InputError):
        silence.speech_probabilities(silence.SileroVAD(), np.zeros((2, 100), np.float32))


# -- the plan (pure) -------------------------------------------------------------------------------------------------
def test_frame_probabilities_take_the_loudest_overlapping_chunk() -> None:
    chunks = np.array([0.1, 0.9, 0.2, 0.3], np.float32)  # 32 ms each; a 25 fps frame spans 40 ms
    probs = silence.frame_probabilities(chunks, 4, FPS)
    assert probs.tolist() == pytest.approx([0.9, 0.9, 0.3, 0.3])  # frame 0: chunks 0-1, 1: 1-2, 2: 2-3, 3: 3
    assert silence.frame_probabilities(chunks, 6, FPS)[5] == 0.0  # past the audio: silence


def test_cross_fade_weights_at_the_edges_of_a_pause() -> None:
    silent = np.zeros(20, bool)
    silent[5:15] = True
    w = silence.generated_weights(silent, fade_frames=3)
    assert w[:5].tolist() == [1.0] * 5 and w[15:].tolist() == [1.0] * 5
    assert w[5:15].tolist() == pytest.approx([0.75, 0.5, 0.25, 0, 0, 0, 0, 0.25, 0.5, 0.75])
    assert (silence.generated_weights(silent, 0)[5:15] == 0).all()  # no fade: a hard cut


def test_short_pause_gets_the_lower_of_both_ramps_and_audio_edges_do_not_fade() -> None:
    silent = np.array([0, 0, 1, 1, 1, 0, 0], bool)
    assert silence.generated_weights(silent, 3).tolist() == pytest.approx([1, 1, 0.75, 0.5, 0.75, 1, 1])
    edges = np.array([1, 1, 1, 0, 0, 1, 1], bool)  # silent at the start and at the end of the audio
    # only the side that meets speech fades
    assert silence.generated_weights(edges, 3).tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 0.75, 0.5])
    long_edge = np.array([1] * 6 + [0], bool)
    assert silence.generated_weights(long_edge, 3).tolist() == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1])


def test_plan_off_generates_everything_and_modes_keep_the_reference() -> None:
    chunks = np.concatenate([np.ones(20), np.zeros(40), np.ones(20)]).astype(np.float32)
    pauses = preset().pauses
    off = silence.plan_silence(chunks, 100, FPS, with_overrides(preset(), silence="off").pauses, reference_frame=3)
    assert off.generated.all() and off.skipped == 0 and off.reference_frame is None
    source = silence.plan_silence(chunks, 100, FPS, pauses, reference_frame=3)
    assert source.reference_frame is None and source.skipped > 20 and source.silent.sum() > source.skipped
    closed = silence.plan_silence(chunks, 100, FPS, with_overrides(preset(), silence="closed").pauses, 3)
    assert closed.reference_frame == 3 and np.array_equal(closed.weights, source.weights)


def test_mix_is_exact_at_both_ends() -> None:
    a = np.full((2, 2, 3), 200, np.uint8)
    b = np.full((2, 2, 3), 100, np.uint8)
    assert silence.mix(a, b, 1.0) is a and silence.mix(a, b, 0.0) is b
    assert (silence.mix(a, b, 0.25) == 125).all()


def test_closed_mouth_frame_is_the_smallest_opening_among_faces() -> None:
    base = np.zeros((68, 2))
    base[36], base[45] = (0, 0), (100, 0)  # eye corners 100 px apart

    def face(gap: float) -> np.ndarray:
        lm = base.copy()
        for top, bottom in silence.INNER_LIP_PAIRS:
            lm[top], lm[bottom] = (50, 100), (50, 100 + gap)
        return lm

    landmarks = np.stack([face(20), face(3), face(0), face(8)])
    openings = silence.mouth_openings(landmarks)
    assert openings.tolist() == pytest.approx([0.2, 0.03, 0.0, 0.08])
    assert silence.closed_mouth_frame(openings, np.array([True, True, True, True])) == 2
    assert silence.closed_mouth_frame(openings, np.array([True, True, False, True])) == 1  # no face: never chosen
    with pytest.raises(InputError):
        silence.closed_mouth_frame(openings, np.zeros(4, bool))


# -- settings and front ends -------------------------------------------------------------------------------------
def test_config_fields_validate_and_reach_every_front_end() -> None:
    config = with_overrides(preset(), silence="closed", silence_threshold=0.4, silence_min_s=0.5, silence_frame=2)
    assert (config.pauses.silence, config.pauses.silence_threshold, config.pauses.silence_frame) == ("closed", 0.4, 2)
    for bad in ({"silence": "mute"}, {"silence_threshold": 1.0}, {"silence_min_s": -1.0}, {"silence_fade": 99}):
        with pytest.raises(InputError):
            with_overrides(preset(), **bad)
    names = {s.name for s in user_settings()}
    assert {"silence", "silence_threshold", "silence_min_s", "silence_frame", "silence_fade"} <= names

    from musetalk.frontends.cli import _config, build_parser

    args = build_parser().parse_args(["generate", "--source", "a.png", "--audio", "a.wav", "--output", "o.mp4",
                                      "--silence", "off", "--silence-min-s", "0.6"])
    assert (_config(args).pauses.silence, _config(args).pauses.silence_min_s) == ("off", 0.6)
    args = build_parser().parse_args(["generate", "--source", "a.png", "--audio", "a.wav", "--output", "o.mp4"])
    assert _config(args).pauses == preset().pauses  # no flag: the config default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--source", "a", "--audio", "a", "--output", "o.mp4", "--silence", "x"])


def test_batch_rows_take_silence_columns(tmp_path: Path) -> None:
    from musetalk.frontends.batch.jobs import load_jobs

    (tmp_path / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "a.png").write_bytes(b"png")
    rows = [{"source": "a.png", "audio": "a.wav", "silence": "closed", "silence_min_s": "0.5"},
            {"source": "a.png", "audio": "a.wav", "silence": "mute"}]
    jobs, errors, total = load_jobs(rows, base_dir=tmp_path)
    assert total == 2 and len(jobs) == 1 and jobs[0].config.pauses.silence == "closed"
    assert jobs[0].config.pauses.silence_min_s == 0.5
    assert [(e.row, e.column) for e in errors] == [(2, "silence")]


def test_server_form_takes_silence() -> None:
    from musetalk.frontends.server.jobs import GenerationService
    from musetalk.frontends.server.settings import ServerSettings

    class _Pipe:
        version = "v15"

        def stream(self) -> None: ...

    service = GenerationService(_Pipe(), ServerSettings())
    assert service.make_config(None, silence="closed").pauses.silence == "closed"
    assert service.make_config(None, silence=None).pauses.silence == preset().pauses.silence
    with pytest.raises(InputError):
        service.make_config(None, silence="loud")


# -- the stream on tiny weights ---------------------------------------------------------------------------------
class CountingUNet:
    """The real tiny UNet, counting the frames it predicts."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.frames = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, latents, windows):
        self.frames += len(latents)
        return self.inner(latents, windows)


class StageCounter:
    """A profiler stand-in that counts stage calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str, sync: bool | None = None):
        self.calls[name] = self.calls.get(name, 0) + 1
        yield

    def frame_done(self) -> None: ...


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> MuseTalkPipeline:
    loaded = MuseTalkPipeline.from_pretrained(tiny_models, version="v15", device="cpu", dtype="fp32")
    return MuseTalkPipeline(loaded.audio_encoder, loaded.vae, CountingUNet(loaded.unet), loaded.parser,
                            version="v15", models_dir=tiny_models)


@pytest.fixture(scope="module")
def avatar(pipe: MuseTalkPipeline, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSETALK_CACHE", str(tmp_path_factory.mktemp("cache")))
        prepared = pipe.prepare_avatar(SAMPLES / "face.png", pipe.default_config())
    yield prepared
    prepared.close()


def todays_frames(pipe: MuseTalkPipeline, avatar, wav: np.ndarray, batch_size: int, batches: int = 1
                  ) -> list[np.ndarray]:
    """The first ``batches`` batches of the stream as it was before silence handling, recomposed from the stages."""
    from musetalk.stages import audio as audio_stage
    from musetalk.stages.blending import BlendMaterial, blend_with_material

    fps = avatar.meta.fps
    n = min(audio_stage.num_video_frames(len(wav), fps), batches * batch_size)
    windows = audio_stage.iter_frame_windows(pipe.audio_encoder, wav, audio_stage.AudioConfig(fps=fps))
    out = []
    for start in range(0, n, batch_size):
        sources = [pingpong(i, len(avatar)) for i in range(start, min(start + batch_size, n))]
        batch_windows = np.stack([next(windows) for _ in sources])
        rows = [k for k, s in enumerate(sources) if avatar.has_face[s]]
        latents = torch.from_numpy(np.stack([avatar.latents[sources[k]] for k in rows]))
        faces = pipe.vae.decode(pipe.unet.inner(latents, torch.from_numpy(batch_windows[rows])))
        for k, s in enumerate(sources):
            x1, y1, x2, y2 = (int(v) for v in avatar.mask_boxes[s])
            material = BlendMaterial(mask=avatar.mask(s), crop_box=(x1, y1, x2, y2))
            out.append(blend_with_material(avatar.frame(s), faces[rows.index(k)], avatar.face_box(s), material))
    return out


@pytest.fixture(scope="module")
def short_pause() -> np.ndarray:
    """A cheap stream input: 0.4 s of speech, 0.8 s of silence, 0.4 s of speech (40 frames at 25 fps)."""
    wav = load_audio(SAMPLES / "speech.wav")
    return np.concatenate([wav[: int(0.4 * SR)], np.zeros(int(0.8 * SR), np.float32), wav[int(0.6 * SR): SR]])


@pytest.mark.slow
def test_stream_silence_modes(pipe: MuseTalkPipeline, avatar, short_pause: np.ndarray) -> None:
    """off == today's frames bit for bit; source shows the source itself in the pause, cross-fades at its edges and
    skips the UNet there; closed pastes the closed-mouth frame."""
    config = pipe.default_config()
    source_frame = avatar.frame(0)
    # 1. off: today's frames (the first batch recomposed from the stages), every frame through the UNet
    pipe.unet.frames = 0
    off = list(pipe.stream(avatar, short_pause, with_overrides(config, silence="off")))
    assert len(off) == 40 and pipe.unet.frames == 40
    for got, expected in zip(off, todays_frames(pipe, avatar, short_pause, 8)):
        np.testing.assert_array_equal(got, expected)
    # 2. source (the default)
    assert config.pauses.silence == "source"
    pipe.unet.frames = 0
    counter = StageCounter()
    shown = list(pipe.stream(avatar, short_pause, config, profiler=counter))
    plan = silence.plan_silence(silence.speech_probabilities(pipe.vad(), short_pause), 40, FPS, config.pauses)
    assert plan.skipped >= 8 and pipe.unet.frames == 40 - plan.skipped
    assert counter.calls["vad"] == 1 and counter.calls["silence"] == int((plan.weights < 1).sum())
    assert 0 < plan.weights[plan.silent].max() < 1  # the pause fades in and out
    for i, (frame, weight) in enumerate(zip(shown, plan.weights)):
        if weight == 1:
            np.testing.assert_array_equal(frame, off[i])
        elif weight == 0:
            np.testing.assert_array_equal(frame, source_frame)
        else:
            np.testing.assert_array_equal(frame, silence.mix(off[i], source_frame, float(weight)))
    # 3. closed: the closed-mouth frame's face box pasted into the frame through its own mask
    from musetalk.stages.blending import BlendMaterial, blend_with_material

    x1, y1, x2, y2 = avatar.face_box(0)
    m = tuple(int(v) for v in avatar.mask_boxes[0])
    pasted = blend_with_material(source_frame, source_frame[y1:y2, x1:x2], (x1, y1, x2, y2),
                                 BlendMaterial(mask=avatar.mask(0), crop_box=m))
    deep = int(np.flatnonzero(plan.weights == 0)[0])
    for i, frame in enumerate(pipe.stream(avatar, short_pause, with_overrides(config, silence="closed"))):
        if i == 0:
            np.testing.assert_array_equal(frame, off[0])
        if i == deep:
            np.testing.assert_array_equal(frame, pasted)
            break


def test_picked_closed_frame_must_have_a_face(pipe: MuseTalkPipeline, avatar, short_pause: np.ndarray) -> None:
    config = with_overrides(pipe.default_config(), silence="closed", silence_frame=5)
    with pytest.raises(InputError, match="silence_frame 5"):
        next(iter(pipe.stream(avatar, short_pause, config)))


# -- the notebook widget (headless) -------------------------------------------------------------------------------
def test_silence_tuner_redraws_the_vad_timeline(vad, paused_speech) -> None:
    pytest.importorskip("ipywidgets", reason="the notebooks extra is not installed")
    from musetalk.frontends.notebook.widgets import SilenceTuner

    tuner = SilenceTuner(paused_speech, FPS, vad=vad)
    assert tuner.n_frames == 60 and tuner.renders == 0
    assert tuner.plan().silent[25:40].all() and "skip the UNet" in tuner.describe()
    _ = tuner.widget
    ui = tuner._ui
    first = bytes(ui["image"].value)
    assert first.startswith(b"\x89PNG") and tuner.renders == 1
    ui["min_silence"].value = 1.5  # what the browser does: longer than the inserted second, so nothing is silent
    assert tuner.min_silence_s == 1.5 and tuner.renders == 2 and bytes(ui["image"].value) != first
    assert not tuner.plan().silent.any() and "0/60 frames silent" in ui["status"].value
    tuner.set(threshold=0.3)  # from Python: the slider follows, one redraw
    assert ui["threshold"].value == 0.3 and tuner.renders == 3
    assert tuner.config_with_choice().pauses.silence_threshold == 0.3
    assert tuner.config_with_choice().pauses.silence_min_s == 1.5
    with pytest.raises(InputError):
        tuner.set(threshold=1.5)


def test_long_audio_in_blocks_equals_one_pass(vad, paused_speech, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks bound the memory on long audio; the LSTM state carries over, so the result does not change."""
    whole = silence.speech_probabilities(vad, paused_speech)
    monkeypatch.setattr(silence, "BLOCK_CHUNKS", 7)
    np.testing.assert_allclose(silence.speech_probabilities(vad, paused_speech), whole, atol=1e-5)
