"""``evaluate_video``: LSE-D / LSE-C / AV offset of a talking-face video, as the published evaluation computes them.

Steps (syncnet_python's ``run_pipeline.py`` + ``run_syncnet.py``, in memory and streaming):

1. decode the video at 25 fps and its audio (or ``audio``) at 16 kHz mono int16 (PyAV);
2. face crops: ``crop="s3fd"`` runs S3FD (scale 0.25, confidence 0.9) on every frame, ``"landmarks"`` takes
   the landmark backend's face box, then both go through the track + crop rule (:mod:`musetalk.quality.track`);
   ``"none"`` takes the frames as they are (already 224x224 face crops, resized otherwise);
3. with ``crop="none"`` the reference's mp4 -> JPEG step is replicated exactly (:class:`FfmpegJpegStep`);
4. SyncNet embeddings and the scores (:mod:`musetalk.quality.syncnet`); with several face tracks the longest
   one gives the headline numbers and every track is listed;
5. ``controls``: the same lips against the audio shifted by one second and against silence. A real sync score
   should drop to chance on both (offset anywhere, LSE-C near 0); if it does not, the score is not measuring sync.

Known deviations from the reference: no shot detection (the whole video is one shot); the cropped track is
not re-encoded with XVID before scoring; frame-rate conversion keeps the nearest earlier frame instead of
ffmpeg's vsync. Each result says in ``notes`` which of these applied.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from musetalk.errors import InputError, NoFaceError, WeightsError
from musetalk.weights.registry import WEIGHTS
from musetalk.quality.track import CropConfig, Detection, TrackConfig

if TYPE_CHECKING:  # torch-heavy modules are imported when a video is evaluated, not when the CLI is built
    from musetalk.quality.syncnet import SyncNetScorer, SyncScore

log = logging.getLogger(__name__)

CROPS = ("s3fd", "landmarks", "none", "auto")
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
FPS = 25
SAMPLE_RATE = 16_000
SYNCNET_FILE = WEIGHTS["syncnet"].dest  # musetalk download --syncnet puts it here, under the models folder
SFD_FILE = WEIGHTS["s3fd"].dest
CONTROL_SHIFT_SECONDS = 1.0  # well beyond the +-15 frames (0.6 s) searched, so the true alignment is out of reach


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of :func:`evaluate_video` (defaults: syncnet_python's ``run_pipeline.py`` / ``run_syncnet.py``)."""

    vshift: int = 15  # offsets searched, in frames each way
    batch_size: int = 20  # lip / audio windows per forward pass
    jpeg_step: bool = True  # replicate the reference's mp4 -> JPEG round trip before scoring
    facedet_scale: float = 0.25  # S3FD runs on the frame resized by this factor
    facedet_conf: float = 0.9  # S3FD detections below this confidence are dropped
    landmark_backend: str = "dlib"  # backend of crop="landmarks" (its face box is used)
    track: TrackConfig = field(default_factory=TrackConfig)
    crop: CropConfig = field(default_factory=CropConfig)


@dataclass
class TrackScore:
    """Scores of one face track: the frames it spans and what SyncNet said about them."""

    first_frame: int
    last_frame: int
    lse_d: float
    lse_c: float
    offset: int
    per_frame_confidence: np.ndarray  # (n_windows,) float32, window i starts at first_frame + i


@dataclass
class LSEResult:
    """Lip-sync scores of one video.

    lse_d: LSE-D, lower is better (minimum of the mean distance curve).
    lse_c: LSE-C, higher is better (median minus minimum of the curve).
    offset: AV offset in frames at 25 fps (lip window i matches audio window i - offset); 0 when in sync.
    per_frame_confidence: (n_windows,) median-filtered per-window confidence of the scored track.
    dist_curve: (2 * vshift + 1,) mean distance per offset; entry k is offset ``vshift - k``.
    detector: how the face was found: "s3fd", "landmarks:<backend>" or "none".
    replicates_jpeg_step: True when the frames were exactly what the reference's network would see
        after its ffmpeg mp4 -> JPEG step (only with crop "none" and a 4:2:0 source).
    controls: name -> (lse_d, lse_c, offset) against control audio ("shifted_1s", "silence").
    mouth: mouth opening / motion in silent vs speaking frames (``mouth=True``), ``motion_ratio`` near 0 is good.
    """

    video: str
    lse_d: float
    lse_c: float
    offset: int
    per_frame_confidence: np.ndarray
    dist_curve: np.ndarray
    detector: str
    replicates_jpeg_step: bool
    controls: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    n_frames: int = 0
    fps: float = float(FPS)
    tracks: list[TrackScore] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mouth: dict[str, Any] | None = None  # mouth motion on silence (``mouth=True``), see musetalk.quality.mouth

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (arrays become lists)."""
        out = asdict(self)
        vshift = (len(self.dist_curve) - 1) // 2
        out["per_frame_confidence"] = [round(float(v), 6) for v in self.per_frame_confidence]
        out["dist_curve"] = [round(float(v), 6) for v in self.dist_curve]
        out["dist_curve_offsets"] = list(range(vshift, -vshift - 1, -1))
        out["controls"] = {k: {"lse_d": v[0], "lse_c": v[1], "offset": v[2]} for k, v in self.controls.items()}
        out["tracks"] = [{**asdict(t), "per_frame_confidence": [round(float(v), 6) for v in t.per_frame_confidence]}
                         for t in self.tracks]
        if self.mouth is not None:  # NaN (no silent frames, say) is not valid JSON: null instead
            out["mouth"] = {k: None if isinstance(v, float) and not np.isfinite(v) else v
                            for k, v in self.mouth.items()}
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line: ``LSE-D 7.012  LSE-C 7.551  offset 0``."""
        return f"LSE-D {self.lse_d:.3f}  LSE-C {self.lse_c:.3f}  offset {self.offset:+d}"


