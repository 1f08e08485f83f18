"""Find, start, replace, list and stop the resident model: the command line's side of it.

    with resident_model(load, keep_alive=300) as model:     # a RemoteModel, or None: load in-process
        model.texts(["a.png"], prompt, options)

One lock file coordinates every client and the resident process (`runtime.Files.lock`, `flock`):

- a command holds it *shared* from the moment it has checked the resident until its answer is printed, so any
  number of commands use one resident at once (the engine batches them);
- a command that must start or replace the resident holds it *exclusive*, which waits for the running commands to
  finish (a command for another model replaces the resident once its requests are done) and makes a second
  command wait for the load instead of starting a second process;
- the resident process leaves on its own only when it can take the lock exclusive without waiting (nobody is
  using it, nobody is about to), and removes its socket before it lets go: a command never connects to a process
  that is leaving.

A resident is used only when the live process says its identity (`identity.py`) equals the command's. One that died
(SIGKILL, out of memory) is noticed by its pid or its socket, cleaned up and replaced; one that does not answer
costs the command a clear error after `health_timeout` seconds, never a hang.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlmo.cli.remote.client import RemoteModel, Server, ServerError, ServerSilent, ServerUnreachable
from vlmo.cli.remote.identity import Identity, differences, identity
from vlmo.cli.remote.runtime import Files, NoResidentHere, NoUnixSockets, format_duration, runtime_folder

STOP_TIMEOUT = 30.0  # seconds a stop waits for running requests, then for the process to leave
POLL = 0.05  # seconds between looks at a loading resident
PROCESS_MODULE = "vlmo.cli.remote.process"


class _Lock:
    """The shared lock file (module docstring), held shared or exclusive by this process."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def shared(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def exclusive(self, timeout: float | None = None) -> bool:
        """Take it exclusive; False when `timeout` seconds passed first (None: wait as long as it takes)."""
        if timeout is None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL)

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


def _server(files: Files, info: dict[str, Any]) -> Server:
    return Server.at_socket(files.socket, f"resident model (pid {info.get('pid')})", files.log)


@contextlib.contextmanager
def resident_model(
    load: dict[str, Any], keep_alive: float, say: Callable[[str], None], loading: Callable[[], Any]
) -> Iterator[RemoteModel | None]:
    """A `RemoteModel` on the resident model for the load options `load`, started when none runs; None (and one
    `say` note) where no resident model can be (`runtime.NoResidentHere`): then the command loads in-process.

    `loading()` gives a context manager shown while a load is awaited (the CLI's spinner).
    """
    try:
        files = Files(runtime_folder())
    except NoResidentHere as e:
        if not isinstance(e, NoUnixSockets):
            say(f"note: loading in-process ({e})")
        yield None
        return
    mine = identity(load)
    lock = _Lock(files.lock)
    try:
        lock.shared()
        info = _usable(files, mine)
        if info is None:
            lock.exclusive()  # waits for other commands' requests, and for a load another command started
            info = _usable(files, mine)
            if info is None:
                # Downloads happen here, with their progress on this terminal, and a gated, missing or offline
                # model fails here, with the message an in-process load gives; the old resident stays meanwhile.
                from vlmo.weights.hub import resolve_model

                resolve_model(str(load["model"]), revision=load.get("revision"))
                mine = identity(load)  # a fresh download has a commit now
                with loading():
                    info = _replace(files, load, mine, keep_alive)
                say(
                    f"vlmo: keeping {load['model']} loaded in the background for {format_duration(keep_alive)} "
                    "after each command (vlmo ps shows it, vlmo stop stops it, --keep-alive 0 loads in-process)"
                )
            lock.shared()
        server = _server(files, info)
        server.headers["X-Vlmo-Keep-Alive"] = f"{keep_alive:g}"
        yield RemoteModel(server, name=str(load["model"]))
    finally:
        lock.close()


def _usable(files: Files, mine: Identity) -> dict[str, Any] | None:
    """The resident's info when it is ready and is the model `mine` names; None otherwise. A loading one of the
    same identity is waited for (holding the lock as the caller does)."""
    info = files.read_info()
    if info is None or differences(mine, info.get("identity")):
        return None
    pid = int(info.get("pid") or 0)
    if info.get("state") == "loading" and _alive(pid):
        info = _wait_ready(files, pid, None)
    if info.get("state") != "ready" or not _alive(pid):
        return None
    live = _ask_identity(files, info)
    return info if live is not None and not differences(mine, live) else None


def _ask_identity(files: Files, info: dict[str, Any]) -> Identity | None:
    """The live process's own identity (None: its socket refuses: it died and left the file behind); a process
    that accepts but does not answer is an error (ServerUnreachable), not a reason to start a second one."""
    server = _server(files, info)
    try:
        answer = server.get("/v1/vlmo/resident")
    except ServerSilent:
        raise ServerUnreachable(
            f"the resident model (pid {info.get('pid')}) is not answering; see its log {files.log}, or stop it "
            "with vlmo stop"
        ) from None
    except ServerUnreachable:
        return None
    if answer.get("pid") != info.get("pid"):
        return None
    live = answer.get("identity")
    return live if isinstance(live, dict) else None


