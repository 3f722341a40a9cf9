"""The streaming pipeline: prepare a source once, then stream lip-synced frames for any audio.

    pipe = MuseTalkPipeline.from_pretrained("models", version="v15", device="auto", dtype="auto")
    avatar = pipe.prepare_avatar("face.mp4", config)            # once per source (cached on disk by name)
    for frame in pipe.stream(avatar, "speech.wav", config): ... # (H, W, 3) uint8 BGR frames, in order
    pipe.generate("face.mp4", "speech.wav", "out.mp4", config)  # stream -> H.264 + AAC, atomically

Memory stays flat in the length of the audio and of the source: frames flow through generators and
bounded queues; per-source-frame work (landmarks, crop, latents, mask) is stored on disk by the avatar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Generator, Iterable, Iterator, NamedTuple

import numpy as np
import torch

from musetalk.stages import audio as audio_stage
from musetalk.stream import pauses
from musetalk.stream.avatar import Avatar, AvatarMeta, AvatarWriter, avatar_key, cache_root, check_avatar_name, \
    hash_source, load_avatar
from musetalk.stream.leftovers import Hold, held_temp_dir
from musetalk.stream.paths import check_output_not_input
from musetalk.config import GenerationConfig, preset
from musetalk.devices import freed_blocks_kept_in_heap, release_free_memory, resolve_device, resolve_dtype
from musetalk.errors import InputError, NoFaceError, WeightsError
from musetalk.hooks import ProgressBars, RunHooks, check_cancelled, combine
from musetalk.weights import DOWNLOAD_HINT, default_models_dir, layout

if TYPE_CHECKING:
    from musetalk.stream.live import LiveConfig, LiveSession
    from musetalk.stages.audio import AudioEncoder
    from musetalk.stages.faces.smoothing import BoxSmoother
    from musetalk.stages.faces.types import FaceLandmarks, LandmarkBackend
    from musetalk.stages.mlx.unet import MLXUNet
    from musetalk.stages.mlx.vae import MLXVAE
    from musetalk.stages.parsing import FaceParser
    from musetalk.stages.silence import SilencePlan, SileroVAD
    from musetalk.stages.unet import UNet
    from musetalk.stages.vae import VAE

log = logging.getLogger(__name__)

Stage = Callable[[str], ContextManager[object]]  # a run's stage timer: ``with stage("unet"): ...``
# (source frame per output frame, rows with a face, (len(rows), 256, 256, 3) uint8 BGR faces or None)
PredictedBatch = tuple[list[int], list[int], np.ndarray | None]
_SENTINEL = object()


def pingpong(index: int, num_source_frames: int) -> int:
    """Source frame of output frame ``index``: the source cycled forward then backward (reference rule)."""
    if num_source_frames == 1:
        return 0
    j = index % (2 * num_source_frames)
    return j if j < num_source_frames else 2 * num_source_frames - 1 - j


def _box_smoother(config: GenerationConfig, fps: float) -> BoxSmoother | None:
    """The crop-box smoother of a preparation (musetalk/stages/faces/smoothing.py), or None when it is off."""
    if config.crop.smoothing == "off":
        return None
    from musetalk.stages.faces.smoothing import BoxSmoother

    return BoxSmoother(fps, config.crop.smoothing_min_cutoff, config.crop.smoothing_beta)


def _put_unless_stopped(out: queue.Queue, item: object, stop: threading.Event) -> None:
    """Block on a full queue only while the consumer is still there (it sets ``stop`` when it leaves)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class SourceFrame(NamedTuple):
    """One source frame after the CPU part of preparation (crops None: no face)."""

    frame: np.ndarray  # (H, W, 3) uint8 BGR
    landmarks: np.ndarray | None  # (68, 2) int32
    face_box: tuple[int, int, int, int] | None  # with the extra margin
    crop: np.ndarray | None  # (256, 256, 3) uint8 BGR, the VAE's input
    parser_crop: np.ndarray | None  # (2s, 2s, 3) uint8 RGB, the expanded crop the parser sees


