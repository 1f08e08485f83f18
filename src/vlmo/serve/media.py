"""Where the server's images come from, and what it refuses: the one place that turns an image reference of a
request into a decoded PIL image.

Three sources, each off unless it is safe by default (docs/serve.md, "Security"):

- `data:` URIs with base64 bytes: always accepted; the bytes sent are the image.
- `file://` URLs: only under the folder given as `--allowed-local-media-path` (after resolving `..` and symbolic
  links), so a client cannot read the server's other files.
- `http(s)://` URLs: only with `--allow-remote-images`, with a deadline for the whole download, a size cap checked
  while the bytes arrive, and redirects followed only within the same host.

Every source is capped at `max_image_bytes` (413 beyond it), and the bytes are decoded by the project's one image
reader, `vlmo.images.load_image`, whose limits (Pillow's decompression-bomb pixel cap) apply as everywhere
else (docs/reliability.md, "Limits").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from PIL import Image

from vlmo.images import load_image
from vlmo.serve.errors import BadRequest, PayloadTooLarge

if TYPE_CHECKING:
    import httpx

MAX_REDIRECTS = 3
SOURCES = "a data: URI (base64), a file:// URL or an http(s) URL"


@dataclass(frozen=True)
class MediaPolicy:
    """What image sources the server accepts and how large an image may be.

    max_image_bytes: the largest encoded image (a data URI's decoded bytes, a file, a download).
    allowed_local_media_path: the folder `file://` images must lie in (resolved); None refuses every file.
    allow_remote_images: whether http(s) URLs are fetched; remote_timeout bounds a whole download, in seconds.
    allow_private_addresses: whether a remote image may come from an address that is not public (loopback,
    private ranges, link-local such as cloud metadata at 169.254.169.254, …); off by default (`_check_address`).
    """

    max_image_bytes: int
    allowed_local_media_path: Path | None = None
    allow_remote_images: bool = False
    remote_timeout: float = 10.0
    allow_private_addresses: bool = False

    def __post_init__(self) -> None:
        if self.allowed_local_media_path is not None:
            object.__setattr__(self, "allowed_local_media_path", Path(self.allowed_local_media_path).resolve())

    @property
    def megabytes(self) -> str:
        return f"{self.max_image_bytes / 2**20:.3g} MB"


async def fetch_image(ref: object, policy: MediaPolicy) -> Image.Image:
    """The decoded image `ref` names (a data URI, file:// or http(s) URL). BadRequest (400) for a refused or
    unreadable source, PayloadTooLarge (413) over the cap, ImageError for bytes that are not an image."""
    if not isinstance(ref, str) or not ref.strip():
        raise BadRequest(f"the image must be {SOURCES}, got {type(ref).__name__}")
    ref = ref.strip()
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    if scheme == "data":
        data = _data_uri(ref, policy)
    elif scheme == "file":
        data = await _local(ref, policy)
    elif scheme in ("http", "https"):
        data = await _remote(ref, policy)
    else:
        raise BadRequest(f"the image must be {SOURCES}, got {_short(ref)}")
    return await asyncio.to_thread(load_image, data)  # decoding is CPU work: off the event loop


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _data_uri(ref: str, policy: MediaPolicy) -> bytes:
    """`data:[<media type>][;…];base64,<bytes>` → the bytes. Only base64 URIs: images are binary."""
    header, comma, payload = ref[5:].partition(",")
    if not comma:
        raise BadRequest("the image's data: URI has no ',' before its data; send data:image/png;base64,<base64>")
    if "base64" not in [part.strip().lower() for part in header.split(";")]:
        raise BadRequest("the image's data: URI is not base64; send data:image/png;base64,<base64>")
    payload = "".join(payload.split())  # line breaks some encoders insert
    if len(payload) * 3 // 4 > policy.max_image_bytes + 2:
        raise PayloadTooLarge(f"the image is larger than the server's limit of {policy.megabytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("the image's data: URI is not valid base64") from None
    if len(data) > policy.max_image_bytes:
        raise PayloadTooLarge(f"the image is larger than the server's limit of {policy.megabytes}")
    return data


async def _local(ref: str, policy: MediaPolicy) -> bytes:
    """A file:// URL's bytes (`_local_file`) in a worker thread, within `remote_timeout` as a download is: a stalled
    file system costs this request a 400, never a hang (the thread is a daemon's: shutdown does not wait for it)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    def read() -> None:
        try:
            result: bytes | BaseException = _local_file(ref, policy)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which raises it
            result = exc
        try:
            loop.call_soon_threadsafe(_settle, done, result)
        except RuntimeError:  # the loop has closed: nobody waits for this read any more
            pass

    threading.Thread(target=read, name="vlmo-local-media", daemon=True).start()
    try:
        return await asyncio.wait_for(done, policy.remote_timeout)
    except TimeoutError:
        raise BadRequest(f"reading {_short(ref)} took longer than {policy.remote_timeout:g} s") from None


def _settle(future: asyncio.Future[bytes], result: bytes | BaseException) -> None:
    if future.done():  # timed out meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _local_file(ref: str, policy: MediaPolicy) -> bytes:
    """A file:// URL under the allowed folder → its bytes (read at most the cap plus one byte). Only a regular file
    is read: it is opened without blocking (a FIFO would wait for a writer) and checked (`S_ISREG`) before reading."""
    allowed = policy.allowed_local_media_path
    if allowed is None:
        raise BadRequest("file:// images are off; start the server with --allowed-local-media-path DIR to allow them")
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise BadRequest(f"file:// URLs must name a local path (file:///path), got host {parts.netloc!r}")
    name = unquote(parts.path)
    if "\x00" in name:
        raise BadRequest(f"{_short(ref)} holds a NUL character, which no file name can")
    path = Path(name).resolve()
    if not path.is_relative_to(allowed):
        raise BadRequest(f"{_short(ref)} is outside the allowed media folder (--allowed-local-media-path)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadRequest(f"no image file at {_short(ref)}") from None
    except OSError as exc:
        raise BadRequest(f"cannot read {_short(ref)} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest(f"{_short(ref)} is not a regular file; only image files are read")
        if info.st_size > policy.max_image_bytes:
            raise PayloadTooLarge(f"{path.name} is larger than the server's image limit of {policy.megabytes}")
        os.set_blocking(fd, True)
        try:
            data = file.read(policy.max_image_bytes + 1)
        except OSError as exc:
            raise BadRequest(f"cannot read {_short(ref)} ({exc.strerror or exc})") from None
    if len(data) > policy.max_image_bytes:  # grew since fstat
        raise PayloadTooLarge(f"{path.name} is larger than the server's image limit of {policy.megabytes}")
    return data


async def _remote(url: str, policy: MediaPolicy) -> bytes:
    """An http(s) URL → its bytes, within `remote_timeout` for everything (connect, redirects, body)."""
    if not policy.allow_remote_images:
        raise BadRequest("remote images are off; send a data: URI, or start the server with --allow-remote-images")
    try:
        return await asyncio.wait_for(_download(url, policy), policy.remote_timeout)
    except asyncio.TimeoutError:
        raise BadRequest(f"fetching {_short(url)} took longer than {policy.remote_timeout:g} s") from None


async def _download(url: str, policy: MediaPolicy) -> bytes:
    import httpx  # the serve extra's; only remote images need it

    host = urlsplit(url).hostname
    timeout = httpx.Timeout(policy.remote_timeout)
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await _check_address(url, policy)  # every hop, before any connection is made
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = response.url.join(response.headers.get("location", ""))
                        if target.host != host or target.scheme not in ("http", "https"):
                            raise BadRequest(
                                f"{_short(url)} redirects to another host ({target.host or target.scheme}); "
                                "only redirects within the same host are followed"
                            )
                        url = str(target)
                        continue
                    if response.status_code != 200:
                        raise BadRequest(f"fetching {_short(url)} failed: HTTP {response.status_code}")
                    return await _capped_body(response, url, policy)
            except httpx.HTTPError as exc:
                raise BadRequest(f"could not fetch {_short(url)} ({type(exc).__name__}: {exc})") from None
    raise BadRequest(f"{_short(url)} redirects more than {MAX_REDIRECTS} times")


async def _check_address(url: str, policy: MediaPolicy) -> None:
    """BadRequest unless every address `url`'s host resolves to is public (or `allow_private_addresses`).

    The name is resolved here, so every spelling of an address counts as what it is (`127.1`, `2130706433`,
    `[::ffff:127.0.0.1]`, a name that resolves to a private address). Limit: the HTTP client resolves the name
    again when it connects, so a name whose DNS answer changes between the two (DNS rebinding) is not caught; an
    operator who must rule that out keeps remote images off and sends data: URIs."""
    if policy.allow_private_addresses:
        return
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise BadRequest(f"{_short(url)} names no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError) as exc:
        raise BadRequest(f"could not resolve the host of {_short(url)} ({exc})") from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global:
            raise BadRequest(
                f"{_short(url)} resolves to {address}, which is not a public address; remote images come from "
                "public addresses only (start the server with --allow-private-addresses to allow it)"
            )


async def _capped_body(response: httpx.Response, url: str, policy: MediaPolicy) -> bytes:
    """The body, refused as soon as it is known to pass the cap (declared length, then bytes as they arrive)."""
    too_large = PayloadTooLarge(f"the image at {_short(url)} is larger than the server's limit of {policy.megabytes}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_image_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > policy.max_image_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["MAX_REDIRECTS", "MediaPolicy", "fetch_image"]
