"""The gate in front of every route: API key and body size, answered in the error envelope.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware) so streaming responses and the
client-disconnect signal pass through untouched: the body is read here, checked, and replayed.
"""
from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparsekv.api.errors import error_body

OPEN_PATHS = ("/health",)


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _reject(send, 401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.")
        length = headers.get(b"content-length", b"0")
        too_large = f"Request body exceeds the limit of {self.max_body_bytes} bytes."
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await _reject(send, 413 if length.isdigit() else 400,
                                 too_large if length.isdigit() else "Invalid Content-Length header.")
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        body, more = [], True
        size = 0
        while more:  # the actual bytes count, whatever Content-Length claimed
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await _reject(send, 413, too_large)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(body), receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest(headers.get(b"authorization", b""), expected)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (which later says when the client disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()
    return replay


async def _reject(send: Send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
