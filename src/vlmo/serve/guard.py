"""What every request passes through before and after its route: the API key, the body cap, the log line and the
request metrics. A plain ASGI wrapper, so it sees the whole body before any route parses it and the last byte of
every answer, streamed ones included.

- API key: with a key set, every path but `/health` needs `Authorization: Bearer KEY`, compared in constant time
  (`secrets.compare_digest`), else 401 (after the body, up to the cap, is read and dropped, as below).
- Body cap: a body over the cap is refused with 413, whether its `Content-Length` says so or a body without one
  (chunked) or that lies about it passes the cap as it arrives; nothing over the cap is kept in memory. Before the
  413 goes out, the rest of the body is read and dropped (at most `DRAIN_BYTES`, for `DRAIN_SECONDS`): a client
  such as httpx or the openai client sends its whole body before it reads the answer, and a server that closes
  the connection on unread data resets it, so the client would see a broken connection instead of the 413. A
  client that sent `Expect: 100-continue` (curl does for large bodies) gets the 413 before it sends anything.
  Bodies are JSON, parsed whole anyway, so the guard reads the body and hands it on.
- One line per request on stderr: method, path, status, tokens (prompt+completion, when it generated), seconds.
  A request whose client left before its answer is logged with status 499 (nginx's "client closed request").
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from typing import Any

from vlmo.serve.errors import ApiError
from vlmo.serve.launch import say
from vlmo.serve.metrics import ServerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
CLIENT_CLOSED = 499
# How much of a refused body is read and dropped so that its client can read the 413 (see the module docstring).
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0
# Where a route leaves its token counts for the log line: request.state.tokens = (prompt, completion).
TOKENS_STATE = "tokens"


class RequestGuard:
    """Wraps the app (see the module docstring). `endpoints`: the paths counted by name in the metrics (others
    count as "other", so that scanning random URLs cannot grow the metrics without bound)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        metrics: ServerMetrics,
        endpoints: frozenset[str],
        log: Callable[[str], None] = say,
    ) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.endpoints = endpoints
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        state = scope.setdefault("state", {})
        try:
            refused = self._refusal(scope)
            if refused is None:
                body, refused = await self._read_body(scope, receive)
            elif not _expects_continue(scope):  # the client is sending its body: let it, so it reads the answer
                await _drain(receive, 0, self.max_body_bytes)
            if refused is not None:
                await _send_error(refused, sending)
            else:
                await self.app(scope, _replay(body, receive), sending)
        finally:
            code = status[0] if status else CLIENT_CLOSED
            seconds = time.perf_counter() - began
            path = scope.get("path", "")
            self.metrics.answered(path if path in self.endpoints else "other", code, seconds)
            tokens = state.get(TOKENS_STATE) if isinstance(state, dict) else None
            spent = f" tokens={tokens[0]}+{tokens[1]}" if tokens else ""
            self.log(f"{scope.get('method', '?')} {path} {code}{spent} {seconds:.3f}s")

    def _refusal(self, scope: Scope) -> ApiError | None:
        """The answer before the body is read: 401 without the right key, 413 for a body declared over the cap
        that the client holds back until told to send it (`Expect: 100-continue`); None to go on."""
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            given = _bearer(scope)
            if given is None or not secrets.compare_digest(given, self.key):
                return ApiError(
                    401,
                    "missing or wrong API key; send the header Authorization: Bearer <key>",
                    "authentication_error",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            if _expects_continue(scope):
                return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        limit = f"{self.max_body_bytes / 2**20:.3g} MB"
        return ApiError(413, f"the request body is larger than the server's limit of {limit}", code="payload_too_large")

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, ApiError | None]:
        """The whole body, or the 413 answer as soon as it passes the cap."""
        if scope.get("method") in ("GET", "HEAD"):
            return b"", None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await _drain(receive, size, DRAIN_BYTES)
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _expects_continue(scope: Scope) -> bool:
    """Whether the client waits for `100 Continue` before it sends its body (curl does for large bodies)."""
    return (_header(scope, b"expect") or "").lower() == "100-continue"


async def _drain(receive: Receive, size: int, limit: int) -> None:
    """Read and drop the rest of a refused body, until `size` bytes in all pass `limit`, within DRAIN_SECONDS."""

    async def drop(size: int) -> None:
        while size <= limit:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            size += len(message.get("body", b""))

    with suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drop(size), DRAIN_SECONDS)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body read already, then the real one's messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1").strip()
    return None


def _bearer(scope: Scope) -> bytes | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    kind, _, token = value.partition(" ")
    return token.strip().encode("latin-1") if kind.lower() == "bearer" else None


async def _send_error(error: ApiError, send: Send) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if error.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


__all__ = ["CLIENT_CLOSED", "OPEN_PATHS", "TOKENS_STATE", "RequestGuard"]
