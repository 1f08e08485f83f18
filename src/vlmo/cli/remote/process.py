"""The resident model process: `vlmo serve`'s app and engine for one model, on a Unix socket, for as long as it is
used and then `keep_alive` seconds more.

Started by a command (`resident.py`) as `python -m vlmo.cli.remote.process SPEC`, in its own session (the
terminal's Ctrl-C does not reach it), with stderr going to the runtime folder's log. SPEC is JSON: the runtime
folder, the load options, the identity the command computed, and the keep-alive.

What it adds to the server's app (`vlmo.serve.routes.create_app`, unchanged: the same routes, engine, errors):

- `GET /v1/vlmo/resident`: who it is and how it is doing (pid, identity, memory, idle time, time left), for the
  command that checks it before use and for `vlmo ps`;
- `POST /v1/vlmo/stop`: leave now, letting accepted requests finish (`vlmo stop`, or a command replacing it);
- the keep-alive: every request may carry `X-Vlmo-Keep-Alive: SECONDS` (the command's `--keep-alive`), the
  latest one wins, and once nothing has come or run for that long the process leaves (`runtime.Files` and
  `resident.py` say how it lets go of the lock and its files).

The load's error, if any, goes into resident.json with the message and exit code the command line gives it, so
the waiting command prints exactly what an in-process load would have printed.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vlmo.cli.errors import describe
from vlmo.cli.remote.runtime import Files
from vlmo.serve.launch import say

IDLE_CHECK = 0.25  # seconds between looks at the keep-alive
RESIDENT_PATH = "/v1/vlmo/resident"
STOP_PATH = "/v1/vlmo/stop"
# The server's app reads images from data: URIs only; a command sends any file it could read itself.
MAX_IMAGE_MB = 4096


class Resident:
    """The ASGI wrapper around the server's app (module docstring): activity, keep-alive, and the two routes."""

    def __init__(self, app: Any, files: Files, spec: dict[str, Any], engine: Any) -> None:
        self.app, self.files, self.engine = app, files, engine
        self.identity = spec["identity"]
        self.keep_alive = float(spec["keep_alive"])
        self.in_flight = 0
        self.last_active = time.monotonic()
        self.started = time.time()
        self.stop_server: Any = None  # set once the server runs: leave, letting accepted requests finish
        self.stopping = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == RESIDENT_PATH:
            await _json(send, self.describe())
            return
        if path == STOP_PATH:
            await _json(send, {"stopping": True})
            self.leave("asked to stop")
            return
        counted = scope["type"] == "http" and path.startswith("/v1/")
        if counted:
            self._keep_alive_from(scope)
            self.in_flight += 1
            self.last_active = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            if counted:
                self.in_flight -= 1
                self.last_active = time.monotonic()

    def _keep_alive_from(self, scope: Any) -> None:
        for name, value in scope.get("headers", []):
            if name == b"x-vlmo-keep-alive":
                try:
                    seconds = float(value)
                except ValueError:
                    return
                if 0 < seconds <= 7 * 86400:
                    self.keep_alive = seconds

    def idle_for(self) -> float:
        busy = self.in_flight or self.engine.waiting or self.engine.running
        return 0.0 if busy else time.monotonic() - self.last_active

    def describe(self) -> dict[str, Any]:
        idle = self.idle_for()
        rss, peak = _memory()
        return {
            "pid": os.getpid(),
            "identity": self.identity,
            "state": "stopping" if self.stopping else "ready",
            "keep_alive": self.keep_alive,
            "idle_seconds": round(idle, 1),
            "left_seconds": round(max(0.0, self.keep_alive - idle), 1),
            "running": self.engine.running,
            "waiting": self.engine.waiting,
            "rss_bytes": rss,
            "peak_rss_bytes": peak,
            "started": self.started,
            "log": str(self.files.log),
        }

    def leave(self, why: str) -> None:
        """Stop taking requests: the socket and resident.json go first (a new command starts a new process), then
        the server stops as on SIGTERM (accepted requests finish)."""
        if self.stopping:
            return
        self.stopping = True
        self.files.remove_if_owned(os.getpid())
        say(f"resident model: {why}; stopping")
        if self.stop_server is not None:
            self.stop_server()

    def watch_idle(self) -> None:
        """The keep-alive (module docstring), in a thread: leave once idle for `keep_alive` seconds and nobody holds
        the lock (a command that holds it is about to send a request)."""
        lock = os.open(self.files.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while not self.stopping:
                time.sleep(IDLE_CHECK)
                if self.idle_for() < self.keep_alive:
                    continue
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    if self.idle_for() >= self.keep_alive:
                        self.leave(f"idle for {self.keep_alive:g} s")
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)


async def _json(send: Any, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _memory() -> tuple[int | None, int | None]:
    """This process's resident memory and its peak, in bytes (Linux's /proc; the peak alone elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return None, peak if sys.platform == "darwin" else peak * 1024


def _release_memory() -> None:
    """Give the load's transient buffers back to the system (glibc keeps freed heap memory otherwise)."""
    from vlmo.weights.safetensors_io import trim_heap

    gc.collect()
    trim_heap()


def _bind(path: Path) -> socket.socket:
    """The listening socket at `path`, created 0600 (never widened: the folder is 0700 as well)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        path.unlink(missing_ok=True)
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    files = Files(Path(spec["folder"]))
    load = spec["load"]
    pid = os.getpid()
    base = {"pid": pid, "identity": spec["identity"], "log": str(files.log), "keep_alive": spec["keep_alive"]}
    try:
        from vlmo.cli.options import Run
        from vlmo.serve.launch import load_model
        from vlmo.serve.routes import ServerSettings

        run = Run(**{k: load[k] for k in ("model", "revision", "adapter", "device", "dtype", "quantize", "cache")})
        settings = ServerSettings(
            model_name=load["model"], max_image_mb=MAX_IMAGE_MB, mask_decoder=load["mask_decoder"]
        )
        vlm = load_model(run.load, load["model"])
        if load["mask_decoder"] is not None:
            vlm.mask_decoder(load["mask_decoder"])
    except Exception as e:  # noqa: BLE001 - the load's error goes to the waiting command, as it would print it
        message, code = describe(e)
        say(f"resident model: load failed: {message}")
        files.write_info({**base, "state": "failed", "error": message, "exit_code": code})
        return code
    _release_memory()
    return _serve(vlm, settings, files, spec, base)


def _serve(vlm: Any, settings: Any, files: Files, spec: dict[str, Any], base: dict[str, Any]) -> int:
    import uvicorn

    from vlmo.engine.worker import Engine
    from vlmo.serve.routes import create_app
    from vlmo.serve.run import stopping_server

    engine = Engine(vlm, max_batch_size=8, max_queue=64)
    resident = Resident(create_app(engine, settings), files, spec, engine)
    sock = _bind(files.socket)
    config = uvicorn.Config(
        resident, lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=None
    )

    def ready() -> None:
        files.write_info({**base, "state": "ready"})
        say(f"resident model: {settings.model_name} ready on {files.socket} (keep-alive {resident.keep_alive:g} s)")

    server = stopping_server(config, engine, 30.0, ready)
    resident.stop_server = lambda: server.handle_exit(signal.SIGTERM, None)
    threading.Thread(target=resident.watch_idle, name="vlmo-keep-alive", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        files.remove_if_owned(os.getpid())
        say("resident model: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
