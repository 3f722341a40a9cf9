"""The HTTP API, end to end: a real ``musetalk serve`` process on a free loopback port, with tiny weights.

One server (queue of 2, 2 MiB upload limit, a token) serves the whole module; the tests run in file order and
the last one shuts it down. Requests use samples/face.png and ~1 s cuts of samples/speech.wav at 10 fps, so each
job is a few seconds on a 2-core CPU; the avatar cache (shared with the CLI) is reused after the first job.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
TOKEN = "test-token-4f1c"
FPS = 10  # output fps for the image source: 1 frame per 1600 audio samples
SAMPLES_PER_FRAME = 16_000 // FPS
AVATAR = "server-test-face"  # one cached avatar for the async, cancel and concurrency tests
MAX_UPLOAD_MB = 2
START_TIMEOUT_S = 120


# -- helpers ------------------------------------------------------------------------------------------------------
def wav_bytes(num_samples: int, offset_s: float = 0.5, silent: bool = False) -> bytes:
    """``num_samples`` of samples/speech.wav (16 kHz mono PCM16) from ``offset_s``, as a WAV file."""
    with wave.open(str(SAMPLES / "speech.wav")) as src:
        assert src.getframerate() == 16_000 and src.getnchannels() == 1
        src.setpos(int(offset_s * 16_000))
        frames = src.readframes(num_samples)
        params = src.getparams()
    assert len(frames) == 2 * num_samples, "speech.wav is too short for this cut"
    out = io.BytesIO()
    with wave.open(out, "wb") as dst:
        dst.setparams(params)
        dst.writeframes(b"\x00" * len(frames) if silent else frames)
    return out.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def count_frames(mp4: bytes, tmp_path: Path) -> int:
    """Decoded video frames of an mp4 (PyAV)."""
    import av

    path = tmp_path / f"count-{time.monotonic_ns()}.mp4"
    path.write_bytes(mp4)
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def files(source: bytes, audio: bytes, source_name: str = "face.png", audio_name: str = "speech.wav") -> dict:
    return {"source": (source_name, source, "application/octet-stream"),
            "audio": (audio_name, audio, "application/octet-stream")}


FACE = (SAMPLES / "face.png").read_bytes()


@pytest.fixture(scope="module")
def server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """A ``musetalk serve`` subprocess; yields a dict with url, process, work dir, cache dir and log path."""
    root = tmp_path_factory.mktemp("server")
    # the tiny folder minus v1's UNet, so that version=v1 shows the "weights unavailable" answer
    models = root / "models"
    for file in tiny_models.rglob("*"):
        if file.is_file() and file.relative_to(tiny_models).as_posix() != "musetalk/pytorch_model.bin":
            (models / file.relative_to(tiny_models)).parent.mkdir(parents=True, exist_ok=True)
            (models / file.relative_to(tiny_models)).symlink_to(file)
    work, cache, log = root / "work", root / "cache", root / "server.log"
    # what a server killed with SIGKILL left (its folder, unheld, an hour old) and a folder that is not a server's
    for leftover in (work / "musetalk-server-k1ll3d_0" / "job", work / "musetalk-server-notes"):
        leftover.mkdir(parents=True)
        os.utime(leftover.parent if leftover.name == "job" else leftover, (time.time() - 3600,) * 2)
    env = {**os.environ, "MUSETALK_CACHE": str(cache), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}
    env.pop("MUSETALK_SERVER_TOKEN", None)
    cmd = [sys.executable, "-m", "musetalk.frontends.server.cli", "--host", "127.0.0.1", "--port", "0", "--models", str(models),
           "--token", TOKEN, "--device", "cpu", "--dtype", "fp32", "--queue-size", "2", "--max-upload-mb",
           str(MAX_UPLOAD_MB), "--work-dir", str(work), "--result-ttl", "600", "--shutdown-grace", "20"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    info = {"proc": proc, "work": work, "cache": cache, "log": log}
    try:
        info["url"] = _wait_until_serving(proc, log)
        yield info
    finally:
        if proc.poll() is None:
            try:
                httpx.post(info.get("url", "http://127.0.0.1:1") + "/shutdown",
                           headers={"Authorization": f"Bearer {TOKEN}"}, params={"cancel": "true"}, timeout=5)
                proc.wait(timeout=30)
            except (httpx.HTTPError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()


def test_the_folder_of_a_killed_server_is_removed_at_start(server) -> None:
    names = sorted(p.name for p in server["work"].iterdir())
    assert "musetalk-server-k1ll3d_0" not in names and "musetalk-server-notes" in names
    assert len([n for n in names if re.fullmatch(r"musetalk-server-[a-z0-9_]{8}", n)]) == 1  # its own


def _wait_until_serving(proc: subprocess.Popen, log: Path) -> str:
    """The server's URL once GET /health answers 200 (the models load before the port accepts requests)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        if url is None:
            found = re.search(r"musetalk serve: (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.25)
    pytest.fail(f"the server did not come up in {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        yield c


def wait_for_job(client: httpx.Client, job_id: str, until: set[str], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] in until:
            return status
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not reach {until} in {timeout} s: {status}")


def eventually(check, timeout: float = 10) -> None:
    """Wait until ``check()`` is true: a synchronous job is deleted just *after* its video has been sent."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{check.__doc__ or check} still false after {timeout} s"
        time.sleep(0.1)


def job_folders(server) -> list[Path]:
    """The per-job folders in the server's temporary folder."""
    return [p for root in server["work"].glob("musetalk-server-*") for p in root.iterdir()]


# -- tests without a server ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("head, expected", [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, ("image", ".png")),
    (b"\xff\xd8\xff\xe0" + b"\0" * 8, ("image", ".jpg")),
    (b"RIFF\0\0\0\0WEBPVP8 ", ("image", ".webp")),
    (b"RIFF\0\0\0\0WAVEfmt ", ("audio", ".wav")),
    (b"\0\0\0\x20ftypisom\0\0\0\0", ("video", ".mp4")),
    (b"\0\0\0\x20ftypM4A \0\0\0\0", ("audio", ".m4a")),
    (b"\x1a\x45\xdf\xa3\0\0\0\0", ("video", ".mkv")),
    (b"ID3\x04\0\0\0\0", ("audio", ".mp3")),
    (b"\xff\xfb\x90\x00", ("audio", ".mp3")),
    (b"\xff\xf1\x50\x80", ("audio", ".aac")),
    (b"GIF89a\0\0", ("video", ".gif")),
    (b"#!/bin/sh\nrm -rf /", None),
    (b"", None),
])
def test_sniff(head: bytes, expected: tuple[str, str] | None) -> None:
    from musetalk.frontends.server import sniff

    found = sniff(head)
    assert (found and (found.kind, found.suffix)) == expected


