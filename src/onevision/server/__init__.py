"""OpenAI-compatible HTTP server (`onevision serve`); needs the `server` extra: pip install 'onevision[server]'.

    from onevision.server import ServerConfig, create_app
    app = create_app(model, processor, ServerConfig(model_name="llava"))   # then run it with uvicorn
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("ServerConfig", "create_app"):
        from onevision.server import app

        return getattr(app, name)
    if name == "MediaLimits":
        from onevision.server.media import MediaLimits

        return MediaLimits
    raise AttributeError(f"module 'onevision.server' has no attribute {name!r}")


__all__ = ["MediaLimits", "ServerConfig", "create_app"]
