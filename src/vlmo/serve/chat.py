"""The shapes of OpenAI's chat answers, built from the engine's events: a whole `chat.completion`, and the
server-sent events of a streamed one (`chat.completion.chunk`s, then `data: [DONE]`).

A stream sends, in order: a chunk with the assistant's role, one chunk per piece of text, a chunk with the
`finish_reason`, a usage chunk (empty `choices`) when the request asked for `stream_options.include_usage`, and
`data: [DONE]`. An error after the stream has begun (the server shutting down) is sent as a `data: {"error": …}`
event, which the `openai` client raises as an `APIError`, followed by `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from vlmo.engine.worker import Finished, Job, Piece
from vlmo.serve.errors import api_error


def usage(fin: Finished) -> dict[str, int]:
    """OpenAI's `usage` object (prompt tokens include the image's)."""
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


class ChatAnswer:
    """One chat completion's identity (id, creation time, model), shared by its whole answer or all its chunks."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, fin: Finished) -> dict[str, Any]:
        """The whole answer (`stream: false`)."""
        message = {"role": "assistant", "content": fin.text}
        choice = {"index": 0, "message": message, "finish_reason": fin.finish_reason, "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(fin)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return _event({**self._head("chat.completion.chunk"), "choices": [choice]})

    async def events(self, job: Job, include_usage: bool, finished: Callable[[Finished], None]) -> AsyncIterator[str]:
        """The server-sent events of `job`'s answer; `finished` is called with its end (for logs and metrics).

        Closing this iterator (the client went away) cancels the job, so its batch slot is freed at the next step.
        """
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            async for event in job:
                if isinstance(event, Piece):
                    yield self.chunk({"content": event.text})
                    continue
                assert isinstance(event, Finished)
                finished(event)
                yield self.chunk({}, event.finish_reason)
                if include_usage:
                    yield _event({**self._head("chat.completion.chunk"), "choices": [], "usage": usage(event)})
        except Exception as exc:  # noqa: BLE001 - the status is sent already: the error goes into the stream
            yield _event(api_error(exc).body())
        finally:
            job.cancel()  # nothing when it finished; frees the slot when the client left mid-stream
        yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


__all__ = ["ChatAnswer", "usage"]
