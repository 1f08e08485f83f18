"""What the long-running faces (`vlmo app`, `vlmo serve`) share: checking the address before the slow model load,
warning when it is reachable from other machines, and loading the model once with progress on stderr.

No torch and no web framework here: both faces import this before they import their own heavy dependencies.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vlmo.errors import OptionError, braced, check_count, check_number

if TYPE_CHECKING:
    from vlmo.api import VLMo


def say(message: str) -> None:
    """One progress or log line on stderr (stdout is for results)."""
    print(message, file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, what: str) -> None:
    """The warning on stderr when `what` ("the app", "the server") listens beyond loopback."""
    if not is_loopback(host):
        say(f"warning: listening on {host}: anyone who can reach this machine can use {what}")


def check_port(host: str, port: int | None) -> None:
    """Fail before the (slow) model load when the port is out of range or taken (None: the face picks one)."""
    if port is None:
        return
    check_count(port, "port", maximum=65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself does
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = exc.strerror or exc
            where = braced(f"{host}:{port} ({why})")
            raise OptionError(
                f"cannot listen on {where}; pass another {{port}} or {{host}}", port=None, host=None
            ) from None


def check_serving(host: str, port: int, max_batch_size: int, max_queue: int, shutdown_timeout: float) -> None:
    """The options `vlmo serve` and `vlmo serve --ray` share, checked before anything loads."""
    check_count(max_batch_size, "max_batch_size")
    check_count(max_queue, "max_queue")
    check_number(shutdown_timeout, "shutdown_timeout", minimum=0, below=86400)
    check_port(host, port)


def load_model(load: Callable[[], VLMo], model_name: str) -> VLMo:
    """Load the model with `load`, saying on stderr what loads and, once loaded, where, in which dtype and how long
    it took (a server loads once, so this is the one slow step its operator watches)."""
    say(f"Loading {model_name} …")
    began = time.perf_counter()
    vlm = load()
    dtype_name = str(vlm.dtype).removeprefix("torch.") + (" + int8 weights" if vlm.quantized else "")
    say(f"Loaded {model_name} on {vlm.device} ({dtype_name}) in {time.perf_counter() - began:.1f} s")
    return vlm


__all__ = ["check_port", "check_serving", "is_loopback", "load_model", "say", "warn_if_exposed"]
