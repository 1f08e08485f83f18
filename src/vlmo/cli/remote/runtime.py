"""Where a resident model lives on this machine, and for how long it stays.

A resident model process (`vlmo.cli.remote.process`) owns a few files in one per-user folder, platformdirs' user
runtime folder (`$XDG_RUNTIME_DIR/vlmo` on Linux, so setting that variable moves it):

    resident.sock   the Unix domain socket it serves HTTP on (mode 0600; never a TCP port)
    resident.json   who it is: pid, identity (`identity.py`), state (loading, ready, failed, stopping), keep-alive
    resident.lock   the lock clients and the process share (`resident.py` explains the protocol)
    resident.log    its stderr: one line per request, its load, its stop

The folder is created 0700, and refused when another user owns it or it is a symbolic link: a socket in a folder
others can write to could be replaced by theirs, and then a command would send its images to someone else's
process. Where the platform has no Unix sockets, or the folder cannot be made private, commands run in-process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmo.errors import OptionError, braced

KEEP_ALIVE_ENV = "VLMO_KEEP_ALIVE"
DEFAULT_KEEP_ALIVE = 300.0  # seconds: 5 minutes
# Longest path a Unix socket can be bound at (sockaddr_un's sun_path is 108 bytes on Linux, 104 on macOS).
MAX_SOCKET_PATH = 100
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(text: str | float | None, name: str = "keep_alive") -> float:
    """Seconds from "300", "30s", "5m", "1h" or "1.5h" (None: `VLMO_KEEP_ALIVE`, else 5 minutes); 0 means none."""
    if text is None:
        text = os.environ.get(KEEP_ALIVE_ENV) or DEFAULT_KEEP_ALIVE
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text).lower())
        if match is None:
            raise OptionError(
                f"{{{name}}} must be a duration such as 30s, 5m or 1h (0: no resident model), got {braced(text)}",
                **{name: None},
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 <= seconds <= 7 * 86400:
        raise OptionError(f"{{{name}}} must be between 0 and 7 days, got {braced(text)}", **{name: None})
    return seconds


def format_duration(seconds: float) -> str:
    """ "5m", "1h", "90s", "1h30m": how a keep-alive is told back to the user."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class Files:
    """The resident model's files in `folder` (module docstring)."""

    folder: Path

    @property
    def socket(self) -> Path:
        return self.folder / "resident.sock"

    @property
    def info(self) -> Path:
        return self.folder / "resident.json"

    @property
    def lock(self) -> Path:
        return self.folder / "resident.lock"

    @property
    def log(self) -> Path:
        return self.folder / "resident.log"

    def read_info(self) -> dict[str, Any] | None:
        """resident.json, or None when there is none (or it is half written: its writer replaces it atomically,
        so that only happens when something else wrote it)."""
        try:
            info = json.loads(self.info.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def write_info(self, info: dict[str, Any]) -> None:
        """Replace resident.json atomically (a reader sees the old or the new one, never half)."""
        tmp = self.info.with_name(f".resident.{os.getpid()}.json")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
        os.replace(tmp, self.info)

    def remove_if_owned(self, pid: int) -> None:
        """Remove the socket and resident.json when resident.json still names process `pid` (a successor that
        already took the folder over keeps its files)."""
        info = self.read_info()
        if info is not None and info.get("pid") != pid:
            return
        for path in (self.socket, self.info):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class NoResidentHere(Exception):
    """This machine or folder cannot hold a resident model (no Unix sockets, a folder that is not private, a path
    too long for a socket); commands then load the model in-process. The message says why, for one stderr note."""


class NoUnixSockets(NoResidentHere):
    """The platform has no Unix domain sockets (Windows): commands load in-process, as they always did, silently."""


def runtime_folder() -> Path:
    """The per-user runtime folder for vlmo, created 0700 and checked to be private (module docstring)."""
    if not hasattr(socket, "AF_UNIX") or os.name != "posix":
        raise NoUnixSockets("this platform has no Unix domain sockets")
    import platformdirs

    with warnings.catch_warnings():  # without XDG_RUNTIME_DIR it falls back to /tmp/runtime-<uid>, and warns
        warnings.simplefilter("ignore")
        folder = Path(platformdirs.user_runtime_dir("vlmo"))
    try:
        _private_folder(folder.parent, create=True)
        _private_folder(folder, create=True)
    except OSError as e:
        raise NoResidentHere(f"cannot use {folder} for a resident model: {e.strerror or e}") from None
    if len(os.fsencode(folder / "resident.sock")) > MAX_SOCKET_PATH:
        raise NoResidentHere(f"the runtime folder {folder} is too long a path for a Unix socket")
    return folder


def _private_folder(folder: Path, *, create: bool) -> None:
    """Make `folder` (0700) if missing; refuse one that is a link or another user's; tighten our own to 0700."""
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise NoResidentHere(f"{folder} is not a folder (a link or a file); remove it, or set XDG_RUNTIME_DIR")
    if info.st_uid != os.getuid():
        raise NoResidentHere(f"{folder} belongs to another user; set XDG_RUNTIME_DIR to a folder of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)


__all__ = [
    "DEFAULT_KEEP_ALIVE",
    "KEEP_ALIVE_ENV",
    "Files",
    "NoResidentHere",
    "NoUnixSockets",
    "format_duration",
    "parse_duration",
    "runtime_folder",
]
