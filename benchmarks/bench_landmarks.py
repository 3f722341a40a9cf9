"""Landmark throughput on 720p frames: DWPose (full-size DWPose-L architecture, random weights) vs dlib.

    python -m benchmarks.bench_landmarks [--frames 6] [--device cpu] [--out benchmarks/results/landmarks.json]

(from the repository root, or anywhere once the package is installed).

"landmarks/s" = frames per second for which the 68 face landmarks come back (one face per frame). Each
configuration runs one warm-up pass, then ``--frames`` timed frames; the table gives the median seconds per frame
and the 90th percentile (torch.utils.benchmark conventions: warm-up, device sync, median). DWPose timings do not
depend on the weights' values, so random weights time the real model; they include the 720p -> 288x384 affine
warp, normalisation, both passes of the flip test, decoding and the int32 cast. dlib times its HOG face detector
(on RGB, as face_recognition does) plus the 68-point shape predictor.

The test frame is a face from the MuseTalk golden set scaled into a grey 1280x720 canvas (so dlib finds a face);
without ../shared it is random noise and the dlib rows say that no face was found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from musetalk.devices import resolve_device, synchronize
from musetalk.stages.faces.dwpose import DWPoseBackend, DWPoseNet

REPO = Path(__file__).resolve().parents[1]

FRAME_W, FRAME_H = 1280, 720
GOLDEN_FRAMES = Path(os.environ.get("MUSETALK_SHARED", REPO.parent / "shared")) / "golden/musetalk-v15-tiny/golden.npz"


def make_frame() -> tuple[np.ndarray, str]:
    """A 720p BGR uint8 frame with one face, and a description of where it came from."""
    if GOLDEN_FRAMES.is_file():
        face = np.load(GOLDEN_FRAMES)["frames"][0]  # 512x512 BGR, dlib finds its face
        canvas = np.full((FRAME_H, FRAME_W, 3), 127, np.uint8)
        x0 = (FRAME_W - FRAME_H) // 2
        canvas[:, x0:x0 + FRAME_H] = cv2.resize(face, (FRAME_H, FRAME_H), interpolation=cv2.INTER_LINEAR)
        return canvas, f"golden musetalk-v15-tiny frame 0 scaled to 720x720 on a grey {FRAME_W}x{FRAME_H} canvas"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (FRAME_H, FRAME_W, 3), dtype=np.uint8), "random noise (../shared absent)"


def time_per_frame(run: Callable[[list[np.ndarray]], int], frame: np.ndarray, n_frames: int, batch: int,
                   device: torch.device | None) -> dict:
    """Warm up once, then time ``n_frames`` frames in calls of ``batch``; seconds per frame for each call."""
    run([frame] * batch)
    per_frame, faces = [], 0
    for _ in range(max(1, n_frames // batch)):
        if device is not None:
            synchronize(device)
        start = time.perf_counter()
        faces += run([frame] * batch)
        if device is not None:
            synchronize(device)
        per_frame.append((time.perf_counter() - start) / batch)
    median = statistics.median(per_frame)
    return {"batch": batch, "timed_frames": len(per_frame) * batch, "faces_found": faces,
            "median_s_per_frame": median, "p90_s_per_frame": float(np.percentile(per_frame, 90)),
            "landmarks_per_s": 1.0 / median}


def bench_dwpose(frame: np.ndarray, n_frames: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for flip_test, batch in ((True, 1), (True, 8), (False, 1)):
        backend = DWPoseBackend.from_model(DWPoseNet().to(device), flip_test=flip_test)

        def run(frames: list[np.ndarray], backend: DWPoseBackend = backend) -> int:
            return sum(r.has_face for r in backend.detect_batch(frames))

        row = time_per_frame(run, frame, max(n_frames, 2 * batch if batch > 1 else n_frames), batch, device)
        rows.append({"backend": "dwpose", "variant": f"DWPose-L, flip test {'on' if flip_test else 'off'}",
                     "device": str(device), **row})
    return rows


def _package_dlib() -> Callable[[list[np.ndarray]], int] | None:
    """The package's own dlib backend, once ``musetalk.stages.faces.get_landmark_backend`` exists."""
    try:
        from musetalk.stages.faces import get_landmark_backend  # type: ignore[attr-defined]
    except ImportError:
        return None
    backend = get_landmark_backend("dlib")
    run = lambda frames: sum(backend.detect(f).has_face for f in frames)  # noqa: E731
    run.label = f"musetalk DlibBackend (upsample {getattr(backend, 'upsample', '?')})"  # type: ignore[attr-defined]
    return run


def _direct_dlib(upsample: int) -> Callable[[list[np.ndarray]], int]:
    """dlib's HOG detector (``upsample`` times 2x) and face_recognition_models' 68-point predictor."""
    import dlib

    spec = find_spec("face_recognition_models")  # its __init__ needs pkg_resources: find the file, don't import
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed")
    predictor_path = Path(list(spec.submodule_search_locations)[0]) / "models/shape_predictor_68_face_landmarks.dat"
    detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor_path))

    def run(frames: list[np.ndarray]) -> int:
        found = 0
        for frame in frames:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            faces = detector(rgb, upsample)
            if len(faces):
                shape = predictor(rgb, faces[0])
                found += int(np.array([[p.x, p.y] for p in shape.parts()]).shape == (68, 2))
        return found

    return run


def bench_dlib(frame: np.ndarray, n_frames: int) -> list[dict]:
    runners: list[tuple[str, Callable[[list[np.ndarray]], int]]] = []
    package = _package_dlib()
    if package is not None:
        runners.append((package.label, package))  # type: ignore[attr-defined]
    else:  # upsample 1 is face_recognition's default; 0 is the fastest setting
        runners += [(f"dlib HOG (upsample {u}) + 68-point predictor", _direct_dlib(u)) for u in (1, 0)]
    return [{"backend": "dlib", "variant": variant, "device": "cpu", **time_per_frame(run, frame, n_frames, 1, None)}
            for variant, run in runners]


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            # The CPU may be shared: a load average above the core count means the timings are pessimistic.
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def markdown(results: list[dict]) -> str:
    lines = ["| backend | variant | device | batch | median s/frame | p90 s/frame | landmarks/s | faces found |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['backend']} | {r['variant']} | {r['device']} | {r['batch']} | "
                     f"{r['median_s_per_frame']:.3f} | {r['p90_s_per_frame']:.3f} | {r['landmarks_per_s']:.2f} | "
                     f"{r['faces_found']}/{r['timed_frames']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="timed frames per configuration (after warm-up)")
    parser.add_argument("--device", default="cpu", help="device for DWPose (dlib always runs on the CPU)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/landmarks.json")
    args = parser.parse_args(argv)
    frame, source = make_frame()
    device = resolve_device(args.device)
    results = bench_dwpose(frame, args.frames, device) + bench_dlib(frame, args.frames)
    report = {"what": "landmark sets (68 face points) per second on one 1280x720 BGR frame",
              "frame": source, "machine": machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(results))
    print(f"\n{report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
