"""``musetalk`` command line: thin adapters over the pipeline (generate, avatar, download, doctor, ...).

Errors caused by inputs or set-up print one message with its fix (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from musetalk.config import GenerationConfig
    from musetalk.hooks import RunHooks
    from musetalk.stream.pipeline import MuseTalkPipeline

REPO_SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from musetalk.frontends.options import add_models_flag

    add_models_flag(p)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from musetalk.frontends.options import add_setting_flags

    add_setting_flags(p)  # --version, --bbox-shift, --device, ...: derived from the config dataclasses


def _config(args: argparse.Namespace) -> GenerationConfig:
    from musetalk.frontends.options import config_from_args

    return config_from_args(args)


def _pipeline(args: argparse.Namespace, config: GenerationConfig | None = None,
              hooks: RunHooks | None = None) -> MuseTalkPipeline:
    from musetalk.stream.pipeline import MuseTalkPipeline

    config = config or _config(args)
    return MuseTalkPipeline.from_pretrained(args.models, version=config.version, device=config.runtime.device,
                                            dtype=config.runtime.dtype, backend=config.runtime.backend, hooks=hooks)


def cmd_generate(args: argparse.Namespace) -> int:
    from musetalk.frontends.signals import StopSignalHooks
    from musetalk.stream.pipeline import MuseTalkPipeline

    config = _config(args)
    MuseTalkPipeline.check_inputs(args.source, args.audio, args.output)  # before the (slow) model loading
    profiler = None
    if args.profile:
        from musetalk.devices import resolve_device
        from musetalk.profiling import Profiler

        profiler = Profiler(device=resolve_device(config.runtime.device))  # started before loading: "load" is a stage
    with (profiler if profiler is not None else _null()):
        pipe = _pipeline(args, config, hooks=profiler)
        result = pipe.generate(args.source, args.audio, args.output, config, avatar=args.avatar,
                               progress=not args.quiet, hooks=StopSignalHooks(), profiler=profiler)
    if profiler is not None:
        report = profiler.report(meta={"command": "generate", "version": config.version, "dtype": str(pipe.dtype),
                                        "batch_size": config.runtime.batch_size, "source": str(args.source)})
        report.save(args.profile)
        print(report.markdown())
    fps = result.num_frames / result.seconds if result.seconds else 0.0
    print(f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps ({result.seconds:.1f} s, {fps:.2f} frames/s)")
    return 0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def cmd_avatar(args: argparse.Namespace) -> int:
    import shutil

    from musetalk.frontends.signals import StopSignalHooks
    from musetalk.stream.avatar import cache_root, check_avatar_name, list_avatars

    if args.avatar_cmd == "prepare":
        config = _config(args)
        pipe = _pipeline(args, config)
        avatar = pipe.prepare_avatar(args.source, config, name=args.name, force=args.force, progress=True,
                                     hooks=StopSignalHooks())
        print(f"avatar {args.name}: {len(avatar)} frames, {avatar.meta.faces} with a face -> {avatar.path}")
        if avatar.meta.faces:
            from musetalk.stages.faces.crop import bbox_shift_range

            faces = avatar.landmarks[avatar.has_face]
            low, high = bbox_shift_range(list(faces))
            print(f"suggested bbox_shift range: [{low}, {high}]")
    elif args.avatar_cmd == "list":
        for meta in list_avatars():
            print(f"{Path(meta.source).name:<30} {meta.num_frames:>6} frames  {meta.fps:g} fps  key {meta.key[:8]}")
    elif args.avatar_cmd == "rm":
        path = cache_root() / "avatars" / check_avatar_name(args.name)
        if not path.is_dir():
            print(f"no avatar named {args.name}")
            return 1
        shutil.rmtree(path)
        print(f"removed {path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from musetalk.frontends.hub import download
    from musetalk.weights import default_models_dir

    versions = ["v15", "v1"] if args.version == "all" else [args.version]
    models = args.dir or default_models_dir()
    download(models, versions, dwpose=args.dwpose, syncnet=args.syncnet, convert=args.convert)
    print(f"weights ready in {models}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from musetalk.weights import default_models_dir
    from musetalk.weights.convert import convert_models

    models = args.models or default_models_dir()
    written = convert_models(models)
    print(f"{len(written)} {args.to} file(s) current in {models}" if written else f"no registered weights in {models}")
    return 0 if written else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from musetalk.frontends.hub import doctor
    from musetalk.weights import default_models_dir

    models = args.models or default_models_dir()
    checks = doctor(models, verify=args.verify)
    print(f"models folder: {models.resolve()}")
    for c in checks:
        mark = "ok " if c.ok else ("ERR" if c.required else "-- ")
        print(f"[{mark}] {c.name:<40} {c.detail}" + (f"\n       fix: {c.fix}" if not c.ok and c.fix else ""))
    blocking = [c for c in checks if c.required and not c.ok]
    print("generation can run" if not blocking else f"generation cannot run: {len(blocking)} problem(s) above")
    return 0 if not blocking else 1


def cmd_tiny(args: argparse.Namespace) -> int:
    from musetalk.stages.tiny import write_tiny_models

    print(f"tiny random weights written to {write_tiny_models(args.dir)} (output is noise, for tests only)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the shipped samples -> outputs/demo.mp4, with real weights when available."""
    from musetalk.errors import WeightsError
    from musetalk.frontends.hub import download
    from musetalk.stages.tiny import is_tiny, write_tiny_models
    from musetalk.weights import LAYOUTS, default_models_dir

    models = args.models or default_models_dir()
    version = args.version or "v15"
    complete = all((models / f).is_file() for f in LAYOUTS[version].required_files())
    if not complete:
        print(f"Real MuseTalk weights are not in {models}; trying to download them ...")
        try:
            download(models, [version])
            complete = True
        except WeightsError as exc:
            print(f"\nThe real weights are absent and cannot be downloaded here:\n  {exc.message}\n")
            tiny = Path(args.tiny_dir)
            print(f"Falling back to TINY RANDOM WEIGHTS in {tiny}: the pipeline runs end to end, but the mouth\n"
                  "region will be noise, not speech. For real results run `musetalk download` on a machine with\n"
                  "internet access and copy the models/ folder here.\n")
            if not is_tiny(tiny):
                write_tiny_models(tiny)
            models = tiny
    args.models = models
    args.output.parent.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(**{**vars(args), "source": args.source, "audio": args.audio, "avatar": None,
                               "profile": None, "quiet": False})
    return cmd_generate(ns)


