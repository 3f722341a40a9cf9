"""Interactive notebook widgets: a bbox_shift tuner and a live generation dashboard.

    tuner = BboxShiftTuner.from_pipeline(pipe, "face.mp4", config)   # landmarks of every shown frame, once
    tuner                                                             # sliders + frame / crop / mask views
    config = tuner.config_with_choice()                               # or tuner.bbox_shift

    dash = LiveDashboard(Profiler(device=pipe.device), total=n_frames, every=10)
    dash                                                              # progress, fps and memory plots
    with dash:
        pipe.generate(src, wav, "out.mp4", config, profiler=dash)     # the pipeline's own profiler hooks drive it

ipywidgets is imported only when a widget is first shown or driven (it is an optional dependency, G8). Everything
a widget draws comes from ``musetalk.frontends.notebook.viz``; the state (landmarks, chosen values, reports) is plain Python, so a test
or a script can drive a widget without a browser.
"""

from __future__ import annotations

import base64
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from musetalk.frontends.notebook import viz
from musetalk.errors import InputError
from musetalk.hooks import Hooks

if TYPE_CHECKING:
    from musetalk.stages.blending import BlendMaterial
    from musetalk.config import GenerationConfig
    from musetalk.stages.faces.types import Box, FaceLandmarks, LandmarkBackend
    from musetalk.profiling import Profiler, ProfileReport
    from musetalk.stream.pipeline import SourceFrame

MAX_TUNER_FRAMES = 32  # frames a tuner keeps from a video (evenly spaced); each is held as a PNG (~0.3-3 MB)
MATERIAL_CACHE = 16  # blend masks kept per tuner: one BiSeNet pass (~0.5 s on a CPU) per (frame, box) otherwise


def _sample_frames(source: str | os.PathLike, max_frames: int) -> tuple[list[int], list[bytes], float | None]:
    """Up to ``max_frames`` evenly spaced frames of a source as lossless PNG bytes, with their frame numbers.

    The video is decoded once, front to back; memory holds the kept (compressed) frames only.
    """
    from musetalk.stream.video import open_frames

    frames = open_frames(source)
    step = max(1, math.ceil(frames.num_frames / max_frames))
    numbers: list[int] = []
    encoded: list[bytes] = []
    for i, frame in enumerate(frames):
        if i % step:
            continue
        numbers.append(i)
        encoded.append(viz.to_png(frame))
        if len(encoded) == max_frames:
            break
    return numbers, encoded, frames.fps


