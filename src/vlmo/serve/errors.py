"""The server's one table from exceptions to HTTP answers, in OpenAI's error shape.

Every error the server sends is `{"error": {"message": …, "type": …, "code": …, "param": null}}` with a one-line
message, so the official `openai` client raises its usual exceptions (`BadRequestError`, `AuthenticationError`,
…) with vlmo's message. The library's errors are translated here into the server's words (HTTP codes, and the
request's parameter names: `max_tokens` where the library says `max_new_tokens`), as `cli/errors.py` does for the
command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmo.engine.worker import Cancelled, EngineStopped, QueueFull
from vlmo.errors import (
    GenerationConfigError,
    ImageError,
    InputError,
    OptionError,
    VlmoError,
    command_line,
    python_option,
)

# How long a client told "busy" (503) should wait before it retries, in seconds (the Retry-After header).
RETRY_AFTER_SECONDS = 1


class PayloadTooLarge(VlmoError):
    """A request body or an image over the server's size caps (413)."""


class BadRequest(InputError):
    """A request the server cannot take as it is (400): wrong shape, unsupported parameter, refused image source."""


@dataclass(eq=False)
class ApiError(Exception):
    """An HTTP error answer: status, one-line message, OpenAI's error `type` and `code`, extra headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    command_line: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        self.message = " ".join(self.message.split())  # one line, whatever the cause said
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape; for an error of vlmo's, also `command_line`: its message and exit code as `vlmo`
        on the command line gives them (`vlmo.errors.command_line`), so that a command answered by this server
        (`vlmo ask --server`, a resident model) fails as it would in-process. Clients ignore fields they do not
        know."""
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code, "param": None}
        if self.command_line is not None:
            error["command_line"] = {"message": self.command_line[0], "exit_code": self.command_line[1]}
        return {"error": error}


def _as_is(e: BaseException) -> ApiError:
    assert isinstance(e, ApiError)
    return e


def _request_words(message: str) -> str:
    """The library's names for generation options as a request spells them."""
    return message.replace("max_new_tokens", "max_tokens")


def _bad(e: BaseException) -> ApiError:
    text = e.spelled(python_option) if isinstance(e, OptionError) else str(e)
    return ApiError(400, _request_words(text), code="invalid_value")


def _too_large(e: BaseException) -> ApiError:
    return ApiError(413, str(e), code="payload_too_large")


def _image(e: BaseException) -> ApiError:
    """An unreadable image is the client's error (400); one over Pillow's pixel cap is too large (413)."""
    from PIL import Image

    bomb = isinstance(e.__cause__, Image.DecompressionBombError | Image.DecompressionBombWarning)
    return ApiError(413 if bomb else 400, str(e), code="payload_too_large" if bomb else "invalid_image")


def _busy(e: BaseException) -> ApiError:
    return ApiError(
        503, f"the server is busy: {e}", "server_error", "queue_full", {"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def _stopping(e: BaseException) -> ApiError:
    return ApiError(503, str(e), "server_error", "shutting_down")


def _cancelled(e: BaseException) -> ApiError:
    return ApiError(499, str(e), "invalid_request_error", "cancelled")


def _failed(e: BaseException) -> ApiError:
    return ApiError(500, str(e), "server_error", "generation_failed")


def _unexpected(e: BaseException) -> ApiError:
    return ApiError(500, f"internal error ({type(e).__name__}); see the server's log", "server_error", "internal_error")


# (exception types, answer). First match wins; order matters (PayloadTooLarge and ImageError before InputError).
ERROR_TABLE: list[tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[BaseException], ApiError]]] = [
    (ApiError, _as_is),  # already an answer
    (PayloadTooLarge, _too_large),
    (ImageError, _image),
    ((InputError, GenerationConfigError), _bad),
    (QueueFull, _busy),
    (EngineStopped, _stopping),
    (Cancelled, _cancelled),
    (VlmoError, _failed),
    (Exception, _unexpected),
]


def api_error(e: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while handling a request (with its `command_line` rendering when
    it is, or was raised from, an error of vlmo's)."""
    answer = next((make(e) for kinds, make in ERROR_TABLE if isinstance(e, kinds)), None) or _unexpected(e)
    cause = e if isinstance(e, VlmoError) else e.__cause__
    if answer.command_line is None and isinstance(cause, VlmoError):
        answer.command_line = command_line(cause)
    return answer


def validation_message(errors: list[Any]) -> str:
    """FastAPI's request validation errors (pydantic's list) as one line: where, and what.

    Of several errors the deepest is told: a content part with a wrong `type` fails both branches of
    `str | list[part]`, and the list branch's error is the one that says what to fix. The branch names pydantic
    puts in locations (`str`, `list[...]`) are left out.
    """
    if not errors:
        return "the request is not valid"
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    kind = first.get("type", "")
    parts = [str(p) for p in first.get("loc", ()) if p != "body" and not _branch_name(p)]
    where = ".".join(parts)
    if kind == "json_invalid":
        return "the request body is not valid JSON; send a JSON object"
    if not where and kind != "missing":
        return "the request body must be a JSON object (and the Content-Type application/json)"
    if kind == "extra_forbidden":
        return f"unsupported parameter: {where}"
    if kind == "missing":
        return f"missing parameter: {where}" if where else "the request needs a JSON body"
    return f"{where}: {first.get('msg', 'is not valid')}"


def _branch_name(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict", "none"})


__all__ = [
    "ERROR_TABLE",
    "RETRY_AFTER_SECONDS",
    "ApiError",
    "BadRequest",
    "PayloadTooLarge",
    "api_error",
    "validation_message",
]