def test_form_fields_are_config_fields() -> None:
    """The /generate form and GenerationConfig cannot drift: every setting field is a config field of that type."""
    import inspect
    import typing

    from musetalk.config import BlendConfig, CropConfig, GenerationConfig, RuntimeConfig, SilenceConfig
    from musetalk.frontends.server import create_app

    class _Pipe:  # create_app does not touch the pipeline until the app starts
        version = "v15"

        def stream(self) -> None: ...

    from musetalk.frontends.options import settings_for

    app = create_app(_Pipe())
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/generate")
    config_types = {}
    for cls in (GenerationConfig, CropConfig, BlendConfig, SilenceConfig, RuntimeConfig):
        config_types.update({k: v for k, v in typing.get_type_hints(cls).items()})
    transport = {"request", "source", "audio", "avatar", "run_async", "return"}
    params = inspect.signature(endpoint).parameters
    settings = [name for name in params if name not in transport]
    # every per-run and per-batch setting of the config dataclasses, and nothing else (device/dtype are the server's)
    assert set(settings) == {s.name for s in settings_for("run", "batch")}
    assert {"bbox_shift", "extra_margin", "parsing_mode", "fps", "batch_size", "version"} <= set(settings)
    assert "device" not in settings and "dtype" not in settings
    for name in settings:
        assert params[name].annotation == typing.Optional[config_types[name]], name


