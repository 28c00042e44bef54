"""ASGI middleware in front of every route: the API key, and the request body's size and time.

Plain ASGI (not BaseHTTPMiddleware), so streaming and disconnect detection pass through.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.serve.errors import APIError, error_response

_TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})


class APIKeyMiddleware:
    """Refuse requests to the protected paths without ``Authorization: Bearer KEY``, before the
    body is read. ``/v1/*``, ``/tokenize`` and ``/detokenize`` are protected; ``/metrics`` too
    when asked."""

    def __init__(self, app: ASGIApp, api_key: str, protect_metrics: bool = False) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protect_metrics = protect_metrics

    def _protected(self, path: str) -> bool:
        return (path.startswith("/v1/") or path in _TOKENIZER_PATHS
                or (self.protect_metrics and path == "/metrics"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._protected(scope["path"]):
            auth = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value
            if not hmac.compare_digest(auth.strip(), self.expected):
                err = APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Read each request's body up to ``max_bytes`` before the app sees it.

    A declared ``Content-Length`` over the limit is refused at once (413) without reading a
    byte; a chunked body is refused as soon as it passes the limit; a body not complete within
    ``timeout_s`` gets 408 (a client trickling a body would otherwise hold a connection
    forever). The app then reads the body from memory, and later ``receive``
    calls (disconnect detection) go to the client as before.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, num_bytes: int | None) -> APIError:
        size = f" ({num_bytes} bytes)" if num_bytes is not None else ""
        return APIError(
            413, f"the request body is too large{size}; this server takes at most "
            f"{self.max_bytes} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(APIError(400, "invalid Content-Length"))(
                        scope, receive, send
                    )
                    return
                if declared > self.max_bytes:
                    await error_response(self._too_large(declared))(scope, receive, send)
                    return
        chunks: list[bytes] = []
        num_bytes = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client is gone: nothing to answer
                    chunk = message.get("body", b"")
                    num_bytes += len(chunk)
                    if num_bytes > self.max_bytes:
                        await error_response(self._too_large(None))(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            err = APIError(408, f"the request body did not arrive within {self.timeout_s:.0f} s")
            await error_response(err)(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
