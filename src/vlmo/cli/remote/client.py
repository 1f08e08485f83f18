"""The command line as a client of a `vlmo serve` API: a resident model on a Unix socket, or any server by URL.

    server = Server.at_url("http://gpu-box:8000", api_key="…")         # or Server.at_socket(path, …)
    model = RemoteModel(server, "vlmo/shapes")
    model.texts(["a.png"], tasks.ask("what colour is the circle?"), {"max_new_tokens": 8})   # ["yellow"]

It speaks the server's own endpoints (`/v1/chat/completions`, `/v1/detect`, `/v1/segment`, `/health`), sends the
image's bytes (a data: URI; never a path the server would have to read), and turns every answer into what the
in-process command would have: the same text, the same `tasks.Answer` for detect and segment, and, for an error,
the same one-line message and exit code (the server adds them to its error body as `command_line`; see
`vlmo.serve.errors`). Only the standard library's http.client is used, and no torch is imported: the client's
whole cost is a process start and one request.

A wedged server costs a clear error, not a frozen shell: connecting has a timeout, and while an answer is awaited
a watchdog asks `/health` every few seconds on a second connection; when that is not answered in time, the
request is abandoned with an error that names the server (and, for a resident model, its log).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vlmo.errors import OptionError, VlmoError, braced

if TYPE_CHECKING:
    from vlmo.generation import GenerateOptions
    from vlmo.tasks import Answer, Prompt

TIMEOUT_ENV = "VLMO_SERVER_TIMEOUT"


def _timeout() -> float:
    """Seconds a server may stay silent (opening a connection, a /health probe, any short request) before a command
    gives up on it: VLMO_SERVER_TIMEOUT, default 10 (a generous bound: a healthy server answers in milliseconds)."""
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV) or 10.0)
    except ValueError:
        return 10.0
    return seconds if 0 < seconds < 86400 else 10.0


PROBE_EVERY = 5.0  # seconds between /health probes while an answer is awaited
KEEP_ALIVE_HEADER = "X-Vlmo-Keep-Alive"
# HTTP statuses whose errors are the request's fault: the command exits 2 for them, as for a usage error.
USAGE_STATUSES = frozenset({400, 404, 413, 422})


class ServerError(VlmoError):
    """An error answer from the server, as the command line says it (message, and `exit_code` 1 or 2)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ServerUnreachable(VlmoError):
    """The server could not be reached or stopped answering (exit 1)."""


class ServerSilent(ServerUnreachable):
    """The server took a connection but did not answer within the timeout: it is there, and wedged."""