def test_shutdown_authorization_rules() -> None:
    """No token: loopback only. With a token: only the exact bearer token, from anywhere."""
    from types import SimpleNamespace

    from musetalk.frontends.server import ApiError, authorize_shutdown, is_loopback

    def request(host: str | None, auth: str | None = None):
        return SimpleNamespace(client=SimpleNamespace(host=host) if host else None,
                               headers={"authorization": auth} if auth else {})

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.2") and not is_loopback("localhost.evil.com") and not is_loopback(None)
    authorize_shutdown(request("127.0.0.1"), None)
    for host in ("192.168.1.20", None):
        with pytest.raises(ApiError) as info:
            authorize_shutdown(request(host), None)
        assert info.value.status == 403
    authorize_shutdown(request("192.168.1.20", "Bearer s3cret"), "s3cret")
    for auth, status in ((None, 401), ("Basic s3cret", 401), ("Bearer wrong", 403)):
        with pytest.raises(ApiError) as info:
            authorize_shutdown(request("127.0.0.1", auth), "s3cret")
        assert info.value.status == status


# -- the live server: in file order; the last test shuts it down ---------------------------------------------------
def test_info_health_and_schema(client: httpx.Client) -> None:
    info = client.get("/").json()
    assert info["service"] == "musetalk-studio" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["models"] == {"loaded": ["v15"], "default": "v15"}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["worker_alive"] and health["memory"]["rss"] > 0
    schema = client.get("/openapi.json").json()
    assert {"/", "/health", "/generate", "/jobs/{job_id}", "/jobs/{job_id}/result", "/shutdown"} <= set(schema["paths"])