def _replace(files: Files, load: dict[str, Any], mine: Identity, keep_alive: float) -> dict[str, Any]:
    """Stop whatever resident there is (holding the lock exclusive, so nobody uses it) and start one for `load`."""
    old = files.read_info()
    if old is not None:
        _retire(files, old, STOP_TIMEOUT)
    files.log.touch(mode=0o600)
    if files.log.stat().st_size > 1 << 20:  # keep one megabyte or so of log: the last processes'
        files.log.write_text("")
    spec = {"folder": str(files.folder), "load": _absolute(load), "identity": mine, "keep_alive": keep_alive}
    with files.log.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, arguments as a list
            [sys.executable, "-m", PROCESS_MODULE, json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            start_new_session=True,  # the terminal's Ctrl-C is for the command, not for the resident model
        )
    info = {"pid": process.pid, "state": "loading", "identity": mine, "log": str(files.log)}
    files.write_info(info)
    info = _wait_ready(files, process.pid, process)
    process.returncode = 0  # it outlives this command by design: no "still running" warning when we exit
    return info


def _wait_ready(files: Files, pid: int, process: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """Wait until the resident `pid` is ready (its info says so); its load error, as the command line would have
    said it, when it failed."""
    while True:
        info = files.read_info() or {}
        if info.get("pid") == pid and info.get("state") == "ready":
            return info
        if info.get("pid") == pid and info.get("state") == "failed":
            files.remove_if_owned(pid)
            raise ServerError(str(info.get("error")), int(info.get("exit_code") or 1))
        exited = process.poll() is not None if process is not None else not _alive(pid)
        if exited or info.get("pid") != pid:
            files.remove_if_owned(pid)
            raise ServerUnreachable(f"the resident model process stopped while loading; see its log {files.log}")
        time.sleep(POLL)


def _retire(files: Files, info: dict[str, Any], timeout: float) -> None:
    """Stop the resident `info` names, gracefully when it answers, and remove its files."""
    pid = int(info.get("pid") or 0)
    if pid and _alive(pid) and _is_resident_process(pid):
        with contextlib.suppress(ServerUnreachable, ServerError):
            _server(files, info).post("/v1/vlmo/stop", {})
        if not _exited(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _exited(pid, min(timeout, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _exited(pid, 5.0)
    files.remove_if_owned(pid)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid
        return False
    return True


def _exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        with contextlib.suppress(ChildProcessError):  # reap it when it is our child (started by this process)
            os.waitpid(pid, os.WNOHANG)
        time.sleep(POLL)
    return True


def _is_resident_process(pid: int) -> bool:
    """Whether `pid` runs the resident module (a pid reused by another program is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            cmdline = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, check=False).stdout
        except OSError:
            return False
    return PROCESS_MODULE.encode() in cmdline


def _absolute(load: dict[str, Any]) -> dict[str, Any]:
    """`load` with local paths made absolute (the resident process runs in /)."""
    out = dict(load)
    for key in ("model", "adapter", "mask_decoder"):
        value = out.get(key)
        if value is not None and Path(str(value)).expanduser().exists():
            out[key] = str(Path(str(value)).expanduser().resolve())
    return out


# -- vlmo ps / vlmo stop -----------------------------------------------------------------------------------------


def status() -> tuple[Path | None, list[dict[str, Any]]]:
    """The runtime folder and its resident models (`vlmo ps`): each with what it says about itself when it answers."""
    try:
        files = Files(runtime_folder())
    except NoResidentHere:
        return None, []
    info = files.read_info()
    if info is None:
        return files.folder, []
    pid = int(info.get("pid") or 0)
    if not _alive(pid):
        files.remove_if_owned(pid)
        return files.folder, []
    row: dict[str, Any] = {
        "pid": pid,
        "state": info.get("state"),
        "identity": info.get("identity"),
        "log": str(files.log),
    }
    if info.get("state") == "ready":
        try:
            row.update(_server(files, info).get("/v1/vlmo/resident"))
        except ServerUnreachable:
            row["state"] = "not answering"
    return files.folder, [row]


def stop(model: str | None, timeout: float = STOP_TIMEOUT) -> list[dict[str, Any]]:
    """Stop the resident model (only if it is `model`, when given), letting running requests finish for up to
    `timeout` seconds. Returns what was stopped."""
    try:
        files = Files(runtime_folder())
    except NoResidentHere:
        return []
    lock = _Lock(files.lock)
    try:
        lock.exclusive(timeout)  # the running commands finish first; past the timeout, the stop goes on anyway
        info = files.read_info()
        if info is None or not _alive(int(info.get("pid") or 0)):
            if info is not None:
                files.remove_if_owned(int(info.get("pid") or 0))
            return []
        if model is not None and not _same_model(model, info):
            return []
        _retire(files, info, timeout)
        return [info]
    finally:
        lock.close()


def _same_model(model: str, info: dict[str, Any]) -> bool:
    theirs = (info.get("identity") or {}).get("model")
    if model == theirs:
        return True
    path = Path(model).expanduser()
    return path.exists() and theirs is not None and Path(str(theirs)).expanduser().resolve() == path.resolve()


__all__ = ["resident_model", "status", "stop"]
