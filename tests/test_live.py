"""Live mode: incremental audio windows, LiveSession, and the /avatars + /avatars/{id}/live server over a real
WebSocket (uvicorn on a free loopback port, in a thread of this process, so leaks can be checked directly).

Tiny weights, samples/face.png at 10 fps (1 frame per 1600 samples), ~1.2 s of samples/speech.wav: a session
is ~12 frames. Drift bound (docs/benchmarks.md, "Live"): with tiny weights, 100 ms chunks and 200 ms of
look-ahead every frame stays above LIVE_PSNR_DB of the offline frame.
"""

from __future__ import annotations

import gc
import socket
import json
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from musetalk.errors import InputError
from musetalk.stages.audio import AudioConfig, iter_frame_windows, load_audio
from musetalk.stream.live import LiveConfig
from musetalk.stream.pipeline import MuseTalkPipeline

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FPS = 10
SPEECH = load_audio(SAMPLES / "speech.wav")
CLIP = SPEECH[8000:8000 + int(1.2 * 16000)]  # 12 frames at 10 fps
LIVE_PSNR_DB = 60.0  # documented in docs/benchmarks.md (measured: > 80 dB on tiny weights)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def chunks(wav: np.ndarray, ms: float) -> list[np.ndarray]:
    step = int(ms * 16)
    return [wav[i:i + step] for i in range(0, len(wav), step)]


def live_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("musetalk-live")]


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> MuseTalkPipeline:
    return MuseTalkPipeline.from_pretrained(tiny_models, version="v15", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def avatar(pipe: MuseTalkPipeline):
    config = pipe.default_config(fps=FPS, batch_size=4)
    with pipe.prepare_avatar(SAMPLES / "face.png", config) as prepared:
        yield prepared


@pytest.fixture(scope="module")
def offline(pipe: MuseTalkPipeline, avatar) -> list[np.ndarray]:
    """The frames ``stream`` (what ``generate`` encodes) makes for CLIP."""
    return list(pipe.stream(avatar, CLIP, pipe.default_config(fps=FPS, batch_size=4)))


# -- incremental windows -------------------------------------------------------------------------------------------
def test_windows_whole_audio_and_exact_mode_equal_offline(pipe: MuseTalkPipeline) -> None:
    """Two 30 s segments (windows straddle the boundary): whole audio at once, and 1 s chunks in exact mode."""
    from musetalk.stages.audio_live import IncrementalWindows

    wav = np.resize(SPEECH, 31 * 16000)
    config = AudioConfig(fps=25)
    expected = np.stack(list(iter_frame_windows(pipe.audio_encoder, wav, config)))
    whole = IncrementalWindows(pipe.audio_encoder, config, lookahead_s=0.2)
    whole.append(wav)
    whole.close()
    assert np.array_equal(whole.windows(0, len(expected)), expected)

    exact = IncrementalWindows(pipe.audio_encoder, config, lookahead_s=None)
    got = []
    for piece in chunks(wav, 1000):
        exact.append(piece)
        ready = exact.ready_count()
        if ready > len(got):
            got.extend(exact.windows(len(got), ready - len(got)))
            exact.release(len(got))
        if exact.received < 30 * 16000:
            assert ready == 0, "exact mode waits for the segment"
    exact.close()
    got.extend(exact.windows(len(got), exact.ready_count() - len(got)))
    assert np.array_equal(np.stack(got), expected)
    assert exact.buffered_segments <= 2


def test_windows_wait_for_their_lookahead(pipe: MuseTalkPipeline) -> None:
    from musetalk.stages.audio_live import IncrementalWindows

    windows = IncrementalWindows(pipe.audio_encoder, AudioConfig(fps=25), lookahead_s=0.1)
    # frame i's window ends at i/25 + 0.12 s; ready once 0.1 s more is in
    windows.append(np.zeros(int(0.22 * 16000) - 1, np.float32))
    assert windows.ready_count() == 0
    windows.append(np.zeros(1, np.float32))
    assert windows.ready_count() == 1
    windows.append(np.zeros(int(0.04 * 16000), np.float32))
    assert windows.ready_count() == 2
    with pytest.raises(ValueError):
        windows.windows(0, 3)


# -- the session ---------------------------------------------------------------------------------------------------
def test_whole_audio_at_once_gives_the_offline_frames(pipe, avatar, offline) -> None:
    session = pipe.live(avatar, pipe.default_config(fps=FPS, batch_size=4), LiveConfig(lookahead_s=0.2))
    frames = list(session.stream([CLIP]))
    assert [f.index for f in frames] == list(range(len(offline)))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / FPS for i in range(len(offline))])
    assert all(np.array_equal(f.image, o) for f, o in zip(frames, offline))
    summary = session.summary()
    assert summary.frames == len(offline) and summary.audio_s == pytest.approx(len(CLIP) / 16000)
    assert summary.first_frame_latency_s is not None and summary.latency_p95_s >= summary.latency_p50_s > 0
    assert not session.running


