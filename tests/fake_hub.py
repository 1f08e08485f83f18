"""A fake Hugging Face Hub on 127.0.0.1, for tests that must never reach huggingface.co.

It answers what huggingface_hub 2.4 asks when `HfApi.model_info` and `hf_hub_download` run (read from
huggingface_hub/hf_api.py and file_download.py):

    GET  /api/models/{owner}/{name}[/revision/{rev}]  {"id", "sha", "siblings": [{"rfilename"}, ...]}
    HEAD /{owner}/{name}/resolve/{rev}/{file}          X-Repo-Commit, ETag (git blob sha1), Content-Length
    GET  /{owner}/{name}/resolve/{rev}/{file}          the bytes; Range requests get 206 + Content-Range
    GET  /cdn/{sha256}                                  bytes of an LFS file (*.safetensors, *.bin), Range too

As on the real hub, HEAD on an LFS file answers 302 to the "CDN" with X-Linked-Etag (the sha256) and
X-Linked-Size. The CDN is this same server reached as `localhost` rather than `127.0.0.1`: another origin,
so huggingface_hub does not follow the redirect and takes the metadata from the 302 itself, then downloads
from the `Location`. No Xet headers are sent, so every download is plain HTTP.

Errors: gated repos answer 401 or 403 with `X-Error-Code: GatedRepo` (or no code, see `gate`), unknown
repos 404 `RepoNotFound`, unknown revisions 404 `RevisionNotFound`, unknown files 404 `EntryNotFound`.
`cut(file)` makes the next response(s) for that file stop at a byte offset and close the connection, while
Content-Length promises the whole body; `stall(file)` makes them stop there and then send nothing more, with the
connection held open (a stalled download). Every request is logged in `requests`.

`SilentServer` is a hub that accepts connections and never answers at all.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".npz")


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it. `headers` keys are lower case."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _Revision:
    commit: str
    files: dict[str, bytes]


@dataclass
class _Cut:
    at: int | None  # absolute byte offset where the body stops; None: half the file
    times: int
    stall: bool = False  # hold the connection open after the cut instead of closing it


@dataclass
class FakeHub:
    """Serve repos from local directories. Use as a context manager, or call `start()` and `stop()`."""

    repos: dict[str, dict[str, _Revision]] = field(default_factory=dict)  # repo id -> revision -> files
    gated: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # repo id -> (status, X-Error-Code)
    requests: list[Seen] = field(default_factory=list)
    _cuts: dict[str, _Cut] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, directory: Path, revision: str = "main") -> str:
        """Serve every file under `directory` as `repo_id` at `revision`; returns the fake commit sha."""
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        digest = hashlib.sha1(f"{repo_id}@{revision}".encode())
        for name in sorted(files):
            digest.update(name.encode() + files[name])
        commit = digest.hexdigest()
        self.repos.setdefault(repo_id, {})[revision] = _Revision(commit, files)
        return commit

    def gate(self, repo_id: str, status: int = 401, error_code: str | None = "GatedRepo") -> None:
        """Refuse every request about `repo_id` with `status` (and `X-Error-Code` unless None)."""
        self.gated[repo_id] = (status, error_code)

    def cut(self, filename: str, *, times: int = 1, at: int | None = None) -> None:
        """The next `times` GETs of `filename` stop at byte `at` (default: half) and drop the connection."""
        with self._lock:
            self._cuts[filename] = _Cut(at, times)

    def stall(self, filename: str, *, times: int = 1, at: int | None = None) -> None:
        """The next `times` GETs of `filename` send the headers and the bytes up to `at` (default: half), then
        nothing more until the hub stops: the client has to time out."""
        with self._lock:
            self._cuts[filename] = _Cut(at, times, stall=True)

    def seen(self, method: str | None = None, contains: str = "") -> list[Seen]:
        """Logged requests, optionally only one method and paths containing `contains`."""
        with self._lock:
            return [r for r in self.requests if method in (None, r.method) and contains in r.path]

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._stopping.clear()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        # A short poll interval makes stop() quick.
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        self._stopping.set()  # ends stalled responses
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Used by the handler.

    def _find(self, repo_id: str, revision: str) -> _Revision | None:
        revisions = self.repos[repo_id]
        if revision in revisions:
            return revisions[revision]
        return next((r for r in revisions.values() if r.commit == revision), None)

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def _take_cut(self, filename: str, size: int) -> tuple[int, bool] | None:
        """(byte offset where the body stops, whether to stall there) for the next GET of `filename`."""
        with self._lock:
            cut = self._cuts.get(filename)
            if cut is None or cut.times <= 0:
                return None
            cut.times -= 1
            return (size // 2 if cut.at is None else cut.at), cut.stall


class SilentServer:
    """A "hub" on 127.0.0.1 that accepts every connection and never sends a byte: requests can only time out.

    `connections` counts what it accepted, so a test can tell that a request was really made.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.02)  # a short accept timeout makes stop() quick
        self._port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def connections(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # the accept timeout, or the listener closed by stop()
                continue
            self._held.append(connection)  # kept open, never read, never answered

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join()
        self._listener.close()
        for connection in self._held:
            connection.close()


def lfs_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a cut simply closes it
    server: ThreadingHTTPServer

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output clean

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        raw_path = urlsplit(self.path).path
        self.hub._record(Seen(self.command, raw_path, {k.lower(): v for k, v in self.headers.items()}))
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        if parts[:1] == ["spaces"] and len(parts) >= 6 and parts[3] == "resolve":
            parts = parts[1:]  # a Space file, /spaces/{owner}/{name}/resolve/…: served like a model repo's
        if parts[:1] == ["cdn"] and len(parts) == 2:
            self._cdn(parts[1], head=head)
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
            self._model_info(f"{parts[2]}/{parts[3]}", revision)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head=head)
        else:
            self._error(404, None, "no such endpoint")

    def _repo(self, repo_id: str, revision: str) -> _Revision | None:
        """The revision to serve, or None after answering with the error the real hub would give."""
        if repo_id in self.hub.gated:
            status, code = self.hub.gated[repo_id]
            self._error(status, code, f"Access to model {repo_id} is restricted.")
            return None
        if repo_id not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        found = self.hub._find(repo_id, revision)
        if found is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
        return found

    def _model_info(self, repo_id: str, revision: str) -> None:
        rev = self._repo(repo_id, revision)
        if rev is None:
            return
        body = json.dumps(
            {"id": repo_id, "sha": rev.commit, "private": False, "siblings": [{"rfilename": f} for f in rev.files]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
        rev = self._repo(repo_id, revision)
        if rev is None:
            return
        data = rev.files.get(filename)
        if data is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist", commit=rev.commit)
            return
        if filename.endswith(LFS_SUFFIXES):
            # The real hub redirects LFS files to its CDN and carries the file's metadata on the 302.
            host, port = self.server.server_address[:2]
            assert host == "127.0.0.1"
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/cdn/{lfs_sha256(data)}")
            self.send_header("X-Repo-Commit", rev.commit)
            self.send_header("ETag", f'"{git_blob_sha1(data)}"')
            self.send_header("X-Linked-Etag", f'"{lfs_sha256(data)}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_bytes(filename, data, head=head, etag=git_blob_sha1(data), commit=rev.commit)

    def _cdn(self, sha256: str, *, head: bool) -> None:
        for revisions in self.hub.repos.values():
            for rev in revisions.values():
                for name, data in rev.files.items():
                    if lfs_sha256(data) == sha256:
                        self._send_bytes(name, data, head=head, etag=sha256, commit=None)
                        return
        self._error(404, None, "no such blob")

    def _send_bytes(self, filename: str, data: bytes, *, head: bool, etag: str, commit: str | None) -> None:
        start, end = 0, len(data) - 1
        ranged = self.headers.get("Range")
        if ranged:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) if last else len(data) - 1
            if start >= len(data):
                self._error(416, None, "range not satisfiable")
                return
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if head:
            return
        stop = end + 1
        cut = self.hub._take_cut(filename, len(data))
        if cut is not None:
            stop = min(stop, max(start, cut[0]))
        self.wfile.write(data[start:stop])
        self.wfile.flush()
        if cut is not None and cut[1]:
            self.hub._stopping.wait()  # silence, connection open, until the hub stops

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", message)
        if code is not None:
            self.send_header("X-Error-Code", code)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def isolate_hf(monkeypatch: pytest.MonkeyPatch, home: Path, endpoint: str | None = None) -> Path:
    """Point huggingface_hub at a private cache in `home` (and at `endpoint`), with no token; returns the cache.

    huggingface_hub copies its environment into `huggingface_hub.constants` at import time, so setting the
    variables is not enough once it has been imported: the constants are patched as well.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    cache = home / "hub"
    values = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    if endpoint is not None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        # hf_hub_download builds file URLs from this template, filled in from HF_ENDPOINT at import time.
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    close_session()  # a fresh HTTP client, which reads NO_PROXY
    return cache