def build_parser() -> argparse.ArgumentParser:
    from musetalk import __version__

    parser = argparse.ArgumentParser(prog="musetalk", description="MuseTalk lip-sync, locally (MPS, CUDA, CPU).")
    parser.add_argument("--version-info", action="version", version=f"musetalk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="source (image | video | folder) + audio -> lip-synced mp4")
    p.add_argument("--source", required=True, type=Path)
    p.add_argument("--audio", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--avatar", default=None, help="reuse (or create) the named prepared avatar")
    p.add_argument("--profile", type=Path, default=None, help="write a profiling report (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("avatar", help="prepare, list or remove cached avatars")
    asub = p.add_subparsers(dest="avatar_cmd", required=True)
    ap = asub.add_parser("prepare", help="compute and store everything that depends only on the source")
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--force", action="store_true", help="prepare again even if the cached one is valid")
    _add_model_args(ap)
    _add_generation_args(ap)
    asub.add_parser("list", help="list cached avatars")
    rp = asub.add_parser("rm", help="remove a cached avatar")
    rp.add_argument("name")
    p.set_defaults(func=cmd_avatar)

    p = sub.add_parser("download", help="fetch the official weights into the models folder")
    p.add_argument("--version", default="v15", choices=["v15", "v1", "all"])
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--dwpose", action="store_true", help="also DWPose (landmarks backend 'dwpose')")
    p.add_argument("--syncnet", action="store_true", help="also SyncNet + S3FD (for `musetalk evaluate`)")
    p.add_argument("--convert", action="store_true", help="then write a safetensors copy of each (`musetalk convert`)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="write a .safetensors copy beside each official weight file (faster, no pickle)")
    p.add_argument("--to", required=True, choices=["safetensors"], help="target format")
    p.add_argument("--models", type=Path, default=None, help="models folder (default: $MUSETALK_MODELS or ./models)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("doctor", help="check Python, torch, devices, codecs, face backends and weights")
    p.add_argument("--models", type=Path, default=None)
    p.add_argument("--verify", action="store_true", help="also check each weight file's SHA-256 (slow: reads them all)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("tiny-weights", help="write tiny random weights in the official layout (tests, demos)")
    p.add_argument("--dir", type=Path, required=True)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("demo", help="generate outputs/demo.mp4 from the shipped samples")
    p.add_argument("--source", type=Path, default=REPO_SAMPLES / "face.mp4")
    p.add_argument("--audio", type=Path, default=REPO_SAMPLES / "speech.wav")
    p.add_argument("--output", type=Path, default=Path("outputs/demo.mp4"))
    p.add_argument("--tiny-dir", default="models-tiny", help="where tiny weights go when real ones are absent")
    _add_model_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_demo)

    try:
        from musetalk.frontends.evaluate import add_evaluate_arguments, run_evaluate
    except ImportError:
        pass
    else:
        p = sub.add_parser("evaluate", help="lip-sync scores LSE-D / LSE-C (SyncNet) of a video")
        add_evaluate_arguments(p)
        p.set_defaults(func=run_evaluate)
    from musetalk.frontends.batch import add_batch_arguments, run_batch
    p = sub.add_parser("batch", help="one video per row of a CSV / JSONL jobs file, locally or on Ray")
    add_batch_arguments(p)
    p.set_defaults(func=run_batch)
    from musetalk.frontends.server.cli import add_serve_arguments, run_serve  # no fastapi import until `serve` runs
    p = sub.add_parser("serve", help="HTTP API over the pipeline (docs/api.md); needs musetalk[server]")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    from musetalk.frontends.live_client import add_live_arguments, run_live  # websockets imported when it runs
    p = sub.add_parser("live", help="stream an audio file to a server's live session (docs/api.md), get the frames")
    add_live_arguments(p)
    p.set_defaults(func=run_live)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Some ops have no MPS kernel yet; this makes torch fall back to the CPU for them. It must be set before
    # torch is imported, which is why this CLI imports torch only inside the commands.
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from musetalk.errors import MuseTalkError
    from musetalk.frontends.signals import exit_status, interrupt_signal, signal_name, stop_signals_as_interrupt

    # SIGTERM / SIGHUP clean up like Ctrl-C (musetalk.frontends.signals); the except clauses run inside the block
    with stop_signals_as_interrupt():
        try:
            return int(args.func(args) or 0)
        except MuseTalkError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.fix:
                print(f"  fix: {exc.fix}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP as Terminated: exit 128 + signal
            print(f"interrupted ({signal_name(interrupt_signal(exc))}): stopped cleanly, no partial file left",
                  file=sys.stderr)
            return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
