"""Incremental audio features: per-frame windows of audio that arrives in pieces (live mode).

Whisper sees 30 s of audio at once and attends over all of it, and its log-mel is normalised by the maximum of
the whole 30 s segment, so a frame's features depend on audio around it, up to the end of its segment. The
offline path (``audio.iter_frame_windows``) cuts the audio into fixed 30 s segments; this module keeps the same
segments and encodes a rolling window: the audio of the current segment received so far (Whisper pads the rest
with zeros, as it pads the last segment offline). A segment whose audio is complete (or the stream closed) is
encoded once more and is then exactly the offline encoding.

A frame is *ready* once its own audio window (10 encoder steps = 200 ms; 120 ms past the frame's time at 25 fps)
plus ``lookahead_s`` of audio has arrived; ``lookahead_s=None`` waits until every segment the window touches is
complete, which gives exactly the offline windows (at up to 30 s of latency). With a finite look-ahead the
features drift from the offline ones; ``benchmarks/bench_live.py`` measures by how much.

Given the same sequence of chunks, the windows are deterministic: they depend on which chunk made a frame ready,
never on timing. Feeding the whole audio in one chunk therefore gives exactly the offline windows.

Memory: the audio and encoder states of at most the segments that unreleased frames still need (normally
the current one and the one before: ~2 x (1.9 MB audio + 11.5 MB states)).
"""

from __future__ import annotations

import math

import numpy as np

from musetalk.stages.audio import (SAMPLE_RATE, SEGMENT_SAMPLES, SEGMENT_SECONDS, WHISPER_DIM, WHISPER_FPS,
                                   AudioConfig, AudioEncoder, num_video_frames)

STEP_SAMPLES = SAMPLE_RATE // WHISPER_FPS  # 320 samples (20 ms) per encoder step
STEPS_PER_SEGMENT = SEGMENT_SECONDS * WHISPER_FPS  # 1500
HIDDEN_STATES = 5  # embedding output + 4 layers (see audio.stack_hidden_states)


