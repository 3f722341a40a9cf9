"""Fault sweep (issue #11): every way out of a run leaves nothing half-written and never touches an input.

* output = input, in every spelling (``./``, ``..``, symlink, hard link, a frame of a source folder): refused before
  any work by ``generate`` (CLI and API), ``batch`` and ``evaluate --json``;
* SIGINT / SIGTERM / SIGHUP during preparation, generation and encoding of ``musetalk generate``, during a
  ``musetalk batch`` row and during a server job: exit status 128 + signal, one message line, no partial file,
  no temporary avatar or job folder, the port released;
* a file size limit (RLIMIT_FSIZE, SIGXFSZ left at its default: the CLI ignores it) while preparing an avatar,
  writing the video and running a server job: one clear error, nothing committed that a later run would trust;
* the server's source limits (frames, pixels, duration), checked from headers before anything is decoded.

Everything runs in subprocesses on tiny weights and tiny inputs (a 256x256 face, 0.4 s and 2 s of speech). Each
run is signalled when it shows it reached the point under test: a progress bar on stderr, or a file appearing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import wave
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from musetalk.errors import InputError
from tests.conftest import write_wav

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}
RUN_TIMEOUT_S = 300  # generous: the suite may share a small, busy machine


# -- inputs -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """face.png at 256x256, 0.4 s and 2 s of speech, a noisy JPEG, a frame folder; read-only for every test."""
    import cv2

    from musetalk.stages.audio import load_audio

    folder = tmp_path_factory.mktemp("fault-media")
    face = cv2.resize(cv2.imread(str(SAMPLES / "face.png")), (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "face.png"), face)
    speech = load_audio(SAMPLES / "speech.wav")
    write_wav(folder / "short.wav", speech[8000:8000 + 6400])  # 0.4 s: 10 frames
    write_wav(folder / "long.wav", speech[8000:8000 + 32000])  # 2 s: 50 frames
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)
    cv2.imwrite(str(folder / "noise.jpg"), noise, [cv2.IMWRITE_JPEG_QUALITY, 20])  # small upload, huge as PNG
    (folder / "frames").mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / "frames" / f"{i:03d}.png"), face)
    return folder


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (inputs must come out of every run byte-identical)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def half_written(*roots: Path) -> list[Path]:
    """Anything a clean exit must not leave: partial files, hidden temporaries, temporary avatar or server folders."""
    found = []
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else []:
            name = path.name
            if ".partial" in name or name.startswith(".") or name.startswith(("musetalk-avatar-", "musetalk-server-")):
                found.append(path)
    return found


class Run:
    """A ``musetalk`` subprocess whose stderr is collected as it comes (progress bars are the readiness signal)."""

    def __init__(self, args: list[str], tmp: Path, cache: Path, fsize: int | None = None,
                 module: str = "musetalk") -> None:
        env = {**os.environ, "MUSETALK_CACHE": str(cache), "TMPDIR": str(tmp),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

        def child() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have left Ctrl-C ignored
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # the product, not this test, must ignore it
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp.parent, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=child)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, sink: list[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            sink.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode(errors="replace")

    @property
    def stdout(self) -> str:
        return b"".join(self.out).decode(errors="replace")

    def wait_until(self, ready, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
        """Wait until ``ready()``; fail (with the run's stderr) if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"ended before {what}: rc {self.proc.returncode}\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{self.stderr[-3000:]}"
            time.sleep(0.02)

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
        rc = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return rc


def assert_interrupted(run: Run, signum: int, since: int = 0) -> None:
    """Exit 128 + signum, one message line, no traceback in what the run wrote after byte ``since`` of stderr."""
    rc = run.finish()
    stderr = run.stderr[since:]
    assert rc == 128 + signum, f"exit {rc}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", stderr) if "interrupted" in line]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], stderr[-3000:]


@pytest.fixture
def dirs(tmp_path: Path) -> SimpleNamespace:
    paths = SimpleNamespace(out=tmp_path / "out", tmp=tmp_path / "tmp", cache=tmp_path / "cache")
    for path in vars(paths).values():
        path.mkdir()
    return paths


def assert_nothing_left(dirs: SimpleNamespace, media: Path, before: dict[str, str]) -> None:
    assert list(dirs.tmp.iterdir()) == [], "temporary avatars and files must be gone"
    assert half_written(dirs.out, dirs.cache, media) == []
    assert fingerprint(media) == before, "an input was modified"


