"""`rmserve serve`: settings from flags over RMSERVE_* environment, then uvicorn."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("rmserve.server")


def settings_from_args(args: argparse.Namespace) -> object:
    from service.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "runtime": args.runtime,
            "dtype": args.dtype,
            "host": args.host,
            "port": args.port,
            "api_key": args.api_key,
        }.items()
        if v is not None
    }
    return Settings(**overrides)


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


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.runtimes import resolve_model_dir
    from service.settings import Settings

    settings = settings_from_args(args)
    assert isinstance(settings, Settings)
    # Resolve (and check) the model before binding a port: a broken model directory is a clear
    # start-up error, never a half-started server.
    from models.reward_model import check_model_dir

    model_dir = resolve_model_dir(settings)
    check_model_dir(model_dir)
    settings.model = str(model_dir)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "binding %s: the service is reachable from other machines%s",
            settings.host,
            "" if settings.api_key else " and RMSERVE_API_KEY is not set",
        )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.request_timeout_s),
        access_log=False,
    )
    server = _graceful_server_class()(config)
    server.run()
    return 0 if server.started else 1