# --------------------------------------------------------------------------------------------------------------
# weights


def default_weights(name: str, explicit: str | os.PathLike | None, env: str) -> Path:
    """``explicit``, else ``$env``, else ``<models>/<name>`` (``$MUSETALK_MODELS`` or ./models)."""
    from musetalk.weights import default_models_dir

    if explicit:
        return Path(explicit)
    if os.environ.get(env):
        return Path(os.environ[env])
    return default_models_dir() / name


def _check_weights(path: Path, what: str, flag: str) -> Path:
    if not path.is_file():
        raise WeightsError(f"{what} weights not found: {path}",
                           f"run `musetalk download --syncnet` or pass {flag} PATH")
    return path


# --------------------------------------------------------------------------------------------------------------
# face detection -> tracks


def _s3fd_detector(path: Path, device: Any, config: EvaluateConfig) -> Callable[[np.ndarray, int], list[Detection]]:
    from musetalk.quality.s3fd import S3FD

    net = S3FD.from_pretrained(path, device=device)

    def detect(frame: np.ndarray, index: int) -> list[Detection]:
        boxes = net.detect_faces(frame, conf_th=config.facedet_conf, scale=config.facedet_scale)
        return [Detection(index, (float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(b[4])) for b in boxes]

    return detect


def _landmark_backend(name: str, device: Any) -> Any:
    """``musetalk.stages.faces.get_landmark_backend(name)``: ``.detect(frame_bgr) -> FaceLandmarks``."""
    try:
        from musetalk.stages.faces import get_landmark_backend
    except ImportError as exc:
        raise InputError(f"the landmark backends are not available in this install ({exc})",
                         "use --crop s3fd or --crop none") from None
    return get_landmark_backend(name, device=device)


def _landmark_detector(name: str, device: Any) -> Callable[[np.ndarray, int], list[Detection]]:
    backend = _landmark_backend(name, device)

    def detect(frame: np.ndarray, index: int) -> list[Detection]:
        found = backend.detect(frame)
        if found.detector_box is None:
            return []
        x1, y1, x2, y2 = (float(v) for v in found.detector_box)
        return [Detection(index, (x1, y1, x2, y2), 1.0)]

    return detect


def resolve_crop(crop: str, sfd_path: Path) -> str:
    """``auto`` -> ``s3fd`` when its weights are present, else ``landmarks``; other names are checked."""
    if crop not in CROPS:
        raise InputError(f"unknown crop mode {crop!r}", f"use one of {', '.join(CROPS)}")
    if crop == "auto":
        chosen = "s3fd" if sfd_path.is_file() else "landmarks"
        log.info("crop auto -> %s", chosen)
        return chosen
    return crop


def detect_tracks(frames: Iterable[np.ndarray], detect: Callable[[np.ndarray, int], list[Detection]],
                  config: TrackConfig) -> tuple[list, int, int]:
    """Detect faces in every frame, then track them: (tracks, frames seen, frames with a detection)."""
    from musetalk.quality.track import track_faces

    per_frame = [detect(frame, i) for i, frame in enumerate(frames)]
    tracks = track_faces(per_frame, config)
    return tracks, len(per_frame), sum(bool(d) for d in per_frame)


def measure_mouth(video: str | os.PathLike, wav: np.ndarray, backend_name: str, device: Any) -> dict[str, Any]:
    """Mouth motion on silence (:mod:`musetalk.quality.mouth`) from landmarks of every frame at 25 fps."""
    from musetalk.quality.media import iter_frames_bgr
    from musetalk.quality.mouth import mouth_motion, mouth_opening, silent_frames

    backend = _landmark_backend(backend_name, device)
    missing = np.full((68, 2), np.nan)
    marks = [found.landmarks if found.landmarks is not None else missing
             for found in (backend.detect(frame) for frame in iter_frames_bgr(video, FPS))]
    if not marks:
        raise InputError(f"{video} has no frames", "give a video with frames")
    motion = mouth_motion(mouth_opening(np.stack(marks)), silent_frames(wav, len(marks), FPS, SAMPLE_RATE))
    return {**motion.to_dict(), "landmarks": backend_name}


# --------------------------------------------------------------------------------------------------------------
# scoring


def _fit_224(frames: Iterable[np.ndarray], size: int, notes: list[str]) -> Iterator[np.ndarray]:
    import cv2

    for frame in frames:
        if frame.shape[:2] != (size, size):
            if not notes or "resized" not in notes[-1]:
                notes.append(f"frames of {frame.shape[1]}x{frame.shape[0]} resized to {size}x{size} (crop none)")
            frame = cv2.resize(frame, (size, size))
        yield frame


def _count(frames: Iterable[np.ndarray], counter: list[int]) -> Iterator[np.ndarray]:
    for frame in frames:
        counter[0] += 1
        yield frame


def score_frames(scorer: "SyncNetScorer", frames: Iterable[np.ndarray], audio: np.ndarray, vshift: int,
                 controls: bool) -> tuple["SyncScore", dict[str, tuple[float, float, int]], int]:
    """Score 224x224 BGR frames against audio; also the control scores when asked. Returns (score, controls, n)."""
    from musetalk.quality.syncnet import check_lengths, sync_scores

    counter = [0]
    lips = scorer.embed_lips(_count(frames, counter))
    n = check_lengths(counter[0], len(audio))
    lips = lips[:n]
    score = sync_scores(lips, scorer.embed_audio(audio, n), vshift)
    extra: dict[str, tuple[float, float, int]] = {}
    if controls:
        for name, control in control_audio(audio).items():
            s = sync_scores(lips, scorer.embed_audio(control, n), vshift)
            extra[name] = (s.lse_d, s.lse_c, s.offset)
    return score, extra, counter[0]


def control_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, np.ndarray]:
    """Control tracks of the same length: speech rotated by one second (circularly) and digital silence.

    Rotating keeps the same speech (same MFCC statistics) but moves every syllable 25 frames away from its
    lips, outside the +-15 frames searched; silence gives constant MFCCs.
    """
    shift = int(CONTROL_SHIFT_SECONDS * sample_rate)
    return {"shifted_1s": np.roll(audio, shift), "silence": np.zeros_like(audio)}


