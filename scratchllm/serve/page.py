"""The web chat page of `scratchllm serve`: open http://127.0.0.1:8000/ in a browser.

    GET  /                  the page (static/chat.html)
    GET  /static/{name}     its script and style sheet (chat.js, chat.css)

The page is plain HTML, CSS and JavaScript shipped inside the package: no build step, nothing loaded
from elsewhere, so it works offline. It talks to the server's own OpenAI-compatible API like any
other client (streamed `POST v1/chat/completions`, `GET v1/models`, `GET health`), so the page itself
needs no API key: it asks for one when the API answers 401, and sends it as `Authorization: Bearer`.
The Content-Security-Policy lets the page run its own script only, a second guard besides showing
model output as text.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .schemas import APIError

ASSETS = {"chat.css": "text/css", "chat.js": "text/javascript"}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
}


@functools.cache
def static_file(name: str) -> bytes:
    """A file of the package's static/ folder."""
    return (resources.files(__package__) / "static" / name).read_bytes()


router = APIRouter()


@router.get("/", include_in_schema=False)
async def chat_page() -> Response:
    return Response(static_file("chat.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"no static file {name!r}; the page has {', '.join(ASSETS)}", code="not_found")
    media_type = f"{ASSETS[name]}; charset=utf-8"
    return Response(static_file(name), media_type=media_type, headers=HEADERS)


__all__ = ["router", "static_file"]
