"""Golden verifier of the lip-sync metric (sets holding ``golden_syncnet.npz``).

Stage by stage, from the set's own inputs and checkpoint (expected arrays are only compared):

* ``mfcc`` from ``audio_int16`` (the samples the reference read); ``audio_embeddings`` from them too;
* ``lip_embeddings`` from ``frames_bgr`` (the frames the reference's network saw, after its JPEG step);
* ``dists`` / ``mean_dists`` / LSE-D / LSE-C / offset from *our* embeddings;
* end to end from ``inputs/clip.mp4`` through :func:`evaluate_video` (crop none): once with the replicated
  ffmpeg mp4 -> JPEG step (its frames are also compared with ``frames_bgr``) and once without it.

Tolerances (golden README): mfcc <= 1e-3; embeddings, dists, LSE-D, LSE-C <= 1e-4; offset exact;
end to end: LSE-D within 1 % and offset exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from musetalk.testing.golden_common import StageResult, exact, frac_within, guarded, max_abs

GOLDEN_FILE = "golden_syncnet.npz"
CHECKPOINT = "syncnet_v2.model"
TOL_MFCC = 1e-3
TOL = 1e-4
TOL_E2E_REL = 0.01


def _rel(stage: str, actual: float, expected: float, tol: float, detail: str = "") -> StageResult:
    err = abs(actual - expected) / max(abs(expected), 1e-12)
    return StageResult(stage, "rel err", err, f"<= {tol:g}", bool(err <= tol), detail)


def verify(set_dir: Path, end_to_end: bool = True) -> list[StageResult]:
    """Verify one syncnet golden set; one row per compared array (``end_to_end=False``: network stages only)."""
    import torch

    from musetalk.quality.mfcc import mfcc
    from musetalk.quality.syncnet import SyncNetScorer, sync_scores

    set_dir = Path(set_dir)
    manifest = json.loads((set_dir / "manifest.json").read_text())
    params = manifest.get("params", {})
    vshift = int(params.get("vshift", 15))
    batch = int(params.get("batch_size", 20))
    gold = np.load(set_dir / GOLDEN_FILE)
    scorer = SyncNetScorer.from_pretrained(set_dir / CHECKPOINT, device="cpu", batch_size=batch)
    n = len(gold["lip_embeddings"])
    audio = gold["audio_int16"]

    rows = guarded("mfcc", lambda: max_abs("mfcc", mfcc(audio, int(params.get("sample_rate", 16000))).T,
                                           gold["mfcc"], TOL_MFCC))
    emb: dict[str, torch.Tensor] = {}

    def audio_stage() -> StageResult:
        emb["aud"] = scorer.embed_audio(audio, n)
        return max_abs("audio_embeddings", emb["aud"].numpy(), gold["audio_embeddings"], TOL)

    def lip_stage() -> StageResult:
        emb["lip"] = scorer.embed_lips(iter(gold["frames_bgr"]))[:n]
        return max_abs("lip_embeddings", emb["lip"].numpy(), gold["lip_embeddings"], TOL)

    rows += guarded("audio_embeddings", audio_stage) + guarded("lip_embeddings", lip_stage)

    def score_stage() -> list[StageResult]:
        s = sync_scores(emb["lip"], emb["aud"], vshift)
        return [max_abs("dists", s.dists, gold["dists"], TOL),
                max_abs("mean_dists", s.mean_dists, gold["mean_dists"], TOL),
                max_abs("min_dist (LSE-D)", np.float32(s.lse_d), gold["min_dist"], TOL),
                max_abs("confidence (LSE-C)", np.float32(s.lse_c), gold["confidence"], TOL),
                exact("av_offset", np.int64(s.offset), gold["av_offset"])]

    rows += guarded("scores", score_stage)
    if end_to_end:
        rows += guarded("e2e", lambda: _end_to_end(set_dir, manifest, gold, scorer, vshift))
    return rows


def _end_to_end(set_dir: Path, manifest: dict, gold, scorer, vshift: int) -> list[StageResult]:
    """evaluate_video on the clip, with and without the JPEG step; frames of the JPEG step vs ``frames_bgr``."""
    from musetalk.quality.evaluate import EvaluateConfig, evaluate_video
    from musetalk.quality.media import iter_frames_bgr, probe_video, read_audio

    inputs = manifest.get("inputs", {})
    clip = set_dir / inputs.get("clip", "inputs/clip.mp4")
    audio = None if probe_video(clip).has_audio else set_dir / inputs.get("speech", "inputs/speech.wav")
    source = "mp4 audio" if audio is None else "speech.wav"
    frames = np.stack(list(iter_frames_bgr(clip, 25.0, jpeg_step=True)))
    rows = [frac_within("e2e JPEG-step frames", frames, gold["frames_bgr"], 2, 0.995)]
    equal = float(np.mean(frames == gold["frames_bgr"])) * 100 if frames.shape == gold["frames_bgr"].shape else 0.0
    wav = read_audio(audio if audio is not None else clip)
    a_err = (int(np.abs(wav.astype(np.int64) - gold["audio_int16"]).max()) if wav.shape == gold["audio_int16"].shape
             else f"length {len(wav)} vs {len(gold['audio_int16'])}")
    rows[0] = StageResult(rows[0].stage, rows[0].measure, rows[0].value, rows[0].tolerance, rows[0].passed,
                          f"{equal:.2f} % bit-identical; {source} max abs err vs audio_int16 = {a_err}")
    for jpeg in (True, False):
        tag = "e2e" if jpeg else "e2e no-JPEG"
        res = evaluate_video(clip, audio, crop="none", config=EvaluateConfig(vshift=vshift, jpeg_step=jpeg),
                             scorer=scorer)
        lse_c = float(gold["confidence"])
        detail = (f"replicates JPEG step: {'yes' if res.replicates_jpeg_step else 'no'}; LSE-D {res.lse_d:.5f}; "
                  f"LSE-C {res.lse_c:.5f} vs {lse_c:.5f} ({abs(res.lse_c - lse_c) / abs(lse_c) * 100:.2f} %)")
        rows.append(_rel(f"{tag} LSE-D", res.lse_d, float(gold["min_dist"]), TOL_E2E_REL, detail))
        rows.append(exact(f"{tag} offset", np.int64(res.offset), gold["av_offset"]))
    return rows
