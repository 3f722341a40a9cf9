"""``musetalk serve``: the HTTP API (musetalk.frontends.server) under uvicorn, on a socket bound here.

    musetalk serve --host 127.0.0.1 --port 8765 [--models DIR] [--token T]

The flags build :class:`musetalk.frontends.server.ServerSettings`. fastapi and uvicorn (the ``server`` extra) are imported
only when the command runs, so ``musetalk --help`` works without them. Also runnable as
``python -m musetalk.frontends.server.cli ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import typing
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``musetalk serve`` (defaults from ServerSettings where it has one)."""
    from musetalk.frontends.options import add_setting_flags

    p = parser
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine "
                   "only; 0.0.0.0 opens the API to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--models", type=Path, default=None, help="models folder (default: $MUSETALK_MODELS or ./models)")
    add_setting_flags(p, scopes=("process",))  # --device, --dtype, ...: as for generate
    for f, flag, unit in _server_fields():  # --queue-size, --max-upload-mb, ...: from ServerSettings
        meta = f.metadata
        assert f.default is not dataclasses.MISSING  # every ServerSettings field has a default
        default = f.default
        if meta["env"]:  # a string, converted by argparse as if it were given on the command line
            default = os.environ.get(meta["env"])
        elif unit != 1 and default is not None:
            default = default / unit
        kind = _field_type(f)
        shown = f"${meta['env']}" if meta["env"] else f"{default:g}" if isinstance(default, float) else default
        p.add_argument(flag, dest=f.name, type=float if unit != 1 else kind, default=default, choices=meta["choices"],
                       metavar=None if meta["choices"] else flag[2:].upper().replace("-", "_"),
                       help=meta["help"] + (f" (default: {shown})" if shown is not None else ""))
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _field_type(f: dataclasses.Field) -> type:
    """int, float, str or Path: the field's type without ``| None``."""
    from musetalk.frontends.server import ServerSettings

    hint = typing.get_type_hints(ServerSettings)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _server_fields() -> list[tuple[dataclasses.Field, str, int]]:
    """(field, flag, unit) of every ServerSettings field."""
    from musetalk.frontends.server import ServerSettings

    return [(f, f.metadata.get("flag") or "--" + f.name.replace("_", "-"), f.metadata.get("unit", 1))
            for f in dataclasses.fields(ServerSettings)]


def _settings(args: argparse.Namespace):
    """ServerSettings from the parsed flags (each checked against its minimum, converted from its unit)."""
    from musetalk.errors import InputError
    from musetalk.frontends.server import ServerSettings

    values: dict[str, Any] = {}
    for f, flag, unit in _server_fields():
        value = getattr(args, f.name)
        minimum = f.metadata.get("minimum")
        if minimum is not None and value is not None and value < minimum:
            raise InputError(f"{flag} must be at least {minimum:g}", "see `musetalk serve --help`")
        if unit != 1 and value is not None:
            value = _field_type(f)(value * unit)
        values[f.name] = value or None if f.name == "token" else value
    return ServerSettings(**values)


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
    """Load the models, bind the socket, then serve until POST /shutdown or a stop signal. Returns the exit code.

    SIGINT, SIGTERM and SIGHUP all stop the server gracefully: new jobs are refused and queued ones cancelled at
    once, the running one is cancelled after ``--shutdown-grace`` s, the temporary folder is removed, the port
    released; then the signal is raised again so the process exits with 128 + signal (via the CLI's handlers).
    """
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
    loader(args.default_version)  # load now: missing weights stop here with their fix, before the port opens
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not is_loopback(host) and settings.token is None:
        log.warning("listening on %s without --token: anyone who can reach it may generate; shutdown is "
                    "refused to non-loopback clients", host)
    app = create_app(loader, settings)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    server = _graceful_server(uvicorn, config, app.state.service)
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
    url_host = f"[{host}]" if ":" in host else host
    print(f"musetalk serve: http://{url_host}:{port} (docs at /docs)", flush=True)
    hangups: list[int] = []
    hup = getattr(signal, "SIGHUP", None)

    def on_hangup(signum: int, frame: Any) -> None:
        hangups.append(signum)
        server.handle_exit(signum, frame)

    previous_hup = signal.signal(hup, on_hangup) if hup is not None and _main_thread() else None
    try:
        server.run(sockets=[sock])  # uvicorn turns SIGINT / SIGTERM into its graceful stop, then re-raises them
    finally:
        sock.close()
        if hup is not None and previous_hup is not None:
            signal.signal(hup, previous_hup)
    if hangups:  # re-raised like uvicorn does for SIGINT / SIGTERM: the CLI then exits with 128 + SIGHUP
        signal.raise_signal(hangups[0])
    return 0 if server.started else 1


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _graceful_server(uvicorn: Any, config: Any, service: Any) -> Any:
    """A uvicorn.Server whose first stop signal also refuses new jobs and cancels the queued ones at once, and
    cancels the running job after the shutdown grace (uvicorn itself first waits for open connections)."""

    class GracefulServer(uvicorn.Server):
        stopping = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if not self.stopping:  # a thread: the signal handler must not take the service's lock itself
                self.stopping = True
                threading.Thread(target=stop_service, args=(service,), name="musetalk-stop", daemon=True).start()

    return GracefulServer(config)


def stop_service(service: Any) -> None:
    """Refuse new jobs and cancel the queued ones now; give the running one ``shutdown_grace_s``, then cancel it."""
    service.begin_shutdown()
    deadline = time.monotonic() + service.settings.shutdown_grace_s
    while service.snapshot()["running"] is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    service.begin_shutdown(cancel_running=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m musetalk.frontends.server.cli``: the same as ``musetalk serve``."""
    from musetalk.errors import MuseTalkError

    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # as musetalk.frontends.cli.main, before torch is imported
    parser = argparse.ArgumentParser(prog="musetalk serve", description="HTTP API for MuseTalk lip-sync")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from musetalk.frontends.signals import exit_status, interrupt_signal, signal_name, stop_signals_as_interrupt

    with stop_signals_as_interrupt():  # the except clauses run inside: they read the signal
        try:
            return run_serve(args)
        except MuseTalkError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.fix:
                print(f"  fix: {exc.fix}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:  # the signal uvicorn re-raised after its graceful stop
            print(f"interrupted ({signal_name(interrupt_signal(exc))}): server stopped, temporary files removed",
                  file=sys.stderr)
            return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
