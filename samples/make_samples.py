"""Regenerate the sample inputs in this folder: face.png, face.mp4 and speech.wav.

    python -m samples.make_samples     # from the repository root; needs scikit-image and espeak-ng

face.png  the face region of scikit-image's ``astronaut()`` (NASA photo of Eileen Collins, public domain),
          cropped to 384x384 and enlarged to 512x512.
face.mp4  2 s at 25 fps made from the same photo: a slow zoom-in (6 %) with a small pan, so frames differ;
          H.264 yuv420p, no audio, written with musetalk.stream.video.VideoWriter.
speech.wav 16 kHz mono PCM16 speech from espeak-ng (apt-get install espeak-ng), resampled with PyAV.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import cv2
import numpy as np

from musetalk.stream.video import VideoWriter

HERE = Path(__file__).resolve().parent

SIZE = 512  # output width and height of face.png and face.mp4
CROP = (31, 0, 384)  # x, y, side of the square taken from the 512x512 astronaut photo (face centred, hair kept)
FPS = 25
SECONDS = 2
ZOOM = 0.06  # the clip ends 6 % closer
PAN = (-6.0, 4.0)  # and its centre has moved this many source pixels (x, y)
VIDEO_CRF = 18  # the reference's value; the 50-frame clip stays well under 300 KB
TEXT = "Hello, this is MuseTalk Studio. Nice to meet you."
VOICE, WORDS_PER_MINUTE = "en-us", 175
SAMPLE_RATE = 16_000


def astronaut_bgr() -> np.ndarray:
    """(512, 512, 3) uint8 BGR: the public-domain photo shipped inside scikit-image."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def _view(photo: np.ndarray, zoom: float, shift: tuple[float, float]) -> np.ndarray:
    """The CROP window, zoomed by ``1 + zoom`` about its centre moved by ``shift``, resampled to SIZE x SIZE."""
    x, y, side = CROP
    cx, cy = x + side / 2 + shift[0], y + side / 2 + shift[1]
    scale = SIZE / side * (1 + zoom)
    # dest = scale * (src - centre) + SIZE / 2; sub-pixel steps keep the motion smooth.
    matrix = np.array([[scale, 0, SIZE / 2 - scale * cx], [0, scale, SIZE / 2 - scale * cy]], dtype=np.float64)
    return cv2.warpAffine(photo, matrix, (SIZE, SIZE), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def make_image(photo: np.ndarray, path: Path) -> None:
    cv2.imwrite(str(path), _view(photo, 0.0, (0.0, 0.0)), [cv2.IMWRITE_PNG_COMPRESSION, 9])


def make_video(photo: np.ndarray, path: Path) -> None:
    n = FPS * SECONDS
    with VideoWriter(path, fps=FPS, crf=VIDEO_CRF) as writer:
        for i in range(n):
            t = i / (n - 1)
            ease = 0.5 - 0.5 * np.cos(np.pi * t)  # starts and stops gently
            writer.write(_view(photo, ZOOM * ease, (PAN[0] * ease, PAN[1] * ease)))


def make_speech(path: Path) -> None:
    import av

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng (or brew install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run([espeak, "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(raw), TEXT], check=True)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        with av.open(str(raw)) as container:
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    samples = np.concatenate(chunks).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())


def main() -> None:
    photo = astronaut_bgr()
    make_image(photo, HERE / "face.png")
    make_video(photo, HERE / "face.mp4")
    make_speech(HERE / "speech.wav")
    for name in ("face.png", "face.mp4", "speech.wav"):
        print(f"{name}: {(HERE / name).stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