def test_chunked_frames_stay_within_the_documented_drift(pipe, avatar, offline) -> None:
    from musetalk.profiling import Profiler

    profiler = Profiler(device="cpu")
    session = pipe.live(avatar, pipe.default_config(fps=FPS, batch_size=4), LiveConfig(lookahead_s=0.2),
                        profiler=profiler)
    frames = list(session.stream(chunks(CLIP, 100)))
    assert len(frames) == len(offline)
    assert min(psnr(f.image, o) for f, o in zip(frames, offline)) > LIVE_PSNR_DB
    report = profiler.report()
    assert report.latency["frames"] == len(frames) and report.latency["p50_s"] > 0
    assert "latency (audio in -> frame out)" in report.markdown()


def test_dashboard_shows_live_latency(pipe, avatar) -> None:
    pytest.importorskip("ipywidgets")
    from musetalk.frontends.notebook.widgets import LiveDashboard

    dash = LiveDashboard(every=2, min_interval=0.0, title="live")
    with dash:
        session = pipe.live(avatar, pipe.default_config(fps=FPS, batch_size=4), profiler=dash)
        frames = list(session.stream(chunks(CLIP[:8000], 100)))
    status = dash.status(dash.report())
    assert dash.report().latency["frames"] == len(frames) == 5
    assert "latency first" in status and "p95" in status and " late" in status


def test_late_frames_are_flagged_and_counted(pipe, avatar) -> None:
    session = pipe.live(avatar, pipe.default_config(fps=FPS, batch_size=4), LiveConfig(late_after_s=1e-6))
    frames = list(session.stream(chunks(CLIP[:8000], 200)))
    assert frames and all(f.late for f in frames)
    assert session.summary().late_frames == len(frames)


def test_slow_consumer_blocks_feed_instead_of_growing(pipe, avatar) -> None:
    """Nobody iterates: the batch queue fills, the worker stops, the audio backlog fills, feed() times out."""
    session = pipe.live(avatar, pipe.default_config(fps=FPS, batch_size=2),
                        LiveConfig(lookahead_s=0.0, max_backlog_s=0.3, frame_buffer=1))
    with session:
        with pytest.raises(TimeoutError):
            for piece in chunks(np.resize(SPEECH, 60 * 16000), 100):
                session.feed(piece, timeout=3)
        assert session._queued <= 0.3 * 16000 + 1600
        assert session._batches.qsize() <= 1
    assert not session.running


def test_bad_chunks_and_misuse_are_clear(pipe, avatar) -> None:
    with pipe.live(avatar, pipe.default_config(fps=FPS)) as session:
        with pytest.raises(InputError, match="mono"):
            session.feed(np.zeros((100, 2), np.float32))
        with pytest.raises(InputError, match="NaN"):
            session.feed(np.full(100, np.nan, np.float32))
        with pytest.raises(InputError, match="int16"):
            session.feed(np.zeros(100, np.int32))
        session.close()
        with pytest.raises(InputError, match="after close"):
            session.feed(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="lookahead"):
        pipe.live(avatar, None, LiveConfig(lookahead_s=-1))


