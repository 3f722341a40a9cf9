"""Lip-sync scoring speed: frames scored per second by SyncNet (LSE-D / LSE-C) on CPU (and GPU where present).

    python -m benchmarks.bench_quality [--seconds 8] [--device cpu]

Random weights in the official architecture (timing does not depend on the values); 224x224 face crops at
25 fps with matching 16 kHz audio. Measures the scorer alone (MFCC, both embeddings, distances over ±15
offsets), i.e. what `musetalk evaluate --crop none` costs after decoding. Writes
benchmarks/results/quality.json and its table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from benchmarks.bench_generate import RESULTS, machine, write_section
from musetalk.devices import resolve_device, synchronize
from musetalk.quality.syncnet import SyncNet, SyncNetScorer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    scorer = SyncNetScorer(SyncNet().to(device), batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    n_frames = int(args.seconds * 25)
    frames = rng.integers(0, 256, (n_frames, 224, 224, 3), dtype=np.uint8)
    audio = (rng.standard_normal(n_frames * 640) * 3000).astype(np.int16)
    scorer.score(frames[:30], audio[: 30 * 640])  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    score = scorer.score(iter(frames), audio)
    synchronize(device)
    seconds = time.perf_counter() - t0
    result = {"what": "SyncNet scoring (MFCC + embeddings + ±15 offsets), random weights", "device": str(device),
              "frames": n_frames, "seconds": seconds, "frames_per_s": n_frames / seconds,
              "batch_size": args.batch_size, "lse_d": float(score.lse_d), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2))
    write_section("quality", f"""## Lip-sync scoring speed (SyncNet LSE-D / LSE-C)

`python -m benchmarks.bench_quality --seconds {args.seconds:g} --device {args.device}` — {n_frames} face crops
(224x224, 25 fps) with their audio; the scorer alone (MFCC, lip and audio embeddings, distances over ±15 offsets).

| device | batch | frames | seconds | frames scored / s |
|---|---|---|---|---|
| {device} | {args.batch_size} | {n_frames} | {seconds:.1f} | {n_frames / seconds:.1f} |""")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
