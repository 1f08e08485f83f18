"""Files vlmo reads and writes for the user: `jsonfile` (the one JSON-file reader, one-line errors naming the file)
and `atomic` (the one way files are written: temporary file + fsync + rename, never a half-written file); and
`is_url`, which tells a URL the user gave where a file is read from a path (so that it is not taken for one)."""

from __future__ import annotations

import re

# A scheme of two or more characters and "://" (RFC 3986 §3.1): "C:\photos" or "C:/photos" stay paths.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(text: str) -> bool:
    """Whether `text` is a URL (http://…, https://…, s3://…, file://…) rather than a file path."""
    return _URL.match(text) is not None


__all__ = ["is_url"]