class IncrementalWindows:
    """Per-frame (50, 384) windows of a growing waveform, equal to ``iter_frame_windows`` once complete.

    ``append(pcm)`` adds 16 kHz mono float32 samples; ``ready_count()`` says how many frames (from 0) may be cut
    now; ``windows(start, count)`` cuts them; ``close()`` marks the end of the audio (every remaining frame becomes
    ready, with the final encodings); ``release(frame)`` drops what frames before ``frame`` needed.
    Not thread-safe: one thread (the live session's model worker) owns it.
    """

    def __init__(self, encoder: AudioEncoder, config: AudioConfig = AudioConfig(),
                 lookahead_s: float | None = 0.2) -> None:
        if lookahead_s is not None and not (lookahead_s >= 0 and math.isfinite(lookahead_s)):
            raise ValueError(f"lookahead_s must be >= 0 (or None for exact windows), got {lookahead_s}")
        self.encoder = encoder
        self.config = config
        self.lookahead_s = lookahead_s
        self.received = 0  # samples appended so far
        self.closed = False
        self._step = WHISPER_FPS / config.fps  # encoder steps per video frame
        self._lead = math.ceil(self._step) * config.pad_left  # zero steps the reference pads in front
        self._per_frame = 2 * (config.pad_left + config.pad_right + 1)  # 10 steps per window
        self._lookahead = None if lookahead_s is None else int(round(lookahead_s * SAMPLE_RATE))
        self._audio: dict[int, np.ndarray] = {}  # segment -> (30 s,) float32 buffer, filled up to received
        self._states: dict[int, tuple[int, np.ndarray]] = {}  # segment -> (samples encoded, (1500, 5, 384))
        self._ready = 0  # frames known ready (monotone)
        self._released = 0  # segments below this index are gone

    # -- input ----------------------------------------------------------------------------------------------
    def append(self, pcm: np.ndarray) -> None:
        """Add samples: (n,) float32 in [-1, 1], 16 kHz mono."""
        if self.closed:
            raise ValueError("append() after close()")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        pos = 0
        while pos < len(pcm):
            k, offset = divmod(self.received, SEGMENT_SAMPLES)
            buffer = self._audio.get(k)
            if buffer is None:
                buffer = self._audio[k] = np.zeros(SEGMENT_SAMPLES, np.float32)
            take = min(SEGMENT_SAMPLES - offset, len(pcm) - pos)
            buffer[offset:offset + take] = pcm[pos:pos + take]
            self.received += take
            pos += take

    def close(self) -> None:
        """No more audio: every remaining frame is ready and every segment final."""
        self.closed = True

    # -- readiness ------------------------------------------------------------------------------------------
    def total_frames(self) -> int | None:
        """Frames of the whole audio once closed (floor(n / 16000 * fps), the offline count); None before."""
        return num_video_frames(self.received, self.config.fps) if self.closed else None

    def window_end_sample(self, index: int) -> int:
        """The sample after the last encoder step of frame ``index``'s window."""
        return (int(math.floor(index * self._step)) - self._lead + self._per_frame) * STEP_SAMPLES

    def _is_ready(self, index: int) -> bool:
        if index >= num_video_frames(self.received, self.config.fps):  # its own 1/fps of audio is not in yet
            return False
        end = max(self.window_end_sample(index), int(math.ceil((index + 1) * SAMPLE_RATE / self.config.fps)))
        if self._lookahead is not None:
            return end + self._lookahead <= self.received
        # exact: every segment the window touches is complete
        complete_segments = self.received // SEGMENT_SAMPLES
        return end <= complete_segments * SEGMENT_SAMPLES

    def ready_count(self) -> int:
        """How many frames, from frame 0 on, can be cut now (all of them once closed)."""
        if self.closed:
            self._ready = num_video_frames(self.received, self.config.fps)
            return self._ready
        while self._is_ready(self._ready):  # readiness is monotone in the frame index
            self._ready += 1
        return self._ready

    # -- output ---------------------------------------------------------------------------------------------
    def windows(self, start: int, count: int) -> np.ndarray:
        """(count, 50, 384) float32 windows of frames start.. (cut exactly as ``audio.iter_frame_windows``)."""
        if start + count > self.ready_count():
            raise ValueError(f"frames {start}..{start + count - 1} are not ready ({self._ready} are)")
        length = int(math.floor(self.received / SAMPLE_RATE * WHISPER_FPS))  # steps past it are zero (offline trim)
        out = np.zeros((count, self._per_frame, HIDDEN_STATES, WHISPER_DIM), dtype=np.float32)
        for row, index in enumerate(range(start, start + count)):
            first = int(math.floor(index * self._step)) - self._lead
            for j in range(self._per_frame):
                t = first + j
                if 0 <= t < length:
                    out[row, j] = self._state(t)
        return out.reshape(count, -1, WHISPER_DIM)

    def release(self, next_frame: int) -> None:
        """Frames before ``next_frame`` are done: drop the segments no later frame needs."""
        first_step = int(math.floor(next_frame * self._step)) - self._lead
        keep_from = max(0, first_step) // STEPS_PER_SEGMENT
        for k in [k for k in self._audio if k < keep_from]:
            del self._audio[k]
        for k in [k for k in self._states if k < keep_from]:
            del self._states[k]
        self._released = max(self._released, keep_from)

    def _state(self, t: int) -> np.ndarray:
        """Encoder states (5, 384) of step ``t``, encoding its segment with the audio received so far if needed."""
        k, i = divmod(t, STEPS_PER_SEGMENT)
        if k < self._released:
            raise RuntimeError(f"segment {k} was released")
        have = min(SEGMENT_SAMPLES, self.received - k * SEGMENT_SAMPLES)  # samples of segment k received
        cached = self._states.get(k)
        if cached is None or cached[0] != have:
            # the segment's audio as offline slices it: wav[k*S:(k+1)*S] (shorter at the end; Whisper pads)
            mel = self.encoder.feature_extractor(self._audio[k][:have], return_tensors="np",
                                                 sampling_rate=SAMPLE_RATE).input_features
            cached = self._states[k] = (have, self.encoder.encode(mel.astype(np.float32))[0].numpy())
        return cached[1][i]

    @property
    def buffered_segments(self) -> int:
        """Segments whose audio is held (for memory checks)."""
        return len(self._audio)
