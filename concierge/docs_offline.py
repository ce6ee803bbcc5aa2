"""The API's documentation pages served from installed files, so they work offline.

FastAPI's own ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a CDN: on a machine
without the internet (a hospital network, this demo on a train) they are blank. Here both pages
are FastAPI's own HTML (:func:`fastapi.openapi.docs.get_swagger_ui_html`,
:func:`~fastapi.openapi.docs.get_redoc_html`) pointed at the Swagger UI and ReDoc bundles that
the ``fastapi-offline`` package ships, served by the API under :data:`STATIC_PATH`. Nothing on
either page is fetched from anywhere but the API itself (the online validator badge and Google
Fonts are off, and ReDoc's footer logo, which its bundle loads from its makers' CDN, is the
local favicon instead).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

#: Where the bundles are served.
STATIC_PATH = "/docs-static"
#: The installed files: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png.
STATIC_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
#: ReDoc's bundle with its one remote image (the footer logo) pointed at the local favicon.
REDOC_JS = f"{STATIC_PATH}/redoc.offline.js"
_REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def install_offline_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from installed files. Build
    the app with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not there too."""
    if not (STATIC_DIR / "swagger-ui-bundle.js").is_file():  # pragma: no cover - packaging
        raise RuntimeError(f"Swagger UI files are missing from {STATIC_DIR}")
    title = app.title
    redoc_bundle: list[bytes] = []

    # Plain routes, as FastAPI's own documentation routes are (named like them), not API
    # operations. This one comes before the mount, which would answer every path under it.
    async def redoc_js(request: Request) -> Response:
        if not redoc_bundle:
            text = (STATIC_DIR / "redoc.standalone.js").read_text(encoding="utf-8")
            redoc_bundle.append(text.replace(_REDOC_LOGO, f"{STATIC_PATH}/favicon.png").encode())
        return Response(
            redoc_bundle[0],
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    app.add_route(REDOC_JS, redoc_js, include_in_schema=False, name="redoc_offline_js")
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="docs-static")

    def openapi_url(request: Request) -> str:
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}{app.openapi_url}"

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=openapi_url(request),
            title=f"{title} - API docs",
            swagger_js_url=f"{root}{STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_PATH}/favicon.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
            swagger_ui_parameters={"validatorUrl": None},  # no badge from the online validator
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=openapi_url(request),
            title=f"{title} - API reference",
            redoc_js_url=f"{root}{REDOC_JS}",
            redoc_favicon_url=f"{root}{STATIC_PATH}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route(docs_url, swagger_ui, include_in_schema=False, name="swagger_ui_html")
    app.add_route(
        OAUTH2_REDIRECT, swagger_ui_redirect, include_in_schema=False, name="swagger_ui_redirect"
    )
    app.add_route(redoc_url, redoc, include_in_schema=False, name="redoc_html")


__all__ = ["STATIC_DIR", "STATIC_PATH", "install_offline_docs"]
