"""/docs (Swagger UI) and /redoc served with no CDN: their JavaScript and CSS come from the
`fastapi-offline` package's static folder (a pip dependency), so the pages work offline."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

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


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    if not local_assets():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI")
    return get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{PREFIX}/favicon.png",
    )


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    app = request.app
    if not local_assets():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc")
    return get_redoc_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{PREFIX}/favicon.png",
        with_google_fonts=False,
    )
