"""The web dashboard and the API's own docs pages, every asset served from this origin.

The dashboard is static files (HTML, CSS, ES modules and a vendored copy of uPlot) that talk to the public
API with the key the user pastes, so it can never show more than that key may see. Nothing is built at
install time and nothing is fetched from a CDN: an offline machine renders it, and `/docs` and `/redoc`,
whose assets come from the `fastapi-offline` package instead of jsDelivr.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)

DASHBOARD = Path(__file__).resolve().parent / "static" / "dashboard"
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"

# The page runs only our own scripts and talks only to our own API: an injected string that slipped past
# the DOM-building code still could not load or send anything elsewhere.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new release's page must not run against a cached older script; assets revalidate by ETag.
    "Cache-Control": "no-cache",
}

REDOC_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'")

_dashboard_assets = StaticFiles(directory=DASHBOARD)
_docs_assets = StaticFiles(directory=DOCS_ASSETS)


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(DASHBOARD / "index.html", media_type="text/html", headers=DASHBOARD_HEADERS)


@router.get("/dashboard/assets/{path:path}")
async def dashboard_asset(path: str, request: Request) -> Response:
    # StaticFiles refuses paths outside its directory and answers conditional requests with 304.
    response = await _dashboard_assets.get_response(path, request.scope)
    response.headers.update({k: v for k, v in DASHBOARD_HEADERS.items() if k != "Content-Security-Policy"})
    return response


@router.get("/docs/assets/{path:path}")
async def docs_asset(path: str, request: Request) -> Response:
    return await _docs_assets.get_response(path, request.scope)


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc with their scripts from our origin (the app is created with
    docs_url=None and redoc_url=None)."""
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} — API docs",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png",
                                   oauth2_redirect_url="/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url="/openapi.json", title=f"{title} — API reference",
                              redoc_js_url="/docs/assets/redoc.standalone.js",
                              redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False)
        # ReDoc's footer fetches its vendor's logo from a CDN; the page keeps to our origin (its styles are
        # inline, its search runs in a blob worker).
        page.headers["Content-Security-Policy"] = REDOC_POLICY
        return page