def evaluate_video(video: str | os.PathLike, audio: str | os.PathLike | None = None,
                   syncnet_path: str | os.PathLike | None = None, crop: str = "s3fd", controls: bool = False,
                   device: str = "auto", config: EvaluateConfig = EvaluateConfig(),
                   sfd_path: str | os.PathLike | None = None, scorer: "SyncNetScorer | None" = None,
                   mouth: bool = False) -> LSEResult:
    """LSE-D / LSE-C / offset of ``video`` (see the module docstring for the steps).

    video: any file PyAV opens. audio: speech to score against (default: the video's own track).
    syncnet_path: ``syncnet_v2.model`` (default ``$MUSETALK_SYNCNET`` or ``<models>/syncnet/syncnet_v2.model``).
    crop: "s3fd" (reference), "landmarks" (landmark backend's face box), "none" (frames are face crops),
    "auto" (s3fd when ``sfd_face.pth`` is present, else landmarks). sfd_path: like syncnet_path
    (``$MUSETALK_SFD``). scorer: an already loaded :class:`SyncNetScorer` (then syncnet_path and device are unused).
    mouth: also measure mouth motion on silence with the landmark backend (``config.landmark_backend``).
    Raises InputError (no audio, clip too short, unreadable file), NoFaceError (no face track), WeightsError.
    """
    from musetalk.quality.media import probe_video, read_audio

    # 1. inputs and weights
    info = probe_video(video)
    if audio is None and not info.has_audio:
        raise InputError(f"{video} has no audio track", "pass the speech with --audio speech.wav")
    wav = read_audio(audio if audio is not None else video, SAMPLE_RATE)
    sfd = default_weights(SFD_FILE, sfd_path, "MUSETALK_SFD")
    crop = resolve_crop(crop, sfd)
    if scorer is None:
        from musetalk.quality.syncnet import SyncNetScorer

        path = _check_weights(default_weights(SYNCNET_FILE, syncnet_path, "MUSETALK_SYNCNET"), "SyncNet", "--syncnet")
        scorer = SyncNetScorer.from_pretrained(path, device=device, batch_size=config.batch_size)
    notes: list[str] = []
    if info.fps and abs(info.fps - FPS) > 1e-3:
        notes.append(f"video resampled from {info.fps:.3f} to {FPS} fps (nearest earlier frame)")

    result = _score_video(video, wav, crop, scorer, config, sfd, controls, notes)
    if mouth:
        result.mouth = measure_mouth(video, wav, config.landmark_backend, scorer.device)
    return result


