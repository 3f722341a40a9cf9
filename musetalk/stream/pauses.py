"""Pauses in the stream: the silence plan of one run and the frames shown in silent stretches.

The pure parts (VAD segmentation, weights, closed-mouth choice) live in :mod:`musetalk.stages.silence`; this
module ties them to an avatar: which source frame is the closed-mouth reference, and what each planned frame
looks like. ``MuseTalkPipeline.stream`` calls :func:`plan_for` once and :meth:`PauseFrames.show` per frame.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, ContextManager

import numpy as np

from musetalk.config import GenerationConfig
from musetalk.errors import InputError
from musetalk.stages import audio as audio_stage
from musetalk.stages import silence
from musetalk.stream.avatar import Avatar


def reference_frame(avatar: Avatar, picked: int = -1) -> int:
    """The closed-mouth source frame: ``picked`` when >= 0 (checked), else the face frame whose landmarks,
    stored at preparation, show the smallest mouth opening."""
    if picked < 0:
        return silence.closed_mouth_frame(silence.mouth_openings(avatar.landmarks), avatar.has_face)
    if picked >= len(avatar) or not avatar.has_face[picked]:
        faces = np.flatnonzero(avatar.has_face)
        raise InputError(f"silence_frame {picked} is not a source frame with a face (the avatar has {len(avatar)} "
                         f"frames, faces in {len(faces)})", "pick a frame with a face, or -1 to choose automatically")
    return picked


def plan_for(vad: Callable[[], silence.SileroVAD], avatar: Avatar, wav: np.ndarray, config: GenerationConfig,
             stage: Callable[[str], ContextManager[object]]) -> silence.SilencePlan | None:
    """The silence plan of ``wav`` on ``avatar``, or None when silence handling is off (nothing changes).

    ``stage(name)`` times the VAD pass (the run's hooks)."""
    pauses = config.pauses
    if pauses.silence == "off":
        return None
    fps = avatar.meta.fps
    with stage("vad"):
        probs = silence.speech_probabilities(vad(), wav)
    ref = reference_frame(avatar, pauses.silence_frame) if pauses.silence == "closed" else None
    return silence.plan_silence(probs, audio_stage.num_video_frames(len(wav), fps), fps, pauses, ref)


class PauseFrames:
    """Turns the blended (or, in silence, untouched) frame of output index ``i`` into the planned one."""

    def __init__(self, plan: silence.SilencePlan, avatar: Avatar, frame_of: Callable[[int], np.ndarray],
                 mask_of: Callable[[int], np.ndarray]) -> None:
        self.plan = plan
        self.avatar = avatar
        self.frame_of = frame_of
        self.mask_of = mask_of
        patch = None
        if plan.reference_frame is not None:
            box = avatar.face_box(plan.reference_frame)
            assert box is not None, "the closed-mouth reference is a frame with a face"
            x1, y1, x2, y2 = box
            patch = avatar.frame(plan.reference_frame)[y1:y2, x1:x2].copy()
        self._closed_patch = patch  # the closed mouth's face box, pasted into each frame's own box
        self._closed = lru_cache(maxsize=4)(self._closed_frame)

    def _closed_frame(self, source: int) -> np.ndarray:
        from musetalk.stages.blending import BlendMaterial, blend_with_material

        x1, y1, x2, y2 = (int(v) for v in self.avatar.mask_boxes[source])
        material = BlendMaterial(mask=self.mask_of(source), crop_box=(x1, y1, x2, y2))
        face_box = self.avatar.face_box(source)
        # show() asks for closed frames only when there is a reference patch, and only for frames with a face
        assert self._closed_patch is not None and face_box is not None
        return blend_with_material(self.frame_of(source), self._closed_patch, face_box, material)

    def show(self, index: int, source: int, frame: np.ndarray) -> np.ndarray:
        """Frame ``index`` of the output as planned: ``frame`` itself where generated only (weight 1)."""
        weight = float(self.plan.weights[index]) if index < len(self.plan.weights) else 1.0
        if weight >= 1.0 or not self.avatar.has_face[source]:
            return frame
        reference = self.frame_of(source) if self._closed_patch is None else self._closed(source)
        return silence.mix(frame, reference, weight)
