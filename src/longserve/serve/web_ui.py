"""The web chat page: ``/`` (index.html) and ``/static/*`` from the package's ``static/`` folder.

Plain files, no build step and nothing fetched from other origins, so the page works offline. It needs no API
key to load (the key guards ``/v1/*``, which the page calls with the key typed into it). Turned off
(``ServeConfig.web_ui``, ``--no-web-ui``), ``/`` answers 404 in the API's error shape.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from longserve.serve.errors import APIError

STATIC_DIR = Path(__file__).with_name("static")
# The page loads only its own files and talks only to this server; an injected script or a stray CDN link
# would be refused by the browser rather than run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def mount_web_ui(app: FastAPI, enabled: bool = True) -> None:
    """Serve the chat page at ``/`` and its scripts and styles under ``/static``; not ``enabled``: ``/`` is
    a 404 that says the page is turned off (rather than a bare "Not Found" an operator has to puzzle over)."""
    if not enabled:

        @app.get("/", include_in_schema=False)
        async def no_chat_page() -> None:
            raise APIError(
                "The web chat page is turned off on this server (--no-web-ui); the API is at /v1",
                status=404,
                code="web_ui_disabled",
            )

        return
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise RuntimeError(f"the web chat page is missing from the installed package ({index} not found)")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(
            index,
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["STATIC_DIR", "mount_web_ui"]
