"""Command line: ``python -m gateway serve --config FILE``."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.cache import configured
from gateway.cache.host import SEGMENT_ENV, create_segment
from gateway.config import ConfigError, GatewayConfig, check_here, ignored_with_one_worker, load_config
from gateway.host_files import WORKERS_ENV, create_workers_folder

# What SIGHUP does to one uvicorn process (server.workers = 1): nothing. uvicorn's server handles
# only SIGINT and SIGTERM, and SIGHUP's default action would end the process at once, cutting off
# the requests in flight. (With workers > 1 the supervisor restarts the workers on SIGHUP, and
# they read the config again: gateway/supervisor.py.)
SIGHUP_IGNORED = (
    "SIGHUP ignored: with one worker (server.workers = 1) it reloads nothing. The rollout file and the "
    "model repository are read again on change by themselves; other settings take a restart "
    "(or server.workers > 1, where SIGHUP restarts the workers, which read the config again)"
)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The exit status of a gateway that cannot listen where its config says: uvicorn's own where it
# cannot bind (its STARTUP_FAILURE), whichever server was asked for.
CANNOT_LISTEN = 3


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, and the gateway's lines with their time and level (``LOG_FORMAT``), in
    this process and in every worker process, which uvicorn sets up with it anew (spawned
    workers inherit no handler: their lines came without either)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["gateway"] = {"format": LOG_FORMAT}
    config["handlers"]["gateway"] = {"class": "logging.StreamHandler", "formatter": "gateway", "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["gateway"], "level": level.upper()}
    return config


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, host=args.host, port=args.port)
        check_here(config)
    except ConfigError as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    host, port = config.server.host, config.server.port
    try:
        address = listen_address(host, port)
    except OSError as exc:  # one line, as for a bad configuration; uvicorn's own were several
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        print(f"gateway: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return CANNOT_LISTEN
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    for note in ignored_with_one_worker(config):
        logging.getLogger("gateway").warning(note)
    # Worker processes import the app by name and read the config file themselves.
    os.environ["GATEWAY_CONFIG"] = str(Path(args.config).resolve())
    workers = config.server.workers
    os.environ.pop(SEGMENT_ENV, None)  # only the segment and folder made here, if any
    os.environ.pop(WORKERS_ENV, None)
    segment = folder = None
    if workers > 1 and configured(config.cache) and config.cache.host_bytes > 0:
        # The workers share one cache store in memory (gateway/cache/host.py).
        try:
            segment = create_segment(config.cache.host_bytes)
        except OSError as exc:
            logging.getLogger("gateway").error("no cache shared between workers: %s", exc)
        if segment is not None:
            os.environ[SEGMENT_ENV] = str(segment)
    if workers > 1:
        # The workers' folder: each publishes its metrics there, for a scrape to sum them
        # (gateway/worker_metrics.py), and its count of connections (gateway/accept_balance.py),
        # and they share the driving of the model repository (gateway/upstream/repository_workers.py).
        try:
            folder = create_workers_folder()
        except OSError as exc:
            logging.getLogger("gateway").error(
                "no folder for the workers: /metrics will count each worker alone, each drives the repository,"
                " and connections are not balanced over the workers: %s",
                exc,
            )
        if folder is not None:
            os.environ[WORKERS_ENV] = str(folder)
    try:
        return _run(args, config, workers, address)
    finally:
        if segment is not None:
            segment.remove()
        if folder is not None:
            folder.remove()


def listen_address(host: str, port: int) -> str:
    """The IP address the gateway is to listen on, once a socket has been bound to it and
    ``port``, then closed; OSError where it cannot be (a name that does not resolve, an address
    not on this machine, a port in use). Checked before either server starts: uvicorn found out
    only after the app's startup (one worker), granian with a traceback. Bound as uvicorn binds
    (SO_REUSEADDR; an IPv6 address for IPv6 only, as asyncio's servers do), never beside another
    listener: not with SO_REUSEPORT, which granian sets, and which would let it share a port
    another server holds with it. ``host``, a name, resolves as uvicorn resolves it (IPv4 unless
    it holds a colon): granian takes only an IP address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        return str(sock.getsockname()[0])


def _run(args: argparse.Namespace, config: GatewayConfig, workers: int, address: str) -> int:
    """Serve until stopped; ``address``: server.host as an IP address (``listen_address``)."""
    if args.server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops

        Granian(
            "gateway.asgi:app_from_env",
            address=address,
            port=config.server.port,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            factory=True,
            workers=workers,
            log_access=False,
        ).serve()
        return 0

    import uvicorn

    from gateway.app import build_app
    from gateway.protocol.infer_server import InferHttpToolsProtocol

    settings: dict = dict(
        host=config.server.host,
        port=config.server.port,
        loop="uvloop",
        # httptools; small infer requests served by the protocol itself, without an ASGI cycle.
        http=InferHttpToolsProtocol,
        log_level=args.log_level,
        access_log=False,
        # Per-request work the gateway does not need: X-Forwarded-* rewriting and a Server header.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(config.server.shutdown_grace_s) + 1,
        log_config=log_config(args.log_level),
    )
    if workers == 1:
        with _sighup_ignored():
            uvicorn.run(build_app(config), **settings)
    else:
        # uvicorn's workers, refusing new connections once told to stop (gateway/supervisor.py),
        # with connections spread evenly over them (gateway/accept_balance.py) unless that is
        # not asked for or there is no folder for the workers to share.
        from gateway.supervisor import run_workers

        balance_through = os.environ.get(WORKERS_ENV, "") if config.server.balance_connections else ""
        return run_workers(uvicorn.Config("gateway.asgi:app_from_env", factory=True, workers=workers, **settings), balance_through)
    return 0


@contextmanager
def _sighup_ignored() -> Iterator[None]:
    """While a single uvicorn server runs: SIGHUP only logs ``SIGHUP_IGNORED``. Installed with
    ``signal.signal`` before the server starts, as uvicorn installs its own (SIGINT, SIGTERM,
    left as they are); the handler runs in the main thread, between the event loop's turns."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None:  # not on this platform
        yield
        return

    def on_hup(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("gateway").warning(SIGHUP_IGNORED)

    previous = signal.signal(hup, on_hup)
    try:
        yield
    finally:
        signal.signal(hup, previous)


def check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        check_here(config)
    except ConfigError as exc:  # said, not refused: a container's config names the container's paths
        print(f"note: on this machine, {exc}; `serve` refuses to start where it does not", file=sys.stderr)
    for note in ignored_with_one_worker(config):
        print(f"note: {note}", file=sys.stderr)
    print(f"{args.config}: ok ({len(config.upstream.instances)} instance(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="Triton fleet gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the gateway")
    p_serve.add_argument("--config", required=True, help="TOML config file (see configs/local.toml)")
    p_serve.add_argument("--host", help="override server.host")
    p_serve.add_argument("--port", type=int, help="override server.port")
    p_serve.add_argument(
        "--server", default="uvicorn", choices=["uvicorn", "granian"], help="ASGI server (uvicorn+httptools is the default)"
    )
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p_serve.set_defaults(func=serve)
    p_check = sub.add_parser("check-config", help="validate a config file and exit")
    p_check.add_argument("--config", required=True)
    p_check.set_defaults(func=check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