class BboxShiftTuner:
    """Pick ``bbox_shift`` by eye: the frame with its landmarks and crop box, the 256x256 crop with the half the UNet
    regenerates blacked out, and the paste-back mask, redrawn as the sliders move.

    Landmarks are detected once per kept frame when the tuner is built (they also give the suggested range);
    moving a slider only recomputes the crop geometry, the crop and (when a parser is given) the blend mask, which is
    cached per (frame, face box). Read the choice as :attr:`bbox_shift` or :meth:`config_with_choice`.
    """

    def __init__(self, source: str | os.PathLike, landmarker: LandmarkBackend, parser: Any = None,
                 config: GenerationConfig | None = None, *, max_frames: int = MAX_TUNER_FRAMES,
                 display_width: int = 384) -> None:
        """source: an image, a video or a folder of frames; landmarker: any landmark backend (``detect``);
        parser: a ``FaceParser`` for the blend-mask view (None: no mask view); config: crop and blend settings,
        whose ``crop.bbox_shift`` is the starting value (clamped into the suggested range)."""
        from musetalk.config import preset
        from musetalk.stages.faces.crop import bbox_shift_range

        self.source = Path(source)
        self.config = (config or preset()).validate()
        self.landmarker = landmarker
        self.parser = parser
        self.display_width = display_width
        self.frame_numbers, self._frames, self.fps = _sample_frames(self.source, max_frames)
        self._frame_cache: tuple[int, np.ndarray] | None = None  # the last decoded frame
        # 1. landmarks: once per kept frame, up front (the range needs them all)
        self.detections: list[FaceLandmarks] = [landmarker.detect(self._decode(i)) for i in range(len(self._frames))]
        self.shift_range: tuple[int, int] = bbox_shift_range(self.detections)  # NoFaceError when no frame has a face
        low, high = self.shift_range
        self._shift = int(min(max(self.config.crop.bbox_shift, low), high))
        self._index = next(i for i, d in enumerate(self.detections) if d.has_face)
        self._materials: OrderedDict[tuple[int, Box], BlendMaterial] = OrderedDict()
        self._prepared: tuple[tuple[int, int], SourceFrame] | None = None  # the last prepared (frame, shift)
        self._ui: dict[str, Any] | None = None
        self._tracks: tuple[int, np.ndarray] | None = None  # (bbox_shift, the box-track plot drawn for it)
        self.renders = 0  # views drawn into the widgets (tests and curious users)

    @classmethod
    def from_pipeline(cls, pipe: Any, source: str | os.PathLike, config: GenerationConfig | None = None,
                      **kwargs: Any) -> BboxShiftTuner:
        """A tuner using the pipeline's landmark backend (``config.crop.landmarks``) and face parser."""
        config = config or pipe.default_config()
        return cls(source, pipe.landmarker(config.crop.landmarks), pipe.parser, config, **kwargs)

    # -- state ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._frames)

    @property
    def bbox_shift(self) -> int:
        """The chosen bbox_shift (px); setting it moves the slider and redraws."""
        return self._shift

    @bbox_shift.setter
    def bbox_shift(self, value: int) -> None:
        value = int(value)
        low, high = self.shift_range
        if not low <= value <= high:
            raise InputError(f"bbox_shift={value} is outside the suggested range [{low}, {high}] for this face",
                             f"pick a value from {low} to {high}")
        self._set(shift=value)

    @property
    def frame(self) -> int:
        """Index of the shown frame among the kept ones (``frame_numbers[frame]`` is its number in the source)."""
        return self._index

    @frame.setter
    def frame(self, index: int) -> None:
        index = int(index)
        if not 0 <= index < len(self._frames):
            raise InputError(f"frame {index} is out of range", f"use 0..{len(self._frames) - 1}")
        self._set(index=index)

    def config_with_choice(self) -> GenerationConfig:
        """The tuner's config with the chosen ``bbox_shift``: pass it to ``prepare_avatar`` / ``generate``."""
        from musetalk.config import with_overrides

        return with_overrides(self.config, bbox_shift=self._shift)

    def _set(self, shift: int | None = None, index: int | None = None) -> None:
        changed = (shift is not None and shift != self._shift) or (index is not None and index != self._index)
        self._shift = self._shift if shift is None else shift
        self._index = self._index if index is None else index
        if self._ui is not None:
            # keep the sliders in step when driven from Python; their observers do not redraw (values equal)
            self._ui["shift_slider"].value, self._ui["frame_slider"].value = self._shift, self._index
            if changed:
                self.render()

    # -- geometry and pictures (pure given the cached landmarks) ---------------------------------------------
    def _decode(self, index: int) -> np.ndarray:
        if self._frame_cache is None or self._frame_cache[0] != index:
            image = cv2.imdecode(np.frombuffer(self._frames[index], np.uint8), cv2.IMREAD_COLOR)
            assert image is not None, "the frames are PNGs encoded by _sample_frames"
            self._frame_cache = (index, image)
        return self._frame_cache[1]

    def source_frame(self, index: int | None = None, bbox_shift: int | None = None) -> SourceFrame:
        """This frame prepared exactly as ``prepare_avatar`` prepares it (the pipeline's own per-frame function)."""
        from musetalk.config import with_overrides
        from musetalk.stream.pipeline import prepare_source_frame

        index = self._index if index is None else index
        shift = self._shift if bbox_shift is None else bbox_shift
        key = (index, shift)
        if self._prepared is None or self._prepared[0] != key:
            config = with_overrides(self.config, bbox_shift=shift)
            self._prepared = (key, prepare_source_frame(self._decode(index), self.detections[index], config))
        return self._prepared[1]

    def face_box(self, index: int | None = None, bbox_shift: int | None = None) -> Box | None:
        """The box the pipeline crops for this frame and shift (extra margin included), or None without a face."""
        return self.source_frame(index, bbox_shift).face_box

    def crop(self, index: int | None = None, bbox_shift: int | None = None) -> np.ndarray | None:
        """The (256, 256, 3) uint8 BGR crop the VAE sees, or None without a face."""
        return self.source_frame(index, bbox_shift).crop

    def material(self, index: int | None = None, bbox_shift: int | None = None) -> BlendMaterial | None:
        """The paste-back mask of this frame and shift (None without a parser or a face); cached."""
        from musetalk.stages.blending import material_from_parsing

        item = self.source_frame(index, bbox_shift)
        if self.parser is None or item.face_box is None:
            return None
        key = (self._index if index is None else index, item.face_box)
        if key not in self._materials:
            self._materials[key] = material_from_parsing(self.parser.parse(item.parser_crop), item.face_box,
                                                         self.config.blend)
            if len(self._materials) > MATERIAL_CACHE:
                self._materials.popitem(last=False)
        self._materials.move_to_end(key)
        return self._materials[key]

    def box_tracks(self, bbox_shift: int | None = None) -> tuple[list[Box | None], list[Box | None]]:
        """The crop box of every kept frame as detected and as the One-Euro smoothing would store it (extra margin
        included), with the config's ``smoothing_min_cutoff`` / ``smoothing_beta`` (docs/quality.md)."""
        from musetalk.stages.faces.crop import apply_extra_margin, crop_box
        from musetalk.stages.faces.smoothing import smooth_boxes

        shift = self._shift if bbox_shift is None else bbox_shift
        raw = [crop_box(d.landmarks, shift, d.detector_box) if d.landmarks is not None else None
               for d in self.detections]
        step = self.frame_numbers[1] - self.frame_numbers[0] if len(self) > 1 else 1
        crop = self.config.crop
        smoothed = smooth_boxes(raw, (self.fps or self.config.fps) / step, crop.smoothing_min_cutoff,
                                crop.smoothing_beta)
        height = self._decode(0).shape[0]  # every frame of a source has the same size

        def margin(boxes: list[Box | None]) -> list[Box | None]:
            return [None if b is None else apply_extra_margin(b, crop.extra_margin, height) for b in boxes]
        return margin(raw), margin(smoothed)

    def _tracks_view(self) -> np.ndarray:
        """The box-track plot (drawn once per bbox_shift: it does not depend on the shown frame)."""
        if self._tracks is None or self._tracks[0] != self._shift:
            raw, smoothed = self.box_tracks()
            png = viz.figure_png(viz.plot_box_tracks(raw, smoothed), dpi=70)
            plot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            assert plot is not None, "matplotlib wrote a PNG"
            self._tracks = (self._shift, plot)
        return self._tracks[1]

    def views(self) -> dict[str, np.ndarray]:
        """The pictures for the current frame and shift, as BGR arrays: frame, crop, mask, and (with more than one
        frame) tracks: the crop-box corners over time, raw and smoothed."""
        frame = self._decode(self._index)
        det = self.detections[self._index]
        box = self.face_box()
        material = self.material()
        annotated = viz.draw_face(frame, det.landmarks, box, material.crop_box if material else None,
                                  width=min(self.display_width, frame.shape[1]))
        if box is None:
            return {"frame": annotated, "crop": viz.placeholder("no face"), "mask": viz.placeholder("no face")}
        crop = self.crop()
        assert crop is not None
        marked = crop.copy()
        cv2.line(marked, (0, crop.shape[0] // 2), (crop.shape[1] - 1, crop.shape[0] // 2), viz.MASK_LINE_COLOR, 1)
        views = {"frame": annotated, "crop": viz.hstack([marked, viz.masked_half(crop)], height=crop.shape[0])}
        views["mask"] = viz.fit(viz.mask_overlay(frame, material, box), height=256) if material is not None \
            else viz.placeholder("no parser")
        if len(self) > 1:
            views["tracks"] = self._tracks_view()
        return views

    def describe(self) -> str:
        """One line: the shift and its range, the frame, the crop box."""
        low, high = self.shift_range
        number = self.frame_numbers[self._index]
        return (f"bbox_shift {self._shift} (suggested range [{low}, {high}]) | frame {number} "
                f"({self._index + 1}/{len(self)}) | crop box {self.face_box()}")

    # -- widgets ----------------------------------------------------------------------------------------------
    @property
    def widget(self) -> Any:
        """The ipywidgets.VBox (built on first use): sliders, a status line and the three views."""
        if self._ui is None:
            self._build()
        assert self._ui is not None
        return self._ui["box"]

    def _build(self) -> None:
        import ipywidgets as w

        low, high = self.shift_range
        shift = w.IntSlider(value=self._shift, min=low, max=high, step=1, description="bbox_shift",
                            continuous_update=False, layout=w.Layout(width="420px"))
        shift.add_class("musetalk-bbox-shift")
        frame = w.IntSlider(value=self._index, min=0, max=max(len(self) - 1, 0), description="frame",
                            continuous_update=False, disabled=len(self) < 2, layout=w.Layout(width="420px"))
        frame.add_class("musetalk-frame")
        status = w.HTML()
        images = {name: w.Image(format="png") for name in ("frame", "crop", "mask", "tracks")[:3 + (len(self) > 1)]}
        for name, image in images.items():
            image.add_class(f"musetalk-{name}")
        shift.observe(lambda change: self._set(shift=int(change["new"])), names="value")
        frame.observe(lambda change: self._set(index=int(change["new"])), names="value")
        labels = {"frame": "frame: landmarks, crop box (red), mask line (yellow), blend square (blue)",
                  "crop": "crop 256x256 | what the UNet gets as masked input (lower half regenerated)",
                  "mask": "paste-back mask (magenta) over the blend square",
                  "tracks": "crop box corners per kept frame: raw (dotted) vs One-Euro smoothed (solid)"}
        columns = [w.VBox([w.HTML(f"<small>{labels[name]}</small>"), images[name]]) for name in images]
        box = w.VBox([w.HBox([shift, frame]), status, w.HBox(columns[:1] + [w.VBox(columns[1:3])]), *columns[3:]])
        box.add_class("musetalk-bbox-tuner")
        self._ui = {"box": box, "shift_slider": shift, "frame_slider": frame, "status": status, **images}
        self.render()

    def render(self) -> None:
        """Draw the current frame and shift into the widgets."""
        if self._ui is None:
            return
        for name, image in self.views().items():
            self._ui[name].value = viz.to_png(image)
            # natural size: a flex box would otherwise stretch the 256-px mask and squeeze the crop pair
            self._ui[name].layout.width = self._ui[name].layout.min_width = f"{image.shape[1]}px"
        self._ui["status"].value = f"<code>{self.describe()}</code>"
        self.renders += 1

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"BboxShiftTuner({self.source.name!r}: {self.describe()})"


class LiveDashboard(Hooks):
    """Progress, fps and memory of a running generation, redrawn every ``every`` output frames.

    Run hooks (:mod:`musetalk.hooks`): pass it as ``hooks=`` to ``generate``/``stream``/``prepare_avatar``: it forwards
    ``stage`` and ``frame_done`` to the wrapped :class:`~musetalk.profiling.Profiler` and redraws from its data, so
    there is one code path with or without the dashboard. Redraws happen on the thread that calls ``frame_done``
    (the one iterating the stream) and at most every ``min_interval`` seconds (the plot costs ~0.1 s on a CPU);
    the last frame and ``stop()`` always redraw.
    """

    def __init__(self, profiler: Profiler | None = None, total: int | None = None, every: int = 10,
                 min_interval: float = 0.5, device: Any = None, title: str = "generation") -> None:
        from musetalk.profiling import Profiler

        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.profiler = profiler if profiler is not None else Profiler(device=device)
        self.total = total
        self.every = every
        self.min_interval = min_interval
        self.title = title
        self.frames = 0
        self.refreshes = 0
        self.current_stage: str | None = None
        self._last_refresh = -math.inf
        self._lock = threading.Lock()
        self._ui: dict[str, Any] | None = None

    # -- the profiler interface the pipeline calls ------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, sync: bool | None = None) -> Iterator[None]:
        """Time ``name`` with the wrapped profiler; the status line shows the stage that last started."""
        self.current_stage = name
        with self.profiler.stage(name, sync):
            yield

    def progress(self, phase: str, done: int, total: int | None) -> None:
        """Learn the number of output frames when generation starts (unless it was given)."""
        if phase == "generate" and done == 0 and self.total is None:
            self.total = total

    def frame_done(self) -> None:
        """Count one output frame; redraw every ``every`` frames (throttled) and at the last one."""
        self.profiler.frame_done()
        with self._lock:
            self.frames += 1
            frames = self.frames
        last = self.total is not None and frames >= self.total
        due = frames % self.every == 0 and time.perf_counter() - self._last_refresh >= self.min_interval
        if last or due:
            self.refresh()

    def frame_latency(self, seconds: float, late: bool = False) -> None:
        """A live session's per-frame latency, passed on to the profiler (shown in the status line)."""
        self.profiler.frame_latency(seconds, late)

    def start(self) -> LiveDashboard:
        """Start the profiler (wall clock, memory sampling) and draw the empty dashboard."""
        self.profiler.start()
        self.refresh()
        return self

    def stop(self) -> None:
        """Stop the profiler and draw the final state."""
        self.profiler.stop()
        self.current_stage = "done"
        self.refresh()

    def __enter__(self) -> LiveDashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def report(self, meta: dict[str, Any] | None = None) -> ProfileReport:
        """The wrapped profiler's report (see ``Profiler.report``)."""
        return self.profiler.report(meta)

    # -- drawing ----------------------------------------------------------------------------------------------
    def status(self, report: ProfileReport) -> str:
        """The one-line summary under the progress bar."""
        from musetalk.profiling.report import format_bytes

        fps = report.fps_series[-1][1] if report.fps_series else None
        rss = report.memory[-1].get("rss") if report.memory else None
        parts = [f"<b>{self.title}</b>", f"stage: {self.current_stage or '-'}",
                 f"{report.frames}/{self.total if self.total else '?'} frames",
                 f"{fps:.2f} fps" if fps is not None else "fps: -", f"{report.wall_s:.1f} s"]
        if rss is not None:
            parts.append(f"RSS {format_bytes(rss)}")
        lat = report.latency
        if lat.get("frames"):  # live sessions: audio that completes a frame -> the frame out
            parts.append(f"latency first {1e3 * lat['first_s']:.0f} ms, p50 {1e3 * lat['p50_s']:.0f} ms, "
                         f"p95 {1e3 * lat['p95_s']:.0f} ms, {lat['late']} late")
        return " &middot; ".join(parts)

    def refresh(self) -> None:
        """Redraw now from a snapshot of the profiler (no-op until the widget was built)."""
        self._last_refresh = time.perf_counter()
        if self._ui is None:
            return
        report = self.profiler.report()
        ui = self._ui
        ui["progress"].max = max(self.total or report.frames, 1)
        ui["progress"].value = min(report.frames, ui["progress"].max)
        ui["status"].value = self.status(report)
        png = viz.figure_png(viz.plot_live(report, self.total))
        # assigning outputs (instead of `with output:`) works from any thread and replaces the previous plot
        ui["output"].outputs = ({"output_type": "display_data", "metadata": {},
                                 "data": {"image/png": base64.b64encode(png).decode("ascii"),
                                          "text/plain": f"<live plot: {report.frames} frames>"}},)
        self.refreshes += 1

    @property
    def widget(self) -> Any:
        """The ipywidgets.VBox (built on first use): progress bar, status line, Output with the plots."""
        if self._ui is None:
            import ipywidgets as w

            progress = w.IntProgress(value=0, min=0, max=max(self.total or 1, 1), description="frames",
                                     layout=w.Layout(width="420px"))
            status = w.HTML()
            output = w.Output()
            box = w.VBox([progress, status, output])
            box.add_class("musetalk-dashboard")
            self._ui = {"box": box, "progress": progress, "status": status, "output": output}
            self.refresh()
        return self._ui["box"]

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


class SilenceTuner:
    """Tune the silence handling by eye: the VAD's speech probability per video frame over the waveform, the
    threshold, the silent stretches it yields (at least the minimum duration) and the per-frame weight of the
    generated face, redrawn as the two sliders move.

    The VAD runs once when the tuner is built; moving a slider only re-plans (pure numpy). Read the choice with
    :meth:`config_with_choice` (or :attr:`threshold` / :attr:`min_silence_s`).
    """

    def __init__(self, wav: np.ndarray, fps: float = 25.0, config: GenerationConfig | None = None,
                 vad: Any = None) -> None:
        """wav: 16 kHz mono float32 (``musetalk.stages.audio.load_audio``); vad: a ``SileroVAD`` (None: build one)."""
        from musetalk.config import preset
        from musetalk.stages import silence
        from musetalk.stages.audio import num_video_frames

        self.wav = np.asarray(wav, np.float32)
        self.fps = float(fps)
        self.config = (config or preset()).validate()
        self.chunk_probs = silence.speech_probabilities(vad or silence.SileroVAD.from_pretrained(), self.wav)
        self.n_frames = num_video_frames(len(self.wav), self.fps)
        self.threshold = self.config.pauses.silence_threshold
        self.min_silence_s = self.config.pauses.silence_min_s
        self._ui: dict[str, Any] | None = None
        self.renders = 0

    @classmethod
    def from_pipeline(cls, pipe: Any, audio: str | os.PathLike | np.ndarray, fps: float = 25.0,
                      config: GenerationConfig | None = None) -> SilenceTuner:
        """A tuner with the pipeline's VAD (built once per pipeline) for an audio file or waveform."""
        from musetalk.stages.audio import load_audio

        wav = audio if isinstance(audio, np.ndarray) else load_audio(audio)
        return cls(wav, fps, config or pipe.default_config(), vad=pipe.vad())

    def plan(self):
        """The per-frame plan for the current threshold and minimum duration (``source`` when the config is off)."""
        from dataclasses import replace

        from musetalk.stages import silence

        pauses = replace(self.config.pauses, silence=self.config.pauses.silence.replace("off", "source"),
                         silence_threshold=self.threshold, silence_min_s=self.min_silence_s)
        return silence.plan_silence(self.chunk_probs, self.n_frames, self.fps, pauses)

    def set(self, threshold: float | None = None, min_silence_s: float | None = None) -> None:
        """Change the values (checked like the config) and redraw."""
        from musetalk.config import with_overrides

        threshold = self.threshold if threshold is None else float(threshold)
        min_silence_s = self.min_silence_s if min_silence_s is None else float(min_silence_s)
        with_overrides(self.config, silence_threshold=threshold, silence_min_s=min_silence_s)  # raises InputError
        changed = (threshold, min_silence_s) != (self.threshold, self.min_silence_s)
        self.threshold, self.min_silence_s = threshold, min_silence_s
        if self._ui is not None:
            # keep the sliders in step when driven from Python; their observers see equal values and do not redraw
            self._ui["threshold"].value, self._ui["min_silence"].value = threshold, min_silence_s
            if changed:
                self.render()

    def config_with_choice(self) -> GenerationConfig:
        """The tuner's config with the chosen threshold and minimum silence."""
        from musetalk.config import with_overrides

        return with_overrides(self.config, silence_threshold=self.threshold, silence_min_s=self.min_silence_s)

    def figure(self) -> Any:
        """The timeline as a matplotlib Figure."""
        plan = self.plan()
        return viz.plot_vad(self.wav, plan.frame_probs, plan.silent, plan.weights, self.fps, self.threshold)

    def describe(self) -> str:
        plan = self.plan()
        return (f"threshold {self.threshold:.2f} | min silence {self.min_silence_s:.2f} s | "
                f"{int(plan.silent.sum())}/{self.n_frames} frames silent, {plan.skipped} skip the UNet")

    @property
    def widget(self) -> Any:
        """The ipywidgets.VBox (built on first use): two sliders, a status line and the timeline."""
        if self._ui is None:
            import ipywidgets as w

            threshold = w.FloatSlider(value=self.threshold, min=0.05, max=0.95, step=0.05, description="threshold",
                                      continuous_update=False)
            min_silence = w.FloatSlider(value=self.min_silence_s, min=0.0, max=2.0, step=0.05,
                                        description="min silence s", continuous_update=False)
            threshold.observe(lambda change: self.set(threshold=change["new"]), names="value")
            min_silence.observe(lambda change: self.set(min_silence_s=change["new"]), names="value")
            status, image = w.HTML(), w.Image(format="png")
            box = w.VBox([w.HBox([threshold, min_silence]), status, image])
            box.add_class("musetalk-silence-tuner")
            self._ui = {"box": box, "threshold": threshold, "min_silence": min_silence, "status": status,
                        "image": image}
            self.render()
        return self._ui["box"]

    def render(self) -> None:
        """Draw the timeline for the current values into the widget."""
        if self._ui is None:
            return
        self._ui["image"].value = viz.figure_png(self.figure())
        self._ui["status"].value = f"<code>{self.describe()}</code>"
        self.renders += 1

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