def test_generate_sync(client: httpx.Client, server, tmp_path: Path) -> None:
    """Image + 0.6 s of speech -> an mp4 of 6 frames at 10 fps; a path-like upload name is never used."""
    evil = server["work"].parent / "evil.png"
    response = client.post("/generate", files=files(FACE, wav_bytes(6 * SAMPLES_PER_FRAME), "../../evil.png"),
                           data={"fps": str(FPS)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    assert int(response.headers["x-frames"]) == 6
    assert count_frames(response.content, tmp_path) == 6
    assert not evil.exists()
    # a synchronous job is forgotten once its video is sent; nothing of it stays on disk
    eventually(lambda: client.get(f"/jobs/{response.headers['x-job-id']}").status_code == 404)
    eventually(lambda: job_folders(server) == [])


def test_generate_async_result_and_delete(client: httpx.Client, server, tmp_path: Path) -> None:
    response = client.post("/generate", files=files(FACE, wav_bytes(7 * SAMPLES_PER_FRAME)),
                           data={"fps": str(FPS), "avatar": AVATAR, "async": "true"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}" and job["state"] in ("queued", "running")
    status = wait_for_job(client, job["id"], {"done", "failed", "cancelled"})
    assert status["state"] == "done", status
    assert status["frames_done"] == status["frames_total"] == 7 and status["progress"] == 1.0
    assert status["fps"] > 0 and status["video_fps"] == FPS and status["expires_at"] > status["finished_at"]
    result = client.get(status["result_url"])
    assert result.status_code == 200 and count_frames(result.content, tmp_path) == 7
    # only the result stays (inputs removed); the named avatar is in the cache the CLI uses
    assert [p.name for p in (job_folders(server)[0]).iterdir()] == ["result.mp4"]
    assert (server["cache"] / "avatars" / AVATAR / "meta.json").is_file()
    assert client.delete(f"/jobs/{job['id']}").status_code == 200
    assert client.get(f"/jobs/{job['id']}").status_code == 404
    assert job_folders(server) == []


def test_cancel_running_job(client: httpx.Client, server) -> None:
    """DELETE stops a running job between frames; its files are removed."""
    response = client.post("/generate", files=files(FACE, wav_bytes(30 * SAMPLES_PER_FRAME)),
                           data={"fps": str(FPS), "avatar": AVATAR, "async": "true", "batch_size": "2"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/jobs/{job_id}").json()["frames_done"] == 0:
        assert time.monotonic() < deadline, "the job never started writing frames"
        time.sleep(0.1)
    cancelled = client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
    status = wait_for_job(client, job_id, {"done", "failed", "cancelled"}, timeout=30)
    assert status["state"] == "cancelled" and status["frames_done"] < 30
    assert status["error"]["error"] == "cancelled"
    assert client.get(f"/jobs/{job_id}/result").status_code == 409
    assert job_folders(server) == []


def test_concurrent_requests_complete_or_get_429(client: httpx.Client, server, tmp_path: Path) -> None:
    """8 simultaneous requests, each with its own audio length: each one gets its own video back, or a 429."""
    lengths = [4 + i for i in range(8)]  # output frames of request i
    barrier = Barrier(len(lengths))

    def send(frames: int) -> httpx.Response:
        body = files(FACE, wav_bytes(frames * SAMPLES_PER_FRAME))
        with httpx.Client(base_url=server["url"], timeout=180) as c:
            barrier.wait()
            return c.post("/generate", files=body, data={"fps": str(FPS), "avatar": AVATAR})

    with ThreadPoolExecutor(len(lengths)) as pool:
        responses = list(pool.map(send, lengths))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [(r.status_code, r.text[:200]) for r in responses]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for frames, response in zip(lengths, responses):
        if response.status_code == 200:
            assert int(response.headers["x-frames"]) == frames
            assert count_frames(response.content, tmp_path) == frames
        else:
            assert response.json()["error"] == "queue_full" and int(response.headers["retry-after"]) >= 1
    eventually(lambda: client.get("/health").json()["jobs"] | {"kept": 0}
               == {"running": None, "queued": 0, "queue_size": 2, "kept": 0, "closing": False})
    eventually(lambda: job_folders(server) == [])


def _grey() -> bytes:
    return png_bytes(np.full((192, 192, 3), 128, np.uint8))


_SPEECH = wav_bytes(5 * SAMPLES_PER_FRAME)
BAD_REQUESTS = [
    # (id, files, form, status, error code, text the message must contain)
    ("source-not-media", files(b"hello, I am text\n" * 20, _SPEECH), {}, 415, "unsupported_media_type", "source"),
    ("audio-is-image", files(FACE, FACE), {}, 415, "unsupported_media_type", "image"),
    ("audio-random-bytes", files(FACE, bytes(range(256)) * 8), {}, 415, "unsupported_media_type", "audio"),
    ("audio-without-sound", files(FACE, (SAMPLES / "face.mp4").read_bytes()), {}, 422, "invalid_input",
     "no audio stream"),
    ("audio-silent", files(FACE, wav_bytes(5 * SAMPLES_PER_FRAME, silent=True)), {}, 422, "invalid_input", "silent"),
    ("oversized", files(FACE[:16] + b"\0" * (MAX_UPLOAD_MB << 20), _SPEECH), {}, 413, "too_large", "MiB"),
    ("truncated-video", files((SAMPLES / "face.mp4").read_bytes()[:4000], _SPEECH, "face.mp4"), {}, 422,
     "invalid_input", "cannot read the source upload as a video"),
    ("no-face", files(_grey(), _SPEECH), {"fps": str(FPS)}, 422, "no_face", "no face"),
    ("bbox-not-int", files(FACE, _SPEECH), {"bbox_shift": "abc"}, 422, "invalid_request", "bbox_shift"),
    ("bbox-huge", files(FACE, _SPEECH), {"bbox_shift": str(10**12)}, 422, "invalid_request", "bbox_shift"),
    ("fps-zero", files(FACE, _SPEECH), {"fps": "0"}, 422, "invalid_input", "fps"),
    ("fps-nan", files(FACE, _SPEECH), {"fps": "nan"}, 422, "invalid", "fps"),
    ("unknown-version", files(FACE, _SPEECH), {"version": "v9"}, 422, "invalid_input", "version"),
    ("missing-weights", files(FACE, _SPEECH), {"version": "v1"}, 422, "weights_unavailable", "v1"),
    ("parsing-mode", files(FACE, _SPEECH), {"parsing_mode": "lips"}, 422, "invalid_input", "parsing mode"),
    ("batch-zero", files(FACE, _SPEECH), {"batch_size": "0"}, 422, "invalid_input", "batch size"),
    ("batch-too-large", files(FACE, _SPEECH), {"batch_size": "1000"}, 422, "invalid_input", "limit"),
    ("avatar-path", files(FACE, _SPEECH), {"avatar": "../../etc/passwd"}, 422, "invalid_input", "avatar name"),
    ("avatar-absolute", files(FACE, _SPEECH), {"avatar": "/tmp/x"}, 422, "invalid_input", "avatar name"),
    ("no-audio-part", {"source": ("face.png", FACE)}, {}, 422, "invalid_request", "audio"),
]


@pytest.mark.parametrize("name, upload, form, status, code, text", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_clear_4xx(client: httpx.Client, server, name: str, upload: dict, form: dict, status: int,
                                    code: str, text: str) -> None:
    response = client.post("/generate", files=upload, data=form)
    body = response.json()
    assert response.status_code == status, body
    assert body["error"].startswith(code) and text.lower() in body["message"].lower(), body
    assert str(server["work"]) not in response.text  # server paths never leak
    assert client.get("/health").json()["worker_alive"]


# ids that are not ours: unknown but well-formed, and malformed ones (were 422 before: a pattern on the path)
NOT_OUR_IDS = ["0" * 32, "..%2F..%2Fetc", "abc", "0" * 31 + "G", "A" * 32, "0" * 32 + "%0A", "%00", "%C3%A9t%C3%A9",
               "x" * 5000, "-1", "%20"]


@pytest.mark.parametrize("job_id", NOT_OUR_IDS, ids=range(len(NOT_OUR_IDS)))
def test_jobs_that_are_not_ours_are_404(client: httpx.Client, job_id: str) -> None:
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/result"),
                         ("DELETE", f"/jobs/{job_id}")):
        response = client.request(method, path)
        body = response.json()
        assert response.status_code == 404, (method, path, body)
        assert set(body) >= {"error", "message", "fix"} and body["error"] in ("unknown_job", "not_found"), body
        assert len(response.text) < 1000, "a malformed id is not echoed back"


def test_server_healthy_after_bad_inputs(client: httpx.Client, server) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["jobs"]["queued"] == 0 and job_folders(server) == []


def test_schemathesis_finds_no_server_errors(server) -> None:
    """A bounded property-based run over the served OpenAPI schema: no request may get a 5xx."""
    pytest.importorskip("schemathesis")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server["url"] + "/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", "10", "--phases", "examples,coverage,fuzzing",
           "--workers", "1", "--seed", "1", "--generation-database", "none",
           "--request-timeout", "30", "--no-color", "-H", "Authorization: Bearer not-the-token"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=server["work"].parent)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", done.stdout), done.stdout[-2000:]


def test_shutdown_needs_the_token(client: httpx.Client, server) -> None:
    """Refused without the token (401) and with a wrong one (403); with it, the process exits cleanly."""
    assert client.post("/shutdown").status_code == 401
    assert client.post("/shutdown", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/health").status_code == 200
    response = client.post("/shutdown", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 202 and response.json()["status"] == "shutting down"
    assert server["proc"].wait(timeout=60) == 0
    # its temporary folder removed; a folder of the user's with a similar name kept
    assert [p.name for p in server["work"].glob("musetalk-server-*")] == ["musetalk-server-notes"]
    with pytest.raises(httpx.TransportError):
        client.get("/health", timeout=2)
