"""``musetalk evaluate``: lip-sync scores (LSE-D / LSE-C) of a video, a folder of videos or a batch summary.

The command line over :mod:`musetalk.quality.evaluate` (which holds the scoring and the weights lookup).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from musetalk.errors import InputError
from musetalk.quality.evaluate import (CROPS, SFD_FILE, SYNCNET_FILE, VIDEO_SUFFIXES, EvaluateConfig, LSEResult,
                                       _check_weights, default_weights, evaluate_video)
from musetalk.quality.track import TrackConfig


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``musetalk evaluate VIDEO|FOLDER [--audio A] [--syncnet PATH] [--crop ...] [--json OUT]``."""
    parser.add_argument("video", type=Path, help="a video, a folder of videos, or a batch summary.jsonl "
                        "(several are scored one by one into a table)")
    parser.add_argument("--audio", type=Path, default=None, help="speech to score against (default: the video's)")
    parser.add_argument("--syncnet", type=Path, default=None,
                        help=f"syncnet_v2.model (default: $MUSETALK_SYNCNET or <models>/{SYNCNET_FILE})")
    parser.add_argument("--sfd", type=Path, default=None,
                        help=f"S3FD sfd_face.pth (default: $MUSETALK_SFD or <models>/{SFD_FILE})")
    parser.add_argument("--crop", choices=CROPS, default="s3fd",
                        help="face crops: s3fd (reference), landmarks, none (video is 224x224 crops), auto")
    parser.add_argument("--json", type=Path, default=None, help="write the full result(s) as JSON here")
    parser.add_argument("--controls", action="store_true",
                        help="also score against the audio shifted by 1 s and against silence")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    parser.add_argument("--no-jpeg-step", action="store_true", help="skip the reference's mp4 -> JPEG round trip")
    parser.add_argument("--min-track", type=int, default=TrackConfig.min_track,
                        help="a face track needs more than this many detections (default 100 = 4 s)")
    parser.add_argument("--batch-size", type=int, default=EvaluateConfig.batch_size, help="windows per forward pass")
    parser.add_argument("--mouth", action="store_true",
                        help="also measure mouth motion on silence (landmarks of every frame; dlib by default)")
    parser.add_argument("--landmarks", default=EvaluateConfig.landmark_backend,
                        help="landmark backend for --crop landmarks and --mouth (dlib, face_alignment, dwpose)")


def _videos(path: Path) -> list[Path]:
    """The videos to score: one file, every video of a folder, or the finished outputs of a batch summary."""
    if path.suffix.lower() == ".jsonl" and path.is_file():  # `musetalk batch` summary: one JSON object per row
        found = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path} line {number} is not JSON", "pass the summary.jsonl `musetalk batch` wrote") from None
            if row.get("state") == "done" and row.get("output"):
                out = Path(row["output"])
                found.append(out if out.is_absolute() else path.parent / out)
        if not found:
            raise InputError(f"no finished videos in the batch summary {path}", "run the batch first")
        return found
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not found:
            raise InputError(f"no videos in {path}", f"put {', '.join(sorted(VIDEO_SUFFIXES))} files there")
        return found
    if not path.exists():
        raise InputError(f"video not found: {path}", "check the path")
    return [path]


def format_table(rows: Sequence[tuple[str, LSEResult | str]]) -> str:
    """A plain-text table: one line per video with LSE-D, LSE-C, offset, controls, or the error."""
    lines = [f"{'video':<40} {'LSE-D':>7} {'LSE-C':>7} {'offset':>6}  detector  controls (LSE-C shifted / silence)"]
    for name, res in rows:
        if isinstance(res, str):
            lines.append(f"{name:<40} {'error: ' + res}")
            continue
        ctrl = " / ".join(f"{res.controls[k][1]:.3f}" for k in ("shifted_1s", "silence") if k in res.controls)
        lines.append(f"{name:<40} {res.lse_d:>7.3f} {res.lse_c:>7.3f} {res.offset:>+6d}  {res.detector:<9} {ctrl}")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``musetalk evaluate``: prints the scores (a table for a folder); 0 when every video was scored.

    For a single video, input and weight errors propagate as MuseTalkError (the CLI prints them with the fix);
    for a folder they become rows of the table and the exit status is 1.
    """
    from musetalk.errors import MuseTalkError
    from musetalk.quality.syncnet import SyncNetScorer

    config = EvaluateConfig(jpeg_step=not args.no_jpeg_step, batch_size=args.batch_size,
                            landmark_backend=args.landmarks, track=TrackConfig(min_track=args.min_track))
    videos = _videos(args.video)
    if args.json:  # before any work: the JSON is written at the end, over whatever file that path names
        from musetalk.stream.paths import check_output_not_input

        check_output_not_input(args.json, {"video": args.video, "audio": args.audio,
                                           **{f"video {v.name}": v for v in videos}}, what="--json")
    path = _check_weights(default_weights(SYNCNET_FILE, args.syncnet, "MUSETALK_SYNCNET"), "SyncNet", "--syncnet")
    scorer = SyncNetScorer.from_pretrained(path, device=args.device, batch_size=config.batch_size)
    rows: list[tuple[str, LSEResult | str]] = []
    for video in videos:
        try:
            res = evaluate_video(video, args.audio, crop=args.crop, controls=args.controls, config=config,
                                 sfd_path=args.sfd, scorer=scorer, mouth=args.mouth)
        except MuseTalkError as exc:
            if len(videos) == 1:
                raise
            rows.append((video.name, exc.message))
            continue
        rows.append((video.name, res))
    if len(videos) == 1 and isinstance(rows[0][1], LSEResult):
        res = rows[0][1]
        print(f"{videos[0]}: {res.summary()}  (detector {res.detector}, JPEG step replicated: "
              f"{'yes' if res.replicates_jpeg_step else 'no'})")
        for name, (d, c, o) in res.controls.items():
            print(f"  control {name:<11} LSE-D {d:.3f}  LSE-C {c:.3f}  offset {o:+d}")
        if res.mouth:
            m = res.mouth
            print(f"  mouth on silence: motion ratio {m['motion_ratio']:.3f} (silence {m['motion_silence']:.4f} / "
                  f"speech {m['motion_speech']:.4f} per frame; {m['silent_frames']} silent frames)")
        for note in res.notes:
            print(f"  note: {note}")
    else:
        print(format_table(rows))
    if args.json:
        data = [r.to_dict() if isinstance(r, LSEResult) else {"video": n, "error": r} for n, r in rows]
        from musetalk.stream.paths import write_text_atomic

        write_text_atomic(args.json, json.dumps(data[0] if len(videos) == 1 else data, indent=2))
    return 0 if all(isinstance(r, LSEResult) for _, r in rows) else 1