@dataclass
class Server:
    """Where a server is: `url` (http or https, with any path prefix before /v1) or a Unix `socket` path.

    name: how messages call it; log: a file that says more (a resident model's log); headers: sent with every
    request (the API key, a resident's keep-alive).
    """

    name: str
    host: str = ""
    port: int | None = None
    tls: bool = False
    prefix: str = ""
    socket: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    connect_timeout: float = field(default_factory=_timeout)
    health_timeout: float = field(default_factory=_timeout)
    probe_every: float = field(default_factory=lambda: min(PROBE_EVERY, _timeout()))

    @classmethod
    def at_url(cls, url: str, api_key: str | None = None) -> Server:
        """A server by URL: `http://host:8000`, with or without a trailing `/v1` (as OpenAI clients take it)."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError(
                f"{{server}} must be an http(s) URL such as http://host:8000, got {braced(url)}", server=None
            )
        try:
            port = parts.port
        except ValueError:
            raise OptionError(f"{{server}} has a bad port: {braced(url)}", server=None) from None
        prefix = parts.path.rstrip("/").removesuffix("/v1")
        server = cls(name=url.strip(), host=parts.hostname, port=port, tls=parts.scheme == "https", prefix=prefix)
        if api_key:
            server.headers["Authorization"] = f"Bearer {api_key}"
        return server

    @classmethod
    def at_socket(cls, path: Path, name: str, log: Path | None = None) -> Server:
        return cls(name=name, socket=path, log=log)

    # -- requests ---------------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float | None = None) -> dict[str, Any]:
        """GET `path` and its JSON answer; a short request, bounded by `timeout` (default: health_timeout)."""
        conn = self._connect(timeout or self.health_timeout)
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            response = conn.getresponse()
            return self._json(response, response.read())
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None
        finally:
            conn.close()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` as JSON and wait, however long generating takes, for the JSON answer (watched)."""
        conn = self._connect(self.connect_timeout)
        with self._watched(conn) as stalled:
            try:
                response = self._send(conn, path, body)
                return self._json(response, response.read())
            except (OSError, http.client.HTTPException) as e:
                raise self._unreachable(e, stalled) from None
            finally:
                conn.close()

    def events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` and yield the server-sent events of its streamed answer (watched); an error event raises."""
        conn = self._connect(self.connect_timeout)
        with self._watched(conn) as stalled:
            try:
                response = self._send(conn, path, body)
                if response.status != 200:
                    self._json(response, response.read())  # raises the error it holds
                for raw in response:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise _error(event, 500, self)
                    yield event
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise self._unreachable(e, stalled) from None
            finally:
                conn.close()

    def healthy(self) -> str | None:
        """None when `/health` answers ok in time; else what is wrong, in a few words."""
        try:
            answer = self.get("/health")
        except VlmoError as e:
            return str(e)
        return None if answer.get("status") == "ok" else f"its health check says {answer.get('status')!r}"

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.socket is not None:
            conn = _UnixConnection(self.socket, timeout)
        elif self.tls:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise self._unreachable(e) from None
        return conn

    def _send(self, conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> http.client.HTTPResponse:
        assert conn.sock is not None
        conn.sock.settimeout(None)  # generating may take long; the watchdog bounds a server that stopped answering
        payload = json.dumps(body).encode()
        conn.request("POST", self.prefix + path, payload, {**self.headers, "Content-Type": "application/json"})
        return conn.getresponse()

    def _json(self, response: http.client.HTTPResponse, raw: bytes) -> dict[str, Any]:
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        if response.status != 200 or not isinstance(answer, dict):
            raise _error(answer, response.status, self)
        return answer

    @contextmanager
    def _watched(self, conn: http.client.HTTPConnection) -> Iterator[list[str]]:
        """While the block runs, probe `/health` every `probe_every` s; when a probe fails, note why (in the list
        yielded) and shut the connection, so that the block's read fails at once instead of waiting forever."""
        done = threading.Event()
        stalled: list[str] = []

        def watch() -> None:
            while not done.wait(self.probe_every):
                problem = self.healthy()
                if problem is not None and not done.is_set():
                    stalled.append(problem)
                    try:
                        if conn.sock is not None:
                            conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return

        watchdog = threading.Thread(target=watch, name="vlmo-watchdog", daemon=True)
        watchdog.start()
        try:
            yield stalled
        finally:
            done.set()

    def _unreachable(self, e: BaseException, stalled: list[str] | None = None) -> ServerUnreachable:
        see = f"; see its log {self.log}" if self.log is not None else ""
        if stalled:
            return ServerUnreachable(f"the model server {self.name} stopped answering ({stalled[0]}){see}")
        if isinstance(e, TimeoutError | socket.timeout):
            return ServerSilent(f"the model server {self.name} did not answer in {self.health_timeout:g} s{see}")
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return ServerUnreachable(f"cannot reach the model server {self.name}: {why}{see}")


def _error(answer: object, status: int, server: Server) -> ServerError:
    """The server's error answer as the command line's error: its `command_line` rendering when it sent one."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return ServerError(f"the model server {server.name} answered HTTP {status} without an error message", 1)
    cli = error.get("command_line")
    if isinstance(cli, dict) and isinstance(cli.get("message"), str) and cli.get("exit_code") in (1, 2):
        return ServerError(cli["message"], int(cli["exit_code"]))
    message = str(error.get("message") or f"HTTP {status}")
    if status == 401:
        return ServerError(
            f"the model server {server.name} refused the API key ({message}); pass --api-key or set VLMO_API_KEY", 1
        )
    return ServerError(message, 2 if status in USAGE_STATUSES else 1)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix domain socket (the resident model's)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


# -- answers ------------------------------------------------------------------------------------------------------


class RemoteModel:
    """The command line's questions to a server, answered as the in-process `VLMo` answers them.

    model: the model id sent with each request (None: whatever the server serves; a server that serves another
    model answers 404, which the command line says as such). `name`: the id of the model that answered (what the
    server says in its answers; `model` until one came).
    """

    def __init__(self, server: Server, model: str | None = None, name: str | None = None) -> None:
        self.server, self.model = server, model
        self.name = model or name or ""

    def _answered(self, answer: dict[str, Any]) -> dict[str, Any]:
        if isinstance(answer.get("model"), str):
            self.name = answer["model"]
        return answer

    def texts(self, images: list[str], prompt: Prompt, options: GenerateOptions) -> list[str]:
        """One answer per image, asked all at once so that the server batches them (row i samples with seed + i,
        as a batch in-process does)."""
        if len(images) == 1:
            return [self._text(images[0], prompt, options, 0)]
        with ThreadPoolExecutor(max_workers=min(len(images), 8)) as pool:
            futures = [pool.submit(self._text, image, prompt, options, i) for i, image in enumerate(images)]
            return [f.result() for f in futures]

    def stream(self, image: str, prompt: Prompt, options: GenerateOptions) -> Iterator[str]:
        """The answer's text as it comes."""
        body = {**self._chat(image, prompt, options, 0), "stream": True}
        for event in self.server.events("/v1/chat/completions", body):
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text

    def run(self, image: str, prompt: Prompt, options: GenerateOptions) -> Answer:
        """A detect or segment answer (`tasks.Answer`, rebuilt from the server's JSON)."""
        from vlmo.tasks import Answer

        if options.get("stop"):
            raise OptionError("{stop} is for text answers; leave it out for detect and segment", stop=None)
        labels = prompt.text.split(" ", 1)[1]
        body = {"image": _data_uri(image), "labels": labels, **self._sampling(prompt, options, 0)}
        answer = self._answered(self.server.post(f"/v1/{prompt.task}", body))
        payload = {k: v for k, v in answer.items() if k not in ("model", "usage")}
        return Answer.from_payload(prompt, payload)

    def _text(self, image: str, prompt: Prompt, options: GenerateOptions, row: int) -> str:
        answer = self._answered(self.server.post("/v1/chat/completions", self._chat(image, prompt, options, row)))
        return str(answer["choices"][0]["message"]["content"])

    def _chat(self, image: str, prompt: Prompt, options: GenerateOptions, row: int) -> dict[str, Any]:
        content = [
            {"type": "image_url", "image_url": {"url": _data_uri(image)}},
            {"type": "text", "text": prompt.text},  # a task's prompt: the server takes it as it is
        ]
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": content}],
            **self._sampling(prompt, options, row),
        }
        if options.get("stop"):
            body["stop"] = list(options["stop"])
        return body

    def _sampling(self, prompt: Prompt, options: GenerateOptions, row: int) -> dict[str, Any]:
        """The request's generation fields for `options` (the library's): greedy unless do_sample."""
        body: dict[str, Any] = {"max_tokens": options.get("max_new_tokens", prompt.max_new_tokens)}
        if self.model is not None:
            body["model"] = self.model
        if options.get("do_sample"):
            body["temperature"] = options.get("temperature", 1.0)
            body["top_p"] = options.get("top_p", 1.0)
            body["top_k"] = options.get("top_k", 0)
        seed = options.get("seed")
        if seed is not None:
            body["seed"] = (seed + row) % 2**64
        return body


def _data_uri(image: str) -> str:
    """The image file's bytes as a data: URI (the server decodes them as the in-process command reads the file)."""
    return "data:application/octet-stream;base64," + base64.b64encode(Path(image).read_bytes()).decode("ascii")


__all__ = ["RemoteModel", "Server", "ServerError", "ServerSilent", "ServerUnreachable"]