# -- 1. output = input -----------------------------------------------------------------------------------------------
def _clash_cases(media: Path, work: Path) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (source, audio, output) where output is one of the inputs under another spelling."""
    import shutil

    clip = work / "clip.mp4"
    shutil.copy(SAMPLES / "face.mp4", clip)
    (work / "sub").mkdir(exist_ok=True)
    link = work / "link.mp4"
    link.symlink_to(clip)
    hard = work / "hard.mp4"
    os.link(clip, hard)
    frame_link = work / "frame.mp4"
    frame_link.symlink_to(media / "frames" / "001.png")
    audio_mp4 = work / "speech.mp4"  # an audio track in an mp4 container: output named like the audio
    shutil.copy(clip, audio_mp4)
    wav = media / "short.wav"
    return {
        "same path": (clip, wav, clip),
        "dot": (clip, wav, work / "." / "clip.mp4"),
        "dotdot": (clip, wav, work / "sub" / ".." / "clip.mp4"),
        "symlink to source": (clip, wav, link),
        "source through a symlink": (link, wav, clip),
        "hard link": (clip, wav, hard),
        "frame of a source folder": (media / "frames", wav, frame_link),
        "audio": (media / "face.png", audio_mp4, audio_mp4),
    }


def test_output_that_is_an_input_is_refused_before_any_work(media: Path, tmp_path: Path) -> None:
    from musetalk.stream.pipeline import MuseTalkPipeline

    before = fingerprint(media)
    # no models at all: generate must refuse before touching any (unet only gives device and dtype)
    pipe = MuseTalkPipeline(None, None, SimpleNamespace(device="cpu", dtype=None), None)
    for name, (source, audio, output) in _clash_cases(media, tmp_path).items():
        kept = hashlib.sha256(Path(output).read_bytes()).hexdigest()
        for call in (MuseTalkPipeline.check_inputs, pipe.generate):
            with pytest.raises(InputError, match="is the same file as the") as info:
                call(source, audio, output)
            assert "lipsync" in info.value.fix, (name, info.value.fix)  # the fix names another file
        assert hashlib.sha256(Path(output).read_bytes()).hexdigest() == kept, name
    assert fingerprint(media) == before
    MuseTalkPipeline.check_inputs(media / "face.png", media / "short.wav", tmp_path / "new.mp4")  # no clash: fine


def test_cli_generate_onto_its_source_exits_2_and_keeps_it(media: Path, dirs: SimpleNamespace,
                                                           tiny_models: Path) -> None:
    import shutil

    clip = dirs.out / "clip.mp4"
    shutil.copy(SAMPLES / "face.mp4", clip)
    kept = clip.read_bytes()
    run = Run(["generate", "--source", str(clip), "--audio", str(media / "short.wav"), "--output",
               str(dirs.out / "." / "clip.mp4"), "--models", str(tiny_models), "--quiet"], dirs.tmp, dirs.cache)
    assert run.finish() == 2, run.stderr
    assert "same file as the source" in run.stderr and "fix: write to another file" in run.stderr
    assert clip.read_bytes() == kept and [p.name for p in dirs.out.iterdir()] == ["clip.mp4"]


def test_batch_rows_that_would_overwrite_an_input_or_each_other(media: Path, tmp_path: Path) -> None:
    import shutil

    from musetalk.frontends import batch
    from musetalk.config import preset

    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "alias").symlink_to(out / "real")
    shutil.copy(SAMPLES / "face.mp4", out / "clip.mp4")  # a source that lives in the output folder
    shutil.copy(media / "short.wav", out / "voice.mp4")  # an audio file with a video suffix
    rows = [
        {"source": str(out / "clip.mp4"), "audio": str(media / "short.wav"), "output": "clip.mp4"},  # 1: own source
        {"source": str(media / "face.png"), "audio": str(out / "voice.mp4"), "output": "x.mp4"},  # 2: fine
        {"source": str(media / "face.png"), "audio": str(media / "short.wav"), "output": "voice.mp4"},  # 3: row 2's
        {"source": str(media / "face.png"), "audio": str(media / "long.wav"), "output": "real/a.mp4"},  # 4: fine
        {"source": str(media / "face.png"), "audio": str(media / "long.wav"), "output": "alias/a.mp4"},  # 5: = row 4
    ]
    before = fingerprint(out)
    valid, errors, total = batch.load_jobs(rows, preset("v15"), output_dir=out)
    assert total == 5 and sorted(job.row for job in valid) == [2, 4]
    messages = {e.row: e.message for e in errors}
    assert "same file as the source of row 1" in messages[1]
    assert "same file as the audio of row 2" in messages[3]
    assert "same file as the output of row 4" in messages[5]
    with pytest.raises(batch.BatchError, match="3 of 5 rows are invalid"):  # refused before any model is loaded
        batch.run(rows, out, config=preset("v15"), progress=False)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"source": "%s", "audio": "%s"}\n' % (media / "face.png", media / "short.wav"))
    jobs_text = jobs.read_text()
    with pytest.raises(InputError, match="the summary .* is the same file as the jobs file"):
        batch.run(jobs, out, config=preset("v15"), summary=tmp_path / "." / "jobs.jsonl", progress=False)
    assert jobs.read_text() == jobs_text and fingerprint(out) == before


def test_evaluate_json_onto_its_video_is_refused(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from musetalk.frontends.cli import main

    clip = tmp_path / "clip.mp4"
    shutil.copy(SAMPLES / "face.mp4", clip)
    kept = clip.read_bytes()
    cases = [([str(clip)], clip, "video"), ([str(clip)], tmp_path / ".." / tmp_path.name / "clip.mp4", "video"),
             ([str(clip), "--audio", str(media / "short.wav")], media / "short.wav", "audio")]
    for args, target, role in cases:
        # refused before the SyncNet weights are even looked for (none exist here)
        assert main(["evaluate", *args, "--json", str(target), "--syncnet", str(tmp_path / "none")]) == 2
        assert f"is the same file as the {role}" in capsys.readouterr().err
    assert clip.read_bytes() == kept


# -- 2. signals ----------------------------------------------------------------------------------------------------
def test_signal_handlers_turn_stop_signals_into_a_clean_interrupt() -> None:
    from musetalk.frontends import signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGXFSZ)}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt) as info:  # a KeyboardInterrupt: every Ctrl-C cleanup path runs
            with signals.stop_signals_as_interrupt():
                assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
                os.kill(os.getpid(), signum)
                time.sleep(1)  # the handler raises at the next bytecode
        assert info.value.signum == signum and signals.exit_status(info.value) == 128 + signum
    assert {sig: signal.getsignal(sig) for sig in before} == before, "handlers restored"
    with signals.stop_signals_as_interrupt():  # a second signal during cleanup does not interrupt the cleanup
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # ignored: we are still here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a library takes SIGTERM over (ray.init does)
        signals.reclaim()
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signals.exit_status(KeyboardInterrupt()) == 130


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_whose_exception_was_swallowed_still_stops_the_run(name: str, media: Path, dirs: SimpleNamespace,
                                                                    tiny_models: Path, python_ctrl_c: None) -> None:
    """A handler raises wherever the main thread is; extension code (PyAV's error check during an encode) can drop
    that exception, and the run went on to commit its output. The recorded signal is raised again at the next frame
    by the hooks the front ends hand in."""
    from musetalk.frontends import signals
    from musetalk.stream.pipeline import MuseTalkPipeline

    pipe = MuseTalkPipeline.from_pretrained(tiny_models, device="cpu", dtype="fp32")
    signum = SIGNALS[name]

    class SwallowedAtFrame3(signals.StopSignalHooks):
        frames = 0

        def frame_done(self) -> None:
            self.frames += 1
            if self.frames == 3:
                try:  # what the extension did: the handler's exception raised, then dropped
                    os.kill(os.getpid(), signum)
                    time.sleep(1)
                except KeyboardInterrupt:
                    pass

    hooks = SwallowedAtFrame3()
    output = dirs.out / "out.mp4"
    with signals.stop_signals_as_interrupt():
        with pytest.raises(KeyboardInterrupt) as info:
            pipe.generate(media / "face.png", media / "long.wav", output, hooks=hooks)
        assert signals.exit_status(info.value) == 128 + signum
    assert hooks.frames == 3, "stopped at the next frame"
    assert list(dirs.out.iterdir()) == []
    with signals.stop_signals_as_interrupt():  # a new block starts with no signal received
        signals.raise_if_stopped()
        assert signals.StopSignalHooks().cancelled() is False


GENERATE_POINTS = [  # (where, signal): each signal at two points, each point with two signals
    ("preparing", "SIGTERM"), ("preparing", "SIGHUP"), ("generating", "SIGHUP"), ("generating", "SIGINT"),
    ("encoding", "SIGTERM"), ("encoding", "SIGINT"),
]


@pytest.mark.parametrize("where, name", GENERATE_POINTS, ids=[f"{w}-{n}" for w, n in GENERATE_POINTS])
def test_generate_stops_cleanly_on_a_signal(where: str, name: str, media: Path, dirs: SimpleNamespace,
                                            tiny_models: Path) -> None:
    before = fingerprint(media)
    audio = media / ("long.wav" if where == "encoding" else "short.wav")
    run = Run(["generate", "--source", str(media / "face.png"), "--audio", str(audio), "--output",
               str(dirs.out / "out.mp4"), "--models", str(tiny_models), "--device", "cpu", "--dtype", "fp32",
               "--batch-size", "2"], dirs.tmp, dirs.cache)
    if where == "preparing":  # the bar appears once the avatar folder is being written
        run.wait_until(lambda: re.search(r"prepare:\s+0%", run.stderr), "preparation")
    elif where == "generating":  # the bar appears before the first batch reaches the models
        run.wait_until(lambda: re.search(r"generate:\s+0%", run.stderr), "generation")
    else:
        run.wait_until(lambda: any(".partial" in p.name for p in dirs.out.iterdir()), "encoding")
    run.proc.send_signal(SIGNALS[name])
    assert_interrupted(run, SIGNALS[name])
    assert list(dirs.out.iterdir()) == []
    assert_nothing_left(dirs, media, before)


def test_what_a_killed_run_left_the_next_run_removes(media: Path, dirs: SimpleNamespace, tiny_models: Path) -> None:
    """SIGKILL (the OOM killer, ``kill -9``) runs no exit path: a hidden avatar folder in the cache, a temporary
    avatar and a partial output stay behind. The next runs writing to the same places remove them, once no live
    process holds them and they are older than a minute (aged here instead of waited for)."""
    before = fingerprint(media)
    models = ["--models", str(tiny_models), "--device", "cpu", "--dtype", "fp32", "--batch-size", "2"]
    prepare = ["avatar", "prepare", "--source", str(media / "face.png"), "--name", "k", *models]
    generate = ["generate", "--source", str(media / "face.png"), "--audio", str(media / "long.wav"), "--output",
                str(dirs.out / "out.mp4"), *models]
    run = Run(prepare, dirs.tmp, dirs.cache)
    run.wait_until(lambda: re.search(r"prepare:\s+0%", run.stderr), "preparation")
    run.proc.kill()
    run.finish()
    run = Run(generate, dirs.tmp, dirs.cache)
    run.wait_until(lambda: any(".partial" in p.name for p in dirs.out.iterdir()), "encoding")
    run.proc.kill()
    run.finish()
    left = half_written(dirs.out, dirs.cache) + list(dirs.tmp.iterdir())
    assert {p.parent for p in left} >= {dirs.out, dirs.cache / "avatars", dirs.tmp}, left
    then = time.time() - 600
    for path in left:
        os.utime(path, (then, then))
    for args in (prepare, generate):
        run = Run(args, dirs.tmp, dirs.cache)
        assert run.finish() == 0, run.stderr[-3000:]
    assert (dirs.out / "out.mp4").is_file() and (dirs.cache / "avatars" / "k" / "meta.json").is_file()
    assert_nothing_left(dirs, media, before)


def test_batch_stops_cleanly_on_sigterm(media: Path, dirs: SimpleNamespace, tiny_models: Path) -> None:
    import json

    before = fingerprint(media)
    jobs = dirs.tmp.parent / "jobs.csv"
    jobs.write_text(f"source,audio\n{media / 'face.png'},{media / 'long.wav'}\n{media / 'face.png'},"
                    f"{media / 'short.wav'}\n")
    run = Run(["batch", str(jobs), "--output-dir", str(dirs.out), "--models", str(tiny_models), "--device", "cpu",
               "--dtype", "fp32", "--batch-size", "2", "--quiet"], dirs.tmp, dirs.cache)
    run.wait_until(lambda: any(p.is_file() for p in dirs.out.glob(".musetalk-batch-*/row*/*")), "a row encoding")
    run.proc.send_signal(signal.SIGTERM)
    assert_interrupted(run, signal.SIGTERM)
    assert [p.name for p in dirs.out.iterdir()] == ["summary.jsonl"]
    states = [json.loads(line)["state"] for line in (dirs.out / "summary.jsonl").read_text().splitlines()]
    assert states == ["cancelled", "cancelled"]
    assert_nothing_left(dirs, media, before)


# -- 3. file size limit ------------------------------------------------------------------------------------------
def test_file_size_limit_while_preparing_then_while_writing(media: Path, dirs: SimpleNamespace,
                                                           tiny_models: Path) -> None:
    from musetalk.stream.avatar import load_avatar

    before = fingerprint(media)
    models = ["--models", str(tiny_models), "--device", "cpu", "--dtype", "fp32"]
    avatar = dirs.cache / "avatars" / "fz"
    # 1. the avatar's first frame (a ~120 KB PNG) is over a 32 KB limit: one clear error, nothing committed
    run = Run(["avatar", "prepare", "--source", str(media / "face.png"), "--name", "fz", *models], dirs.tmp,
              dirs.cache, fsize=32 * 1024)
    assert run.finish() == 2, run.stderr
    assert "storing the avatar fz" in run.stderr and "ulimit -f" in run.stderr and "Traceback" not in run.stderr
    assert not avatar.exists() and load_avatar(avatar) is None
    assert_nothing_left(dirs, media, before)
    # 2. a later run prepares it afresh (nothing was left for it to trust)
    run = Run(["avatar", "prepare", "--source", str(media / "face.png"), "--name", "fz", *models], dirs.tmp, dirs.cache)
    assert run.finish() == 0, run.stderr
    kept = fingerprint(avatar)
    # 3. writing the video runs into a 4 KB limit (the avatar is reused: only the video is written)
    run = Run(["generate", "--source", str(media / "face.png"), "--audio", str(media / "short.wav"), "--output",
               str(dirs.out / "out.mp4"), "--avatar", "fz", "--quiet", *models], dirs.tmp, dirs.cache, fsize=4096)
    assert run.finish() == 2, run.stderr
    assert "File too large" in run.stderr and "free disk space" in run.stderr and "Traceback" not in run.stderr
    assert list(dirs.out.iterdir()) == [] and fingerprint(avatar) == kept
    assert_nothing_left(dirs, media, before)


# -- 4. the server: limits, a file size limit, SIGTERM with jobs in flight -------------------------------------------
def huge_png(side: int = 16000) -> bytes:
    """A valid side x side PNG (1-bit grey, all black) of ~30 KB: it would decode to side^2 x 3 bytes (768 MB)."""
    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def tiny_clip(path: Path, pts: list[int] | range, rate: int, side: int = 16) -> bytes:
    """An H.264 mp4 of black side x side frames at the given timestamps (units of 1/rate s)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = stream.height = side
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        for t in pts:
            frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


def silent_flac(seconds: float, rate: int = 16_000) -> bytes:
    """``seconds`` of digital silence as FLAC: ~0.25 KB per second of audio, whatever its length."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.codec_context.layout, stream.codec_context.format = "mono", "s16"
        for i in range(int(seconds)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, rate), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, i * rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


def wav_bytes(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000
    return path.read_bytes()


SERVER_FSIZE = 300 * 1024  # the test uploads and a 256x256 avatar fit; face.png (416 KB) and a 512x512 noise frame do not


@pytest.fixture(scope="module")
def fault_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """``musetalk serve`` (default limits, no grace on shutdown) under a file size limit; stopped by a test."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    root = tmp_path_factory.mktemp("fault-server")
    paths = SimpleNamespace(work=root / "work", tmp=root / "tmp", cache=root / "cache")
    for path in vars(paths).values():
        path.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = Run(["--host", "127.0.0.1", "--port", str(port), "--models", str(tiny_models), "--device", "cpu",
               "--dtype", "fp32", "--work-dir", str(paths.work), "--shutdown-grace", "0", "--log-level", "warning"],
              paths.tmp, paths.cache, fsize=SERVER_FSIZE, module="musetalk.frontends.server.cli")
    url = f"http://127.0.0.1:{port}"
    run.wait_until(lambda: "musetalk serve:" in run.stdout, "the server's address")
    with httpx.Client(base_url=url, timeout=120) as client:
        yield SimpleNamespace(run=run, client=client, port=port, **vars(paths))
    if run.proc.poll() is None:
        run.proc.kill()
        run.finish()


def _post(server, source: bytes, audio: bytes, **form: str):
    files = {"source": ("s", source, "application/octet-stream"), "audio": ("a", audio, "application/octet-stream")}
    return server.client.post("/generate", files=files, data=form)


def test_server_limits_are_read_from_headers_before_decoding(fault_server, media: Path, tmp_path: Path) -> None:
    speech = wav_bytes(media / "short.wav")
    cases = {  # upload -> (status, code, the limit named)
        "a 16000x16000 PNG": (huge_png(), speech, "frame_too_large", "max_source_pixels"),
        "10 000 frames of 16x16": (tiny_clip(tmp_path / "many.mp4", range(10_000), 1000), speech, "too_many_frames",
                                   "max_source_frames"),
        "2 frames 1000 s apart": (tiny_clip(tmp_path / "long.mp4", [0, 1000], 1), speech, "source_too_long",
                                  "max_source_seconds"),
        "1000 s of silent FLAC": ((media / "frames" / "000.png").read_bytes(), silent_flac(1000), "audio_too_long",
                                  "max_audio_seconds"),
    }
    for name, (source, audio, code, limit) in cases.items():
        assert len(source) + len(audio) < 2 << 20, name  # small uploads: the work they declare is the problem
        started = time.monotonic()
        response = _post(fault_server, source, audio)
        body = response.json()
        assert response.status_code == 413 and body["error"] == code, (name, body)
        assert limit in body["message"] and body["fix"], (name, body)
        assert time.monotonic() - started < 30, name  # decoding any of them would take far longer
    limits = fault_server.client.get("/").json()["limits"]
    assert limits["max_source_frames"] == 9000 and limits["max_source_pixels"] == 3840 * 2160
    assert list(fault_server.work.glob("musetalk-server-*/*")) == []


def test_server_job_over_the_file_size_limit_fails_cleanly(fault_server, media: Path) -> None:
    # an upload over the limit: a JSON 507, not a bare "Internal Server Error"
    response = _post(fault_server, (SAMPLES / "face.png").read_bytes(), wav_bytes(media / "short.wav"))
    assert response.status_code == 507 and response.json()["error"] == "insufficient_storage", response.text
    assert "File too large" in response.json()["message"] and list(fault_server.work.glob("musetalk-server-*/*")) == []
    # the avatar of an upload within the limit is not
    response = _post(fault_server, (media / "noise.jpg").read_bytes(), wav_bytes(media / "short.wav"),
                     avatar="fz-server")
    body = response.json()
    assert response.status_code == 507 and body["error"] == "insufficient_storage", body
    assert "storing the avatar fz-server" in body["message"] and "ulimit -f" in body["fix"], body
    assert str(fault_server.work) not in response.text
    assert list(fault_server.work.glob("musetalk-server-*/*")) == []  # the job folder is gone
    assert half_written(fault_server.cache) == [] and not (fault_server.cache / "avatars" / "fz-server").exists()
    assert fault_server.client.get("/health").json()["worker_alive"]


def test_server_sigterm_with_jobs_in_flight(fault_server, media: Path) -> None:
    client = fault_server.client
    face, speech = (media / "face.png").read_bytes(), wav_bytes(media / "long.wav")
    running = _post(fault_server, face, speech, **{"async": "true"}).json()["id"]
    queued = _post(fault_server, face, speech, **{"async": "true"}).json()["id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while client.get(f"/jobs/{running}").json()["state"] != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    assert client.get(f"/jobs/{queued}").json()["state"] == "queued"
    logged = len(fault_server.run.stderr)  # earlier tests' failed jobs are logged with their traceback
    fault_server.run.proc.send_signal(signal.SIGTERM)
    assert_interrupted(fault_server.run, signal.SIGTERM, since=logged)
    assert list(fault_server.work.iterdir()) == [], "job folders and the server's temporary folder are removed"
    assert list(fault_server.tmp.iterdir()) == [] and half_written(fault_server.cache) == []
    with socket.socket() as again:  # the port is free again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", fault_server.port))


# -- 5. avatar names -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["anna\n", "anna\r", "a/b", "..", ".", "../x", "a\x00b", "\x00", "", "a" * 65,
                                  "x" * 10_000, "émile", "аnna", "名前", "-lead", ".hidden", "a b", "a\\b", "a\tb"])
def test_avatar_names_are_matched_whole(name: str) -> None:
    from musetalk.stream.avatar import check_avatar_name

    with pytest.raises(InputError, match="invalid avatar name"):
        check_avatar_name(name)


@pytest.mark.parametrize("name", ["anna", "a", "A-1_b.c", "a" * 64, "batch-0123456789abcdef"])
def test_valid_avatar_names_pass(name: str) -> None:
    from musetalk.stream.avatar import check_avatar_name

    assert check_avatar_name(name) == name