def test_abort_mid_stream_ends_the_worker(pipe, avatar) -> None:
    session = pipe.live(avatar, pipe.default_config(fps=FPS, batch_size=2), LiveConfig(lookahead_s=0.0))
    iterator = session.stream(chunks(np.resize(SPEECH, 20 * 16000), 100))
    first = next(iterator)
    assert first.index == 0
    iterator.close()  # the consumer leaves
    assert not session.running and not live_threads()


# -- the server ----------------------------------------------------------------------------------------------------
websockets = pytest.importorskip("websockets")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(pipe: MuseTalkPipeline, tmp_path_factory: pytest.TempPathFactory):
    import uvicorn

    from musetalk.frontends.server import ServerSettings, create_app
    from musetalk.frontends.server.cli import bind_socket

    work = tmp_path_factory.mktemp("live-server")
    app = create_app(pipe, ServerSettings(work_dir=work, max_audio_seconds=60, live_idle_timeout_s=5,
                                          live_start_timeout_s=5))
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}", "app": app, "work": work}
    uv.should_exit = True
    thread.join(timeout=60)
    sock.close()


@pytest.fixture(scope="module")
def avatar_id(server) -> str:
    face = (SAMPLES / "face.png").read_bytes()
    r = httpx.post(server["url"] + "/avatars", files={"source": ("face.png", face)},
                   data={"fps": str(FPS), "batch_size": "4"}, timeout=120)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["fps"] == FPS and body["frames"] == 1 and r.headers["location"] == f"/avatars/{body['id']}"
    return body["id"]


def pcm16(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


def start_message(**options) -> str:
    return json.dumps({"type": "start", "sample_rate": 16000, "format": "pcm_s16le", "channels": 1,
                       "options": options})


def run_session(server, avatar_id: str, pieces: list[bytes], **options) -> tuple[dict, list, dict]:
    """One session over a real WebSocket: (ready, [(header, image)], summary)."""
    import cv2
    from websockets.sync.client import connect

    from musetalk.frontends.live_client import parse_frame

    with connect(f"{server['ws']}/avatars/{avatar_id}/live", max_size=2**24) as ws:
        ws.send(start_message(**options))
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready", ready
        for piece in pieces:
            ws.send(piece)
        ws.send(json.dumps({"type": "end"}))
        frames = []
        while True:
            message = ws.recv(timeout=120)
            if isinstance(message, str):
                summary = json.loads(message)
                break
            header, data = parse_frame(message)
            frames.append((header, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)))
    return ready, frames, summary


