"""`vlmo serve`: an OpenAI-compatible HTTP server over `vlmo.engine`.

    routes.py    the FastAPI app (`create_app`, `ServerSettings`): chat completions, /v1/detect, /v1/segment, …
    schema.py    what the POST endpoints accept, and how a request becomes the engine's (image, prompt, options)
    chat.py      OpenAI's answer shapes (a chat.completion, the chunks of a stream) from the engine's events
    media.py     image references (data:, file://, http(s)://) → decoded images, with the allow-lists and caps
    guard.py     what every request passes through: API key, body cap, log line, request metrics
    errors.py    the one table from exceptions to HTTP answers in OpenAI's error shape
    metrics.py   the Prometheus metrics
    launch.py    what `vlmo serve` and `vlmo app` share: the address check and the model load with progress
    run.py       `vlmo serve` itself: load, serve with uvicorn, stop cleanly on SIGINT/SIGTERM

`create_app` and `ServerSettings` are imported on first use: `vlmo.serve.launch` (used by the app) needs no FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmo.serve.routes import ServerSettings, create_app


def __getattr__(name: str) -> Any:
    if name in ("ServerSettings", "create_app"):
        from vlmo.serve import routes

        return getattr(routes, name)
    raise AttributeError(f"module 'vlmo.serve' has no attribute {name!r}")


__all__ = ["ServerSettings", "create_app"]
