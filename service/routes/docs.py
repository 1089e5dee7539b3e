"""/docs (Swagger UI) and /redoc served with no CDN: their JavaScript and CSS come from the
`fastapi-offline` package's static folder (a pip dependency), so the pages work offline."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, JSONResponse

from service.errors import ServiceError

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

PREFIX = "/static/docs"
FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def static_dir() -> Path | None:
    """The folder holding Swagger UI's and ReDoc's files, or None when fastapi-offline is missing."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in FILES) else None


class DocsAssetMissing(ServiceError):
    status = 404
    type = "not_found"


@router.get(PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    folder = static_dir()
    if name not in FILES or folder is None:
        raise DocsAssetMissing(f"no docs asset {name!r}; the docs assets are {', '.join(FILES)}")
    return FileResponse(folder / name, media_type=FILES[name], headers={"Cache-Control": "public, max-age=86400"})


def local_assets() -> bool:
    if static_dir() is None:
        log.warning("fastapi-offline is not installed: /docs and /redoc load their files from a CDN")
        return False
    return True


OPENAPI_URL = "/openapi.json"


async def cached(request: Request, name: str, render: Callable[[FastAPI], Response]) -> Response:
    """The static document `name`, rendered once per app (on a worker thread: the OpenAPI schema takes
    a while, and the event loop must keep answering probes) and served from memory afterwards: a flood of
    requests for it (pipelined, say) costs a copy of bytes each, never a render."""
    app = request.app
    store: dict[str, tuple[bytes, str]] | None = getattr(app.state, "rm_docs", None)
    if store is None:
        store = app.state.rm_docs = {}
        app.state.rm_docs_lock = asyncio.Lock()
    if name not in store:
        async with app.state.rm_docs_lock:
            if name not in store:
                rendered = await asyncio.to_thread(render, app)
                store[name] = (bytes(rendered.body), rendered.media_type or "text/html")
    body, media_type = store[name]
    return Response(body, media_type=media_type)


def _openapi(app: FastAPI) -> Response:
    return JSONResponse(app.openapi())


def _swagger(app: FastAPI) -> Response:
    title = f"{app.title} - Swagger UI"
    if not local_assets():
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=title)
    return get_swagger_ui_html(
        openapi_url=OPENAPI_URL,
        title=title,
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{PREFIX}/favicon.png",
    )


def _redoc(app: FastAPI) -> Response:
    title = f"{app.title} - ReDoc"
    if not local_assets():
        return get_redoc_html(openapi_url=OPENAPI_URL, title=title)
    return get_redoc_html(
        openapi_url=OPENAPI_URL,
        title=title,
        redoc_js_url=f"{PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{PREFIX}/favicon.png",
        with_google_fonts=False,
    )


DOCUMENTS: dict[str, Callable[[FastAPI], Response]] = {
    "openapi": _openapi,
    "docs": _swagger,
    "redoc": _redoc,
}


async def prerender(app: FastAPI) -> None:
    """Render the static documents at start-up (on a worker thread, while the model loads), so that no
    request, nor a flood of them, waits for a render."""
    store: dict[str, tuple[bytes, str]] = {}
    for name, render in DOCUMENTS.items():
        rendered = await asyncio.to_thread(render, app)
        store[name] = (bytes(rendered.body), rendered.media_type or "text/html")
    app.state.rm_docs_lock = asyncio.Lock()
    app.state.rm_docs = store | (getattr(app.state, "rm_docs", None) or {})


@router.get(OPENAPI_URL)
async def openapi(request: Request) -> Response:
    """The OpenAPI schema (FastAPI's own route is off: it re-serializes the schema on every request)."""
    return await cached(request, "openapi", DOCUMENTS["openapi"])


@router.get("/docs")
async def swagger_ui(request: Request) -> Response:
    return await cached(request, "docs", _swagger)


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect(request: Request) -> Response:
    return await cached(request, "oauth2-redirect", lambda app: get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc(request: Request) -> Response:
    return await cached(request, "redoc", _redoc)