def expect_error(server, path: str, first: str | None = None, then: bytes | None = None) -> tuple[dict, int]:
    """Connect, send ``first`` (and ``then``): the server's error message and its close code."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(server["ws"] + path) as ws:
        if first is not None:
            ws.send(first)
        if then is not None:
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
            ws.send(then)
        message = ws.recv(timeout=30)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        return json.loads(message), ws.close_code


def test_avatars_are_listed_and_described(server, avatar_id: str) -> None:
    listing = httpx.get(server["url"] + "/avatars").json()
    assert [a["id"] for a in listing["avatars"]] == [avatar_id]
    assert listing["live_sessions"] == 0 and listing["max_live_sessions"] == 1
    one = httpx.get(f"{server['url']}/avatars/{avatar_id}").json()
    assert one["live_url"] == f"/avatars/{avatar_id}/live" and one["version"] == "v15"
    assert httpx.get(f"{server['url']}/avatars/{'0' * 32}").status_code == 404
    assert httpx.post(server["url"] + "/avatars", files={"source": ("x.png", b"#!/bin/sh")}).status_code == 415


def test_whole_audio_over_the_socket_equals_offline(server, avatar_id: str, pipe) -> None:
    served = server["app"].state.live.avatars.get(avatar_id).avatar
    ready, frames, summary = run_session(server, avatar_id, [pcm16(CLIP)], image_format="png")
    assert ready["fps"] == FPS and ready["batch_size"] == 4
    quantized = np.frombuffer(pcm16(CLIP), "<i2").astype(np.float32) / 32768  # what the server receives
    offline = list(pipe.stream(served, quantized, pipe.default_config(fps=FPS, batch_size=4)))
    assert [h["index"] for h, _ in frames] == list(range(len(offline)))
    assert all(np.array_equal(image, o) for (_, image), o in zip(frames, offline))
    assert summary["type"] == "summary" and summary["frames"] == len(offline)
    assert summary["latency_ms"]["p95"] >= summary["latency_ms"]["p50"] > 0


def test_chunked_over_the_socket_is_within_drift(server, avatar_id: str, pipe) -> None:
    served = server["app"].state.live.avatars.get(avatar_id).avatar
    quantized = np.frombuffer(pcm16(CLIP), "<i2").astype(np.float32) / 32768
    offline = list(pipe.stream(served, quantized, pipe.default_config(fps=FPS, batch_size=4)))
    pieces = [pcm16(p) for p in chunks(CLIP, 100)]
    _, frames, summary = run_session(server, avatar_id, pieces, image_format="png", lookahead_ms=200, batch_size=2)
    assert len(frames) == len(offline) == summary["frames"]
    assert min(psnr(image, o) for (_, image), o in zip(frames, offline)) > LIVE_PSNR_DB
    assert all(h["timestamp"] == pytest.approx(h["index"] / FPS) for h, _ in frames)


def test_cli_live_writes_the_mp4(server, avatar_id: str, tmp_path: Path, capsys) -> None:
    from musetalk.frontends.cli import main
    from musetalk.stream.video import probe
    from tests.conftest import write_wav

    audio = write_wav(tmp_path / "speech.wav", CLIP)
    out = tmp_path / "live.mp4"
    code = main(["live", "--server", server["url"], "--avatar", avatar_id, "--audio", str(audio), "--output",
                 str(out), "--chunk-ms", "200"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    info = probe(out)
    assert info.num_frames == len(CLIP) * FPS // 16000 and info.has_audio
    assert "server latency" in printed and "p95" in printed and "client latency" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.mp4", "speech.wav"]  # no temporary file left


@pytest.mark.parametrize("first, then, code, close", [
    (json.dumps({"type": "start", "sample_rate": 44100, "format": "pcm_s16le"}), None, "unsupported_sample_rate",
     4400),
    ("not json", None, "bad_start", 4400),
    (json.dumps({"type": "start", "sample_rate": 16000, "fps": 25}), None, "fps_mismatch", 4400),
    (json.dumps({"type": "start", "sample_rate": 16000, "options": {"lookahead_ms": -5}}), None, "bad_start", 4400),
    (start_message(), b"\x01\x02\x03", "bad_chunk", 4400),
    (json.dumps({"type": "start", "sample_rate": 16000, "format": "pcm_f32le"}),
     np.full(8, np.nan, "<f4").tobytes(), "bad_chunk", 4400),
])
def test_protocol_errors_are_clear(server, avatar_id: str, first: str, then: bytes | None, code: str,
                                   close: int) -> None:
    message, close_code = expect_error(server, f"/avatars/{avatar_id}/live", first, then)
    assert message["type"] == "error" and message["error"] == code and message["fix"]
    assert close_code == close
    assert server["app"].state.live.active() == 0


def test_unknown_avatar_is_refused(server) -> None:
    message, close_code = expect_error(server, f"/avatars/{'f' * 32}/live")
    assert message["error"] == "unknown_avatar" and close_code == 4404


def test_second_session_is_busy_and_disconnect_leaks_nothing(server, avatar_id: str) -> None:
    from websockets.sync.client import connect

    live = server["app"].state.live
    with connect(f"{server['ws']}/avatars/{avatar_id}/live") as first:
        first.send(start_message(lookahead_ms=0, batch_size=1))
        assert json.loads(first.recv(timeout=30))["type"] == "ready"
        first.send(pcm16(np.resize(SPEECH, 4 * 16000)))  # plenty of work
        message, close_code = expect_error(server, f"/avatars/{avatar_id}/live")
        assert message["error"] == "busy" and close_code == 4429
        assert httpx.delete(f"{server['url']}/avatars/{avatar_id}").status_code == 409  # in use
        assert isinstance(first.recv(timeout=60), bytes)  # a frame came
        session_ref = weakref.ref(next(s for s in live._sessions.values() if s is not None))
    # the client vanished mid-stream: the session ends, its threads go, the slot frees
    deadline = time.monotonic() + 60
    while live.active() or live_threads():
        assert time.monotonic() < deadline, f"live session not cleaned up: {live_threads()}"
        time.sleep(0.1)
    gc.collect()
    assert session_ref() is None, "the session object is still referenced"
    assert live.avatars.get(avatar_id).in_use == 0
    ready, frames, _ = run_session(server, avatar_id, [pcm16(CLIP[:8000])])  # the slot is free again
    assert len(frames) == 5


def test_delete_avatar_removes_its_folder(server) -> None:
    face = (SAMPLES / "face.png").read_bytes()
    body = httpx.post(server["url"] + "/avatars", files={"source": ("face.png", face)}, data={"fps": "10"},
                      timeout=120).json()
    folder = server["app"].state.live.avatars.get(body["id"]).avatar.path
    assert folder.is_dir()
    assert httpx.delete(f"{server['url']}/avatars/{body['id']}").json()["deleted"] is True
    assert not folder.exists()
    assert httpx.delete(f"{server['url']}/avatars/{body['id']}").status_code == 404
    uploads = [p for root in server["work"].glob("musetalk-server-*") for p in root.glob("avatar-upload-*")]
    assert uploads == []


def test_cli_live_errors_are_one_line_with_a_fix(server, tmp_path: Path, capsys) -> None:
    from musetalk.frontends.cli import main
    from tests.conftest import write_wav

    audio = write_wav(tmp_path / "speech.wav", CLIP[:4000])
    assert main(["live", "--server", server["url"], "--avatar", "0" * 32, "--audio", str(audio)]) == 2
    err = capsys.readouterr().err
    assert "no avatar" in err and "fix: POST /avatars" in err and "Traceback" not in err
    with socket.socket() as probe_sock:  # a port nobody listens on
        probe_sock.bind(("127.0.0.1", 0))
        port = probe_sock.getsockname()[1]
    assert main(["live", "--server", f"http://127.0.0.1:{port}", "--avatar", "x", "--audio", str(audio)]) == 2
    assert "cannot open a live session" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


def test_client_flow_control_leaves_room_for_a_batch() -> None:
    """The client stays a bounded amount ahead of the frames, but never so little that the server cannot cut the
    next batch (that would deadlock: 1 fps and batch 16 need 16 s of audio before the first frame)."""
    from musetalk.frontends.live_client import LiveClient

    client = LiveClient("http://127.0.0.1:1", "a" * 32, lookahead_ms=200)
    client.result.ready = {"fps": 1, "batch_size": 16}
    assert 16 + 0.2 + 0.2 < client._ahead_limit_s() < 16 + 0.4 + 5
    exact = LiveClient("http://127.0.0.1:1", "a" * 32, lookahead_ms="exact")
    exact.result.ready = {"fps": 25, "batch_size": 8}
    assert 30 < exact._ahead_limit_s() < 40
