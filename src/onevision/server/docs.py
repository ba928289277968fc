"""`/docs` (Swagger UI) with its assets served by this server, so the page works offline.

Off unless ServerConfig(docs=True) / `onevision serve --docs`. The assets come from the `swagger-ui-bundle`
package (`pip install 'onevision[docs]'`); without it `/docs` is a plain local page linking /openapi.json.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

ASSETS = "/docs-assets"


def _assets_dir() -> str | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


def add_docs(app: FastAPI) -> None:
    """Mount /docs with local assets only (no CDN script, css or favicon)."""
    assets = _assets_dir()
    if assets is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount(ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return HTMLResponse("<!doctype html><title>onevision API</title><h1>onevision API</h1><p>The schema is at "
                                "<a href=\"/openapi.json\">/openapi.json</a>. For the interactive page install "
                                "<code>swagger-ui-bundle</code> (<code>pip install 'onevision[docs]'</code>).</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="onevision API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")
