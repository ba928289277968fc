"""The chat page at GET / (plain HTML + CSS + one ES module, no build step, nothing fetched from elsewhere).
The page itself needs no key; every API call it makes carries the key the user typed (kept in sessionStorage)."""

from __future__ import annotations

from importlib import resources

from fastapi.responses import Response

_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/web/style.css": ("style.css", "text/css; charset=utf-8")}
# only this origin; media previews are data:/blob: URLs made in the page
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data: blob:; media-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


def add_routes(app) -> None:
    """Register GET / and the page's two assets on `app`."""
    for path, (name, mime) in _FILES.items():
        body = resources.files(__name__).joinpath(name).read_bytes()

        async def asset(body=body, mime=mime):
            return Response(body, media_type=mime, headers={"content-security-policy": _CSP,
                                                            "cache-control": "no-cache",
                                                            "x-content-type-options": "nosniff"})

        app.add_api_route(path, asset, methods=["GET"], include_in_schema=False)
