"""`rmserve serve`: settings from flags over RMSERVE_* environment, then uvicorn."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

    from service.settings import Settings

log = logging.getLogger("rmserve.server")


def settings_from_args(args: argparse.Namespace) -> object:
    from service.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "model_format": getattr(args, "model_format", None),
            "runtime": args.runtime,
            "dtype": args.dtype,
            "forward": getattr(args, "forward", None),
            "device": getattr(args, "device", None),
            "host": args.host,
            "port": args.port,
            "api_key": args.api_key,
            "api_key_file": getattr(args, "api_key_file", None),
        }.items()
        if v is not None
    }
    if args.api_key is not None:
        log.warning(
            "--api-key puts the key on the command line, where every user of this machine sees it in `ps`; "
            "use --api-key-file or RMSERVE_API_KEY_FILE (a mounted secret) instead"
        )
    return Settings(**overrides)


PROBE_RESERVE = 64  # connections accepted past max_connections when none can be evicted: probes only


def uvicorn_config(app: Any, settings: Settings, **extra: Any) -> uvicorn.Config:
    """uvicorn's options for the bounded edge: the keep-alive timeout, and the h11 protocol with the
    connection cap (oldest idle evicted, room kept for probes), the header cap and deadline, and the
    pipelining bound (service/protocol.py). uvicorn's own `limit_concurrency` is not used: it answers a
    plain-text 503 to everything, probes included. The body limit and body deadline are the ASGI edge's
    (service/edge.py)."""
    import uvicorn

    from service.protocol import bounded_h11

    metrics = getattr(getattr(getattr(app, "state", None), "rm", None), "metrics", None)
    protocol = bounded_h11(
        settings.max_header_bytes,
        settings.header_timeout_s,
        metrics.connection_refusal if metrics is not None else None,
        max_connections=settings.max_connections,
        probe_reserve=PROBE_RESERVE,
        max_pipelined=settings.max_pipelined,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        # h11's own cap on an incomplete event: a backstop behind the protocol's 431
        "h11_max_incomplete_event_size": 2 * settings.max_header_bytes,
        "timeout_graceful_shutdown": int(settings.request_timeout_s),
        "access_log": False,
        "log_level": "info",
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


def _graceful_server_class() -> type:
    import contextlib
    import signal
    import threading
    from collections.abc import Iterator

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT end in a clean exit 0 after in-flight work finishes
        (uvicorn re-raises the signal after shutdown, which makes the exit status -15)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def raise_open_files(needed: int) -> int:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) towards `needed`, within the hard
    limit; returns the soft limit now in force. Every connection is a file: below the connection cap plus
    the probe reserve, accept() fails (EMFILE) before the cap can answer anything."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return needed if soft == resource.RLIM_INFINITY else int(soft)


def serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.runtimes import resolve_model_dir
    from service.settings import Settings

    settings = settings_from_args(args)
    assert isinstance(settings, Settings)
    # Resolve (and check) the model before binding a port: a broken model directory is a clear
    # start-up error, never a half-started server.
    from models.reward_model import check_model_dir

    model_dir = resolve_model_dir(settings)
    check_model_dir(model_dir, settings.model_format)
    settings.model = str(model_dir)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "binding %s: the service is reachable from other machines%s",
            settings.host,
            "" if settings.api_key else " and RMSERVE_API_KEY is not set",
        )
    if settings.auth_open_routes and settings.api_key is None:
        log.warning("RMSERVE_AUTH_OPEN_ROUTES=true but no API key is set: every route is open")
    needed = settings.max_connections + PROBE_RESERVE + 256  # + model files, threads' pipes, the log
    limit = raise_open_files(needed)
    if limit < needed:
        log.warning(
            "open files are limited to %d (ulimit -n; hard limit reached): RMSERVE_MAX_CONNECTIONS=%d needs "
            "about %d; lower RMSERVE_MAX_CONNECTIONS or raise the limit",
            limit,
            settings.max_connections,
            needed,
        )
    app = create_app(settings)
    server = _graceful_server_class()(uvicorn_config(app, settings))
    server.run()
    return 0 if server.started else 1