def prepare_source_frame(frame: np.ndarray, detection: FaceLandmarks, config: GenerationConfig,
                         smoother: BoxSmoother | None = None) -> SourceFrame:
    """The CPU part of preparing one source frame, the one definition ``prepare_avatar`` and the bbox_shift tuner use:
    the crop box from the landmarks (``bbox_shift``; smoothed over time when a ``smoother`` is given), the extra
    margin, the 256x256 crop the VAE encodes and the expanded crop the face parser sees."""
    from musetalk.stages.blending import parser_input
    from musetalk.stages.faces.crop import apply_extra_margin, crop_box, crop_face

    box = (crop_box(detection.landmarks, config.crop.bbox_shift, detection.detector_box)
           if detection.landmarks is not None else None)
    if smoother is not None:
        box = smoother(box)
    if box is None:
        return SourceFrame(frame, None, None, None, None)
    face_box = apply_extra_margin(box, config.crop.extra_margin, frame.shape[0])
    return SourceFrame(frame, detection.landmarks, face_box, crop_face(frame, face_box),
                       parser_input(frame, face_box, config.blend.expand))


def _in_background(items: Iterable[Any], maxsize: int, name: str) -> Generator[Any, None, None]:
    """Run the iterator ``items`` in a thread, ``maxsize`` items ahead; its errors are raised here, in order.

    Closing the generator stops the thread (at its next item).
    """
    out: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                _put_unless_stopped(out, item, stop)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            _put_unless_stopped(out, exc, stop)
            return
        _put_unless_stopped(out, _SENTINEL, stop)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _SENTINEL:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=30)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _face_parts(item: SourceFrame) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """(face box, VAE crop, parser crop) of a source frame with a face."""
    assert item.face_box is not None and item.crop is not None and item.parser_crop is not None
    return item.face_box, item.crop, item.parser_crop


def _write_chunk(writer: AvatarWriter, chunk: list[SourceFrame], materials: list[Any], latents: np.ndarray) -> None:
    """Frames, masks and latents of one chunk into the avatar folder (the writer thread's job, in order)."""
    for item, material in zip(chunk, materials):
        if material is None:
            writer.add_frame(item.frame, None, None, None, None)
        else:
            writer.add_frame(item.frame, item.landmarks, item.face_box, material.mask, material.crop_box)
    writer.add_latents(latents)


@dataclass(frozen=True)
class GenerationResult:
    """What ``generate`` made."""

    path: Path
    num_frames: int
    fps: float
    seconds: float  # wall time of the whole call
    avatar: str  # avatar folder used


