"""What the server's POST endpoints accept, and how a request becomes the engine's (image, prompt, options).

Requests are pydantic models (FastAPI validates them; `server_errors.validation_message` turns a failure into one
line). Unknown parameters are refused rather than ignored, so a typo or an OpenAI feature PaliGemma lacks (tools,
logprobs, several choices) is an error the client sees, not a silently different answer. A few OpenAI parameters
that clients send with neutral values (`frequency_penalty: 0`, `logprobs: false`, `user`) are accepted as such.

Sampling: `temperature` 0 or absent is greedy (the default, as `VLMo.generate`); above 0 it samples, with `top_p`
(and vLLM's `top_k` extension) applied. `max_completion_tokens` (or the older `max_tokens`) defaults to the task's
length (`vlmo.tasks.DEFAULT_MAX_NEW_TOKENS`).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmo import tasks
from vlmo.generation import GenerateOptions
from vlmo.serve.errors import BadRequest
from vlmo.tasks import Prompt

MAX_STOP_STRINGS = 4  # as OpenAI's API


class _Strict(BaseModel):
    """Unknown fields are refused, and so are values of the wrong JSON type: `"stream": "yes"` or `max_tokens: true`
    are 400s, not silently read as true and 1 (a JSON integer is still a number where a float is asked for)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImageUrl(_Strict):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; PaliGemma has one input size


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class TextPart(_Strict):
    type: Literal["text"]
    text: str


ContentPart = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class Message(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """The generation parameters every POST endpoint takes."""

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def options(self) -> GenerateOptions:
        """The engine's options (validated there: `SamplingConfig`); temperature 0 or none means greedy."""
        options: GenerateOptions = {"seed": self.seed}
        tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if tokens is not None:
            options["max_new_tokens"] = tokens
        temperature = self.temperature or 0.0
        if not math.isfinite(temperature) or temperature < 0:
            raise BadRequest(f"temperature must be a number ≥ 0 (0: greedy), got {self.temperature}")
        if temperature > 0:
            options["do_sample"] = True
            options["temperature"] = temperature
            options["top_p"] = 1.0 if self.top_p is None else self.top_p
            options["top_k"] = self.top_k or 0
        return options


class ChatRequest(Sampling):
    """`POST /v1/chat/completions`: OpenAI's request, for one user message holding one image and one text."""

    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None

    def inputs(self) -> tuple[str, Prompt, list[str]]:
        """The image reference, the prompt (`tasks.from_chat_text`) and the stop strings; BadRequest when the
        request asks for what PaliGemma cannot do."""
        if self.n not in (None, 1):
            raise BadRequest(f"n must be 1 (one answer per request), got {self.n}")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise BadRequest(f"{name} is not supported; leave it out or 0")
        if self.logprobs:
            raise BadRequest("logprobs are not supported; leave it out or false")
        image, text = _image_and_text(self.messages)
        return image, tasks.from_chat_text(text), _stops(self.stop)


class LocateRequest(Sampling):
    """`POST /v1/detect` and `/v1/segment`: an image and what to find in it."""

    image: str
    labels: str | list[str]


def _image_and_text(messages: list[Message]) -> tuple[str, str]:
    """The one image URL and the one text of the one user message."""
    hint = "send one user message whose content holds one image_url part and one text part"
    if len(messages) != 1 or messages[0].role != "user":
        roles = ", ".join(m.role for m in messages) or "none"
        raise BadRequest(f"PaliGemma has no chat template: {hint} (got messages: {roles})")
    content = messages[0].content
    if not isinstance(content, list):
        raise BadRequest(f"the message has no image; {hint}")
    images = [part.image_url.url for part in content if isinstance(part, ImagePart)]
    texts = [part.text for part in content if isinstance(part, TextPart)]
    if len(images) != 1 or len(texts) != 1:
        raise BadRequest(f"the message holds {len(images)} images and {len(texts)} texts; {hint}")
    return images[0], texts[0]


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {stops!r}")
    return stops


__all__ = ["ChatRequest", "LocateRequest", "Message", "Sampling"]