def _score_video(video: str | os.PathLike, wav: np.ndarray, crop: str, scorer: "SyncNetScorer",
                 config: EvaluateConfig, sfd: Path, controls: bool, notes: list[str]) -> LSEResult:
    """Steps 2-4: frames -> crops -> scores."""
    from musetalk.quality.media import iter_frames_bgr

    if crop == "none":
        report: dict = {}
        frames = _fit_224(iter_frames_bgr(video, FPS, jpeg_step=config.jpeg_step, report=report), config.crop.size,
                          notes)
        score, extra, n_frames = score_frames(scorer, frames, wav, config.vshift, controls)
        replicates = bool(config.jpeg_step and report.get("jpeg_exact")) and not notes
        if not config.jpeg_step:
            notes.append("JPEG step skipped: expect LSE-D ~0.3 % and LSE-C ~1 % off the reference")
        track = TrackScore(0, n_frames - 1, score.lse_d, score.lse_c, score.offset, score.frame_confidence)
        return LSEResult(str(video), score.lse_d, score.lse_c, score.offset, score.frame_confidence,
                         score.mean_dists, "none", replicates, extra, n_frames, float(FPS), [track], notes)
    return _evaluate_tracks(video, wav, crop, scorer, config, sfd, controls, notes)


def _evaluate_tracks(video: str | os.PathLike, wav: np.ndarray, crop: str, scorer: "SyncNetScorer",
                     config: EvaluateConfig, sfd: Path, controls: bool, notes: list[str]) -> LSEResult:
    """Steps 2-4 with a face detector: detect + track (pass 1), then crop + score each track (pass 2 per track)."""
    from musetalk.quality.media import FfmpegJpegStep, iter_frames_bgr
    from musetalk.quality.syncnet import SAMPLES_PER_FRAME
    from musetalk.quality.track import iter_track_crops, smooth_track

    if crop == "s3fd":
        detect = _s3fd_detector(_check_weights(sfd, "S3FD face detector", "--sfd"), scorer.device, config)
        detector = "s3fd"
    else:
        detect = _landmark_detector(config.landmark_backend, scorer.device)
        detector = f"landmarks:{config.landmark_backend}"
    tracks, n_frames, n_found = detect_tracks(iter_frames_bgr(video, FPS), detect, config.track)
    if not tracks:
        t = config.track
        raise NoFaceError(
            f"no face track in {video}: faces found in {n_found} of {n_frames} frames, but a track needs more than "
            f"{t.min_track} detections of a face larger than {t.min_face_size:g} px, with gaps of at most "
            f"{t.num_failed_det} frames",
            "use a longer clip (over 4 s), lower TrackConfig.min_track (--min-track), or --crop none for "
            "videos that are already 224x224 face crops")
    notes.append("no shot detection: the video is treated as one shot")
    notes.append("crops scored without the reference's XVID re-encoding")
    scored: list[tuple[TrackScore, "SyncScore", dict]] = []
    for track in tracks:
        smooth = smooth_track(track, config.crop)
        crops: Iterable[np.ndarray] = iter_track_crops(iter_frames_bgr(video, FPS), smooth, config.crop)
        if config.jpeg_step:
            step = FfmpegJpegStep(FPS)
            crops = (step.bgr(c) for c in crops)
        first, last = int(track.frames[0]), int(track.frames[-1])
        audio = wav[first * SAMPLES_PER_FRAME:(last + 1) * SAMPLES_PER_FRAME]
        try:
            score, extra, _ = score_frames(scorer, crops, audio, config.vshift, controls)
        except InputError as exc:  # a track shorter than the audio window: skip it, keep the others
            notes.append(f"track {first}-{last} not scored: {exc.message}")
            continue
        scored.append((TrackScore(first, last, score.lse_d, score.lse_c, score.offset, score.frame_confidence),
                       score, extra))
    if not scored:
        raise NoFaceError(f"no face track of {video} could be scored", "see the notes; use a longer clip")
    main, score, extra = max(scored, key=lambda s: s[0].last_frame - s[0].first_frame)
    return LSEResult(str(video), score.lse_d, score.lse_c, score.offset, score.frame_confidence, score.mean_dists,
                     detector, False, extra, n_frames, float(FPS), [s[0] for s in scored], notes)