class MuseTalkPipeline:
    """Audio encoder + VAE + UNet + face parser, loaded once; landmark backends built on first use."""

    def __init__(self, audio_encoder: AudioEncoder, vae: VAE | MLXVAE, unet: UNet | MLXUNet, parser: FaceParser, *,
                 version: str = "v15", models_dir: Path | None = None,
                 landmarker_factory: Callable[[str], LandmarkBackend] | None = None,
                 keep_landmarkers: bool = False) -> None:
        """``keep_landmarkers``: keep the landmark backends that :meth:`prepare_avatar` built once it is done. By
        default they are dropped and built again by the next preparation (dlib: 70 MB held, ~2 s to build): a
        one-shot run does not carry them through generation, where they are never used. Front ends that
        prepare many avatars in one process (server, batch) keep them."""
        self.audio_encoder = audio_encoder
        self.vae = vae
        self.unet = unet
        self.parser = parser
        self.version = version
        self.models_dir = Path(models_dir) if models_dir else None
        self.device = unet.device
        self.dtype = unet.dtype
        self._landmarker_factory = landmarker_factory
        self._landmarkers: dict[str, LandmarkBackend] = {}
        self.keep_landmarkers = keep_landmarkers
        self._vad: SileroVAD | None = None  # voice-activity detector (silence handling), built on first use
        # on the CPU the activations live in the C heap: its free pages go back after each batch of the stream
        # (no creep) and once after preparing an avatar
        self._release_heap_per_batch = torch.device(self.device).type == "cpu"

    @classmethod
    def from_pretrained(cls, models_dir: str | os.PathLike | None = None, version: str = "v15",
                        device: str = "auto", dtype: str | torch.dtype = "auto",
                        backend: str = "auto", hooks: RunHooks | None = None,
                        profiler: RunHooks | None = None, keep_landmarkers: bool = False) -> "MuseTalkPipeline":
        """Load every model from an official ``models/`` folder; device/dtype/backend resolved here, once.

        ``backend``: torch | mlx | auto (MLX on Apple Silicon when installed): which implementation runs the UNet
        and the VAE; the audio encoder and the face parser are torch models on ``device`` either way.
        Each model is built empty and filled from its memory-mapped file in the run dtype (see
        ``musetalk.weights.loading``); with ``hooks`` (or ``profiler``), each load is timed as the stage "load".
        ``keep_landmarkers``: see the class (False: landmark models are dropped after each preparation).
        """
        from musetalk.stages.audio import AudioEncoder
        from musetalk.stages.mlx import resolve_backend
        from musetalk.stages.parsing import FaceParser

        vae_class: type[VAE | MLXVAE]
        unet_class: type[UNet | MLXUNet]
        if resolve_backend(backend) == "mlx":
            from musetalk.stages.mlx.unet import MLXUNet as unet_class
            from musetalk.stages.mlx.vae import MLXVAE as vae_class
        else:
            from musetalk.stages.unet import UNet as unet_class
            from musetalk.stages.vae import VAE as vae_class

        models = Path(models_dir) if models_dir is not None else default_models_dir()
        parts = layout(version)
        missing = [f for f in parts.required_files() if not (models / f).is_file()]
        unet_file = models / parts.unet_dir / parts.unet_weights
        if missing:
            raise WeightsError(f"weights for {version} are incomplete in {models}: missing {', '.join(missing)}",
                               DOWNLOAD_HINT.format(models=models))
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        log.info("loading MuseTalk %s from %s on %s (%s), UNet + VAE on %s", version, models, dev, dt,
                 getattr(unet_class, "backend", "torch"))
        stage = combine(hooks, profiler).stage
        # Whisper and the face parser run once per segment / source frame: keep them in fp32 for exactness
        with stage("load"):
            audio_encoder = AudioEncoder.from_pretrained(models / parts.whisper_dir, device=dev)
        with stage("load"):
            vae = vae_class.from_pretrained(models / parts.vae_dir, device=dev, dtype=dt)
        with stage("load"):
            unet = unet_class.from_pretrained(models / parts.unet_config, unet_file, device=dev, dtype=dt)
        with stage("load"):
            parser = FaceParser.from_pretrained(models / parts.face_parse, device=dev)
        return cls(audio_encoder, vae, unet, parser, version=version, models_dir=models,
                   keep_landmarkers=keep_landmarkers)

    # -- helpers -------------------------------------------------------------------------------------------
    def landmarker(self, name: str) -> LandmarkBackend:
        """The landmark backend ``name``, built once per pipeline."""
        if name not in self._landmarkers:
            if self._landmarker_factory is not None:
                self._landmarkers[name] = self._landmarker_factory(name)
            else:
                from musetalk.stages.faces import get_landmark_backend

                kwargs = {"models_dir": self.models_dir} if name == "dwpose" and self.models_dir else {}
                self._landmarkers[name] = get_landmark_backend(name, device=str(self.device), **kwargs)
        return self._landmarkers[name]

    def _drop_landmarkers(self) -> None:
        """After a preparation: the landmark models go, unless the pipeline keeps them (``keep_landmarkers``)."""
        if not self.keep_landmarkers:
            self._landmarkers.clear()

    def vad(self) -> SileroVAD:
        """The voice-activity detector of the silence handling (CPU, shipped with silero-vad), built once."""
        if self._vad is None:
            from musetalk.stages.silence import SileroVAD

            self._vad = SileroVAD.from_pretrained()
        return self._vad

    def default_config(self, **overrides: object) -> GenerationConfig:
        """The reference preset of this pipeline's version, with overrides."""
        return preset(self.version, **overrides)

    def _avatar_settings(self, config: GenerationConfig, fps: float) -> dict:
        """Everything besides the source that changes what an avatar stores: the latents depend on the VAE's
        weights and dtype, the masks on the parser's weights."""
        weights = {"vae": self.vae.fingerprint, "vae_dtype": str(self.vae.dtype), "parser": self.parser.fingerprint}
        return {"crop": asdict(config.crop), "blend": asdict(config.blend), "fps": fps, "weights": weights}

    # -- 1. prepare ----------------------------------------------------------------------------------------
    def prepare_avatar(self, source: str | os.PathLike, config: GenerationConfig | None = None,
                       name: str | None = None, force: bool = False, progress: bool = False,
                       hooks: RunHooks | None = None, profiler: RunHooks | None = None) -> Avatar:
        """Landmarks, crop, latents and paste-back mask of every source frame, stored on disk.

        With ``name`` the avatar lands in the shared cache (``cache_root()/avatars/name``) and is reused while
        the source content and settings are unchanged; without it, in a temporary folder that the returned Avatar
        owns (removed by ``avatar.close()``, a ``with`` block, garbage collection or interpreter exit).
        Raises NoFaceError when no frame has a face, :class:`~musetalk.errors.Cancelled` when ``hooks`` cancel.
        ``hooks`` (or its older name ``profiler``) are the run's :mod:`musetalk.hooks`.
        """
        from musetalk.stages.parsing import check_mode
        from musetalk.stream.video import open_frames

        config = (config or self.default_config()).validate()
        source = Path(source)
        frames = open_frames(source)  # raises InputError for missing / unreadable sources
        fps = float(frames.fps or config.fps)
        settings = self._avatar_settings(config, fps)
        key = avatar_key(hash_source(source), settings)
        check_mode(config.blend.parsing_mode)  # before any work
        if name is not None:
            path = cache_root() / "avatars" / check_avatar_name(name)
            existing = None if force else load_avatar(path, key)
            if existing is not None:
                log.info("reusing avatar %s (%d frames)", name, len(existing))
                return existing
            preparing: Hold | None = None
        else:  # held until the Avatar holds it; what killed runs left there goes first
            folder, preparing = held_temp_dir("musetalk-avatar-")
            path = folder / "avatar"
        try:
            landmarker = self.landmarker(config.crop.landmarks)
            writer = AvatarWriter(path)
        except BaseException:  # no landmark model, an unwritable cache: no empty temporary folder left either
            if preparing is not None:
                preparing.release()
                shutil.rmtree(path.parent, ignore_errors=True)
            raise
        bars = ProgressBars() if progress else None
        run = combine(hooks, profiler, bars)
        stage = run.stage
        smoother = _box_smoother(config, fps)  # None: boxes follow each frame's landmarks (the reference)
        batch = max(1, config.runtime.batch_size)
        counts = {"faces": 0, "frames": 0}
        size = [0, 0]  # (width, height) of the source frames
        total = frames.num_frames or None
        # 1. decode + landmarks + crops in a thread, 2. parser + VAE here, in batches, 3. disk writes in a thread:
        # the CPU work overlaps the model work as in `stream` (bounded queues: memory stays flat in the length)
        disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="musetalk-avatar-writer")
        pending: deque[Future] = deque()
        try:
            run.progress("prepare", 0, total)
            items = _in_background(self._source_items(frames, landmarker, config, stage, smoother, run),
                                   maxsize=2 * batch, name="musetalk-avatar-reader")
            # on the CPU the models' large activations are reused from the heap, not faulted in on every call
            heap = freed_blocks_kept_in_heap() if self._release_heap_per_batch else contextlib.nullcontext()
            try:
                with heap:
                    for chunk in _chunks(items, batch):
                        check_cancelled(run)
                        size[:] = chunk[0].frame.shape[1], chunk[0].frame.shape[0]
                        masks, latents = self._prepare_models(chunk, config, stage)
                        counts["frames"] += len(chunk)
                        counts["faces"] += sum(item.face_box is not None for item in chunk)
                        pending.append(disk.submit(_write_chunk, writer, chunk, masks, latents))
                        while len(pending) > 2:  # at most two chunks of frames waiting for the disk
                            pending.popleft().result()
                        run.progress("prepare", counts["frames"], total)
            finally:
                items.close()
            while pending:
                pending.popleft().result()
            disk.shutdown(wait=True)
            del items, landmarker
            self._drop_landmarkers()
            self.vae.release_encoder_pages()  # the stream only decodes; the next preparation reads them back
            if self._release_heap_per_batch:  # what preparation freed does not wait in the heap through the stream
                release_free_memory()
            if counts["faces"] == 0:
                raise NoFaceError(f"no face found in any frame of {source}",
                                  "use a source where one face is clearly visible (frontal, not too small)")
            meta = AvatarMeta(key=key, source=str(source), num_frames=len(writer.has_face), fps=fps, width=size[0],
                              height=size[1], faces=counts["faces"], settings=settings, created=time.time())
            return writer.commit(meta, owned_dir=path.parent if name is None else None)
        except BaseException:
            disk.shutdown(wait=True, cancel_futures=True)  # nothing writes into the folder once it is removed
            self._drop_landmarkers()
            writer.abort()
            if name is None:
                shutil.rmtree(path.parent, ignore_errors=True)
            raise
        finally:
            if preparing is not None:
                preparing.release()
            if bars is not None:
                bars.close()

    @staticmethod
    def _source_items(frames: Iterable[np.ndarray], landmarker: LandmarkBackend, config: GenerationConfig,
                      stage: Stage, smoother: BoxSmoother | None, run: RunHooks) -> Iterator[SourceFrame]:
        """Per source frame, landmarks then :func:`prepare_source_frame` (crop box, VAE crop, parser crop)."""
        for frame in frames:
            check_cancelled(run)
            with stage("landmarks"):
                result = landmarker.detect(frame)
            with stage("crop"):
                item = prepare_source_frame(frame, result, config, smoother)
            yield item  # outside the stage: the time the consumer takes to ask for the next one is not the crop's

    def _prepare_models(self, chunk: list[SourceFrame], config: GenerationConfig, stage: Stage
                        ) -> tuple[list[Any], np.ndarray]:
        """Parser + VAE encoder on the faces of ``chunk``: paste-back materials (None: no face) and (k, 8, 32, 32)."""
        from musetalk.stages.blending import material_from_parsing

        faced = [k for k, item in enumerate(chunk) if item.face_box is not None]
        materials: list[Any] = [None] * len(chunk)
        latents = np.zeros((len(chunk), 8, 32, 32), np.float32)
        if not faced:
            return materials, latents
        blend = config.blend
        parts = [_face_parts(chunk[k]) for k in faced]
        with stage("parsing"):
            crops = [parser_crop for _, _, parser_crop in parts]
            parse_batch = getattr(self.parser, "parse_batch", None)
            maps = parse_batch(crops) if parse_batch is not None else [self.parser.parse(c) for c in crops]
            for k, (face_box, _, _), parsing in zip(faced, parts, maps):
                materials[k] = material_from_parsing(parsing, face_box, blend)
        with stage("vae_encode"):
            latents[faced] = self.vae.unet_input(np.stack([crop for _, crop, _ in parts])).numpy()
        return materials, latents

    # -- 2. stream -----------------------------------------------------------------------------------------
    def _predict_batches(self, avatar: Avatar, wav: np.ndarray, batch_size: int, stop: threading.Event,
                         out: queue.Queue, stage: Stage, plan: SilencePlan | None = None) -> None:
        """Producer thread: UNet + VAE decode per batch of output frames -> (source indices, faces)."""
        try:
            fps = avatar.meta.fps
            n_out = audio_stage.num_video_frames(len(wav), fps)
            windows = audio_stage.iter_frame_windows(self.audio_encoder, wav, audio_stage.AudioConfig(fps=fps))
            for start in range(0, n_out, batch_size):
                if stop.is_set():
                    return
                count = min(batch_size, n_out - start)
                with stage("audio"):
                    batch_windows = np.stack([next(windows) for _ in range(count)])
                generated = plan.generated if plan is not None else None
                _put_unless_stopped(out, self._predict_batch(avatar, start, batch_windows, stage, generated), stop)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            _put_unless_stopped(out, exc, stop)
            return
        _put_unless_stopped(out, _SENTINEL, stop)

    def _predict_batch(self, avatar: Avatar, start: int, batch_windows: np.ndarray, stage: Stage,
                       generated: np.ndarray | None = None) -> PredictedBatch:
        """UNet + VAE decode of output frames ``start..`` from their (B, 50, 384) audio windows.

        Returns (source index per frame, rows with a face, (len(rows), 256, 256, 3) uint8 BGR faces or None).
        ``generated`` (per output frame, from the silence plan) leaves out frames shown without a generated face.
        Shared by ``stream`` and live sessions (``musetalk.stream.live``).
        """
        sources = [pingpong(i, len(avatar)) for i in range(start, start + len(batch_windows))]
        rows = [k for k, s in enumerate(sources) if avatar.has_face[s]
                and (generated is None or generated[start + k])]  # silent frames skip the models
        faces = None
        if rows:
            latents = torch.from_numpy(np.stack([avatar.latents[sources[k]] for k in rows]))
            with stage("unet"):
                predicted = self.unet(latents, torch.from_numpy(batch_windows[rows]))
            with stage("vae_decode"):
                faces = self.vae.decode(predicted)
            del latents, predicted
            if self._release_heap_per_batch:
                release_free_memory()
        return sources, rows, faces

    @staticmethod
    def _compose_frames(avatar: Avatar, batch: PredictedBatch, frame_of: Callable[[int], np.ndarray],
                        mask_of: Callable[[int], np.ndarray], stage: Stage) -> Generator[np.ndarray, None, None]:
        """Paste one predicted batch back into its source frames; yields (H, W, 3) uint8 BGR frames in order.
        Shared by ``stream`` and live sessions."""
        from musetalk.stages.blending import BlendMaterial, blend_with_material

        sources, rows, faces = batch
        face_of_row = {k: j for j, k in enumerate(rows)}
        for k, s in enumerate(sources):
            frame = frame_of(s)
            if k in face_of_row:
                with stage("blend"):
                    x1, y1, x2, y2 = (int(v) for v in avatar.mask_boxes[s])
                    material = BlendMaterial(mask=mask_of(s), crop_box=(x1, y1, x2, y2))
                    face_box = avatar.face_box(s)
                    assert faces is not None and face_box is not None  # rows are the predicted face frames
                    frame = blend_with_material(frame, faces[face_of_row[k]], face_box, material)
            yield frame

    def stream(self, avatar: Avatar, audio: str | os.PathLike | np.ndarray, config: GenerationConfig | None = None,
               hooks: RunHooks | None = None, profiler: RunHooks | None = None) -> Generator[np.ndarray, None, None]:
        """Yield the lip-synced frames ((H, W, 3) uint8 BGR) for ``audio``, one per 1/fps of audio.

        Model compute runs one batch ahead in a worker thread (bounded queue of 2 batches) while this
        generator blends and its consumer encodes. Frames without a face are the source frames, untouched.
        ``hooks`` (or ``profiler``) see every stage and frame; when they cancel, the generator raises
        :class:`~musetalk.errors.Cancelled` before the next frame.
        """
        config = (config or self.default_config()).validate()
        wav = audio if isinstance(audio, np.ndarray) else audio_stage.load_audio(audio)
        audio_stage.check_speech(wav, avatar.meta.fps, source=str(audio) if not isinstance(audio, np.ndarray) else "audio")
        run = combine(hooks, profiler)
        stage = run.stage
        n_out = audio_stage.num_video_frames(len(wav), avatar.meta.fps)
        frame_of = lru_cache(maxsize=4)(avatar.frame)  # an image source is read once, not once per frame
        mask_of = lru_cache(maxsize=4)(avatar.mask)
        plan = pauses.plan_for(self.vad, avatar, wav, config, stage)  # None: silence off, every frame generated
        shown = pauses.PauseFrames(plan, avatar, frame_of, mask_of) if plan is not None else None
        stop = threading.Event()
        batches: queue.Queue = queue.Queue(maxsize=2)
        worker = threading.Thread(target=self._predict_batches, name="musetalk-models", daemon=True,
                                  args=(avatar, wav, config.runtime.batch_size, stop, batches, stage, plan))
        worker.start()
        try:
            run.progress("generate", 0, n_out)
            done = 0  # output frames so far: the next frame's index
            while True:
                check_cancelled(run)
                item = batches.get()
                if item is _SENTINEL:
                    break
                if isinstance(item, BaseException):
                    raise item
                for k, frame in enumerate(self._compose_frames(avatar, item, frame_of, mask_of, stage)):
                    if shown is not None and shown.plan.weights[done] < 1:
                        with stage("silence"):
                            frame = shown.show(done, item[0][k], frame)
                    check_cancelled(run)
                    run.frame_done()
                    done += 1
                    run.progress("generate", done, n_out)
                    yield frame
        finally:
            stop.set()
            worker.join(timeout=30)

    # -- 2b. live -----------------------------------------------------------------------------------------------
    def live(self, avatar: Avatar, config: GenerationConfig | None = None, options: "LiveConfig | None" = None,
             hooks: RunHooks | None = None, profiler: RunHooks | None = None) -> "LiveSession":
        """A live session on ``avatar``: ``feed(pcm)`` audio as it is spoken, iterate frames as they are made.

        ``options`` is a :class:`musetalk.stream.live.LiveConfig` (look-ahead, buffers, lateness). ``hooks`` (or
        ``profiler``) see every stage and frame, and get each frame's latency when they have ``frame_latency``.
        """
        from musetalk.stream.live import LiveSession

        return LiveSession(self, avatar, (config or self.default_config()).validate(), options, hooks, profiler)

    # -- 3. generate ---------------------------------------------------------------------------------------
    @staticmethod
    def check_inputs(source: str | os.PathLike, audio: str | os.PathLike, output: str | os.PathLike) -> None:
        """Fail fast, before any work, on inputs that cannot work."""
        source, audio, output = Path(source), Path(audio), Path(output)
        if not source.exists():
            raise InputError(f"source not found: {source}", "pass an image, a video or a folder of frames")
        if not audio.is_file():
            raise InputError(f"audio file not found: {audio}", "check the --audio path")
        if output.suffix.lower() != ".mp4":
            raise InputError(f"output must be an .mp4 file, got {output.name!r}", "e.g. --output out.mp4")
        if output.is_dir():
            raise InputError(f"output {output} is a folder", "name a file, e.g. out.mp4")
        parent = output.resolve().parent
        if not parent.is_dir():
            raise InputError(f"output folder {parent} does not exist", f"create it: mkdir -p {parent}")
        if not os.access(parent, os.W_OK):
            raise InputError(f"cannot write to {parent}", "choose a writable output folder")
        check_output_not_input(output, {"source": source, "audio": audio})  # else the rename would replace it

    def generate(self, source: str | os.PathLike, audio: str | os.PathLike, output: str | os.PathLike,
                 config: GenerationConfig | None = None, avatar: str | None = None, progress: bool = True,
                 hooks: RunHooks | None = None, profiler: RunHooks | None = None) -> GenerationResult:
        """Source + audio -> lip-synced mp4 (H.264 yuv420p crf 18 + AAC), written atomically.

        The one generation path: the CLI, the server, batch runs and the notebooks all come here. ``hooks`` (or
        ``profiler``) watch and may cancel the run (:mod:`musetalk.hooks`); ``progress`` adds tqdm bars.
        On any exception (cancel included) no output file is left behind.
        """
        from musetalk.stream.video import VideoWriter

        started = time.perf_counter()
        config = (config or self.default_config()).validate()
        self.check_inputs(source, audio, output)
        wav = audio_stage.load_audio(audio)  # decode errors surface before the (slow) preparation
        bars = ProgressBars() if progress else None
        run = combine(hooks, profiler, bars)
        prepared = self.prepare_avatar(source, config, name=avatar, hooks=run)
        try:
            audio_stage.check_speech(wav, prepared.meta.fps, source=str(audio))
            frames = self.stream(prepared, wav, config, hooks=run)
            written = 0
            try:
                with VideoWriter(output, fps=prepared.meta.fps, audio=audio) as writer:
                    for frame in frames:
                        with run.stage("encode"):
                            writer.write(frame)
                        written += 1
                    check_cancelled(run)  # a cancel during the last frames' encoding: no output committed either
            finally:
                frames.close()  # stops the model thread now, also when the writer failed
        finally:
            prepared.close()  # a temporary avatar goes now; a named one stays in the cache
            if bars is not None:
                bars.close()
        return GenerationResult(Path(output), written, prepared.meta.fps, time.perf_counter() - started,
                                str(prepared.path) if avatar else "(temporary)")
