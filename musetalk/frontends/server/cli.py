"""``musetalk serve``: the HTTP API (musetalk.frontends.server) under uvicorn, on a socket bound here.

    musetalk serve --host 127.0.0.1 --port 8765 [--models DIR] [--token T]

The flags build :class:`musetalk.frontends.server.ServerSettings`. fastapi and uvicorn (the ``server`` extra) are imported
only when the command runs, so ``musetalk --help`` works without them. Also runnable as
``python -m musetalk.frontends.server.cli ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "MUSETALK_SERVER_TOKEN"  # a token in the environment stays out of `ps` listings

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``musetalk serve`` (defaults from ServerSettings where it has one)."""
    from musetalk.frontends.options import add_setting_flags

    p = parser
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine "
                   "only; 0.0.0.0 opens the API to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--models", type=Path, default=None, help="models folder (default: $MUSETALK_MODELS or ./models)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help="bearer token required by POST /shutdown "
                   f"(default ${TOKEN_ENV}); without one, only loopback clients may shut the server down")
    p.add_argument("--version", default="v15", choices=["v15", "v1"], help="model version loaded at start and used "
                   "when a request names none (the other one loads on its first request, if its weights exist)")
    add_setting_flags(p, scopes=("process",))  # --device, --dtype, ...: as for generate
    p.add_argument("--queue-size", type=int, default=4, help="jobs that may wait behind the running one (then 429)")
    p.add_argument("--max-upload-mb", type=float, default=256, help="largest request body in MiB (then 413)")
    p.add_argument("--max-audio-seconds", type=float, default=900, help="longest audio accepted")
    p.add_argument("--result-ttl", type=float, default=3600, help="seconds a finished job's result is kept")
    p.add_argument("--work-dir", type=Path, default=None, help="where the temporary folder goes (default: system temp)")
    p.add_argument("--shutdown-grace", type=float, default=60, help="seconds a running job may finish on shutdown")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _settings(args: argparse.Namespace):
    from musetalk.errors import InputError
    from musetalk.frontends.server import MiB, ServerSettings

    for name in ("queue_size", "max_upload_mb", "max_audio_seconds", "result_ttl", "shutdown_grace"):
        if getattr(args, name) < (1 if name == "queue_size" else 0):
            raise InputError(f"--{name.replace('_', '-')} must be positive", "see `musetalk serve --help`")
    return ServerSettings(token=args.token or None, default_version=args.version, queue_size=args.queue_size,
                          max_upload_bytes=int(args.max_upload_mb * MiB), max_audio_seconds=args.max_audio_seconds,
                          result_ttl_s=args.result_ttl, work_dir=args.work_dir, shutdown_grace_s=args.shutdown_grace)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port; InputError with the fix when the port is taken."""
    from musetalk.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                         "choose another --port (0 picks a free one) or stop the program using it") from None
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    """Load the models, bind the socket, then serve until POST /shutdown or Ctrl-C. Returns the exit code."""
    from musetalk.errors import MuseTalkError

    try:
        import uvicorn

        from musetalk.frontends.server import PipelineLoader, create_app, is_loopback
    except ImportError as exc:
        raise MuseTalkError(f"the server needs fastapi, uvicorn and python-multipart ({exc.name} is missing)",
                            "pip install 'musetalk[server]'") from None
    settings = _settings(args)
    loader = PipelineLoader(args.models, device=args.device or "auto", dtype=args.dtype or "auto",
                            backend=args.backend or "auto")
    loader(args.version)  # load now: missing weights stop here with their fix, before the port opens
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not is_loopback(host) and settings.token is None:
        log.warning("listening on %s without --token: anyone who can reach it may generate; shutdown is "
                    "refused to non-loopback clients", host)
    app = create_app(loader, settings)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    server = uvicorn.Server(config)
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    url_host = f"[{host}]" if ":" in host else host
    print(f"musetalk serve: http://{url_host}:{port} (docs at /docs)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m musetalk.frontends.server.cli``: the same as ``musetalk serve``."""
    from musetalk.errors import MuseTalkError

    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # as musetalk.frontends.cli.main, before torch is imported
    parser = argparse.ArgumentParser(prog="musetalk serve", description="HTTP API for MuseTalk lip-sync")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except MuseTalkError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
