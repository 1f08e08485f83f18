"""`vlmo serve`'s HTTP API: an OpenAI-compatible chat endpoint, detection and segmentation as JSON, health and
Prometheus metrics, for one model shared by every client through `vlmo.engine.worker.Engine`.

    engine = Engine(VLMo.from_pretrained("vlmo/shapes"), max_batch_size=8, max_queue=64)
    app = create_app(engine, ServerSettings(model_name="vlmo/shapes"))   # an ASGI app: uvicorn, or tests directly

The app starts the engine's worker when it starts (ASGI lifespan) and shuts it down when it stops, cancelling
whatever is still running with an error. `vlmo.serve.run.serve` is what `vlmo serve` runs: it loads the model,
and on SIGINT/SIGTERM lets accepted requests finish before the app stops.

Layers, each in its own module: `server_http` (API key, body cap, log line, request metrics), `server_schema`
(requests → image reference, `vlmo.tasks` prompt, options), `server_media` (image sources and caps),
`server_openai` (chat answers and their stream), `server_errors` (exceptions → OpenAI-style error bodies),
`server_metrics` (Prometheus). Prompts come from `vlmo.tasks`, located answers are parsed by
`VLMo.answer` and shaped by `Answer.payload`, as for every other face.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from vlmo import tasks
from vlmo.engine.worker import Cancelled, Engine, Finished, Job
from vlmo.errors import OptionError, VlmoError, braced, check_file, check_number
from vlmo.generation import GenerateOptions, SamplingConfig
from vlmo.serve.chat import ChatAnswer, usage
from vlmo.serve.errors import ApiError, api_error, validation_message
from vlmo.serve.guard import TOKENS_STATE, RequestGuard
from vlmo.serve.media import MediaPolicy, fetch_image
from vlmo.serve.metrics import ServerMetrics
from vlmo.serve.schema import ChatRequest, LocateRequest
from vlmo.tasks import Prompt

MB = 1024 * 1024
# A body carries one image as base64 (4 bytes per 3) and a little JSON around it.
BODY_OVERHEAD_BYTES = 64 * 1024
ENDPOINTS = frozenset(
    {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/detect", "/v1/segment", "/openapi.json"}
)


@dataclass(frozen=True)
class ServerSettings:
    """What the server is called and what it lets clients do (the `vlmo serve` options).

    model_name: the id clients see (`/v1/models`) and may send as `model`; another id is a 404.
    api_key: when set, every endpoint but `/health` needs `Authorization: Bearer <key>`.
    max_image_mb: the largest image (encoded bytes); the body cap follows from it (`max_body_bytes`).
    allowed_local_media_path / allow_remote_images / remote_timeout / allow_private_addresses: the image sources
    (`media.MediaPolicy`).
    mask_decoder: the VQ-VAE file for `/v1/segment` (None: downloaded on first use, as `VLMo.segment`).
    """

    model_name: str
    api_key: str | None = None
    max_image_mb: float = 20
    allowed_local_media_path: str | os.PathLike[str] | None = None
    allow_remote_images: bool = False
    remote_timeout: float = 10.0
    mask_decoder: str | os.PathLike[str] | None = None
    allow_private_addresses: bool = False

    def __post_init__(self) -> None:
        check_number(self.max_image_mb, "max_image_mb", above=0, below=1e6)
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("{api_key} is empty; pass a key (VLMO_API_KEY), or leave it out for no key", api_key=None)
        folder = self.allowed_local_media_path
        if folder is not None and not Path(folder).is_dir():
            raise OptionError(
                f"{{allowed_local_media_path}} must be an existing folder, got {braced(folder)}",
                allowed_local_media_path=None,
            )
        check_file(self.mask_decoder, "mask_decoder")
        check_number(self.remote_timeout, "remote_timeout", above=0, below=3600)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return -(-self.max_image_bytes // 3) * 4 + BODY_OVERHEAD_BYTES

    def media(self) -> MediaPolicy:
        folder = None if self.allowed_local_media_path is None else Path(self.allowed_local_media_path)
        return MediaPolicy(
            self.max_image_bytes, folder, self.allow_remote_images, self.remote_timeout, self.allow_private_addresses
        )


def create_app(engine: Engine, settings: ServerSettings) -> RequestGuard:
    """The server's ASGI app for `engine` (not started yet: the app starts and stops it, see the module docstring)."""
    metrics = ServerMetrics(lambda: engine.waiting, lambda: engine.running)
    media = settings.media()
    name = settings.model_name
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, cancel=True)

    api = FastAPI(title="vlmo", lifespan=lifespan, docs_url=None, redoc_url=None)
    api.state.engine, api.state.settings, api.state.metrics = engine, settings, metrics
    _add_error_handlers(api)

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(
                404, f"the model {model!r} is not served here; this server serves {name!r}", code="model_not_found"
            )

    async def submit(image: Any, prompt: Prompt, options: GenerateOptions, stop: list[str]) -> Job:
        # In a thread: `submit` tokenizes the prompt, which for a long text should not hold up the event loop.
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(engine.submit, image, prompt, options, stop=stop, loop=loop)

    def finished(request: Request, fin: Finished) -> None:
        setattr(request.state, TOKENS_STATE, (fin.prompt_tokens, fin.completion_tokens))
        metrics.generated(fin.prompt_tokens, fin.completion_tokens, fin.seconds_to_first_token)

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": name}

    @api.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    model_card = {"id": name, "object": "model", "created": started, "owned_by": "vlmo"}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card

    @api.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_model(body.model)
        ref, prompt, stop = body.inputs()
        options = _checked(body.options(), prompt)
        job = await submit(await fetch_image(ref, media), prompt, options, stop)
        answer = ChatAnswer(name)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _JobStream(job, answer.events(job, include_usage, lambda fin: finished(request, fin)))
        fin = await _until_done(job, request)
        finished(request, fin)
        return answer.completion(fin)

    decoder = _MaskDecoder(engine, settings.mask_decoder)

    async def locate(task: Literal["detect", "segment"], body: LocateRequest, request: Request) -> dict[str, Any]:
        check_model(body.model)
        prompt = tasks.prompt(task, labels=body.labels)
        options = _checked(body.options(), prompt)
        if task == "segment":
            await decoder.ready()  # before generating: without a decoder the answer could not be decoded
        image = await fetch_image(body.image, media)
        fin = await _until_done(await submit(image, prompt, options, []), request)
        finished(request, fin)
        answer = await asyncio.to_thread(engine.vlm.answer, prompt, fin, image.size, mask_decoder=settings.mask_decoder)
        return {"model": name, **answer.payload(), "usage": usage(fin)}

    @api.post("/v1/detect")
    async def detect(body: LocateRequest, request: Request) -> dict[str, Any]:
        return await locate("detect", body, request)

    @api.post("/v1/segment")
    async def segment(body: LocateRequest, request: Request) -> dict[str, Any]:
        return await locate("segment", body, request)

    return RequestGuard(
        api, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics, endpoints=ENDPOINTS
    )


class _JobStream(StreamingResponse):
    """The server-sent events of a job, which is cancelled however the response ends: finished (nothing to do), the
    client gone mid-stream, or gone before the first event was sent (then the events' own generator never ran)."""

    def __init__(self, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class _MaskDecoder:
    """Loads the segmentation mask decoder once, on the first `/v1/segment` (or at startup: `preload`), so that a
    decoder that cannot be had (no `--mask-decoder` and no network) is one error before any generation."""

    def __init__(self, engine: Engine, path: str | os.PathLike[str] | None) -> None:
        self.engine, self.path, self.loaded = engine, path, False
        self.lock = asyncio.Lock()

    def preload(self) -> None:
        self.engine.vlm.mask_decoder(self.path)  # loaded once and kept, for `VLMo.answer`
        self.loaded = True

    async def ready(self) -> None:
        async with self.lock:
            if self.loaded:
                return
            try:
                await asyncio.to_thread(self.preload)
            except VlmoError as exc:
                reason = str(exc).split(";")[0]
                raise ApiError(
                    500,
                    f"segmentation needs PaliGemma's mask decoder, which could not be loaded ({reason}); "
                    "start the server with --mask-decoder vae-oid.npz",
                    "server_error",
                    "mask_decoder_unavailable",
                ) from exc


def _checked(options: GenerateOptions, prompt: Prompt) -> GenerateOptions:
    """`options`, validated before an image is fetched or decoded (the engine checks them again on submit)."""
    SamplingConfig.from_options(options, prompt.max_new_tokens)
    return options


async def _until_done(job: Job, request: Request) -> Finished:
    """The job's end, or Cancelled as soon as the client disconnects (the job is cancelled: its slot frees)."""
    result = asyncio.ensure_future(job.aresult())
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result.done():
            return result.result()
        raise Cancelled("the client disconnected before the answer was ready")
    finally:
        gone.cancel()
        if not result.done():
            job.cancel()
            result.cancel()
            with suppress(asyncio.CancelledError, VlmoError):
                await result


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the request's body was read already, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(api: FastAPI) -> None:
    """Every error as an OpenAI-style body: the library's errors by `server_errors.ERROR_TABLE`, FastAPI's request
    validation (422 there) as a 400 with one line, and Starlette's 404/405 in the same shape."""

    async def library(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(api_error(exc))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _error_response(ApiError(400, validation_message(list(exc.errors())), code="invalid_request"))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))

    api.add_exception_handler(ApiError, library)
    api.add_exception_handler(VlmoError, library)
    api.add_exception_handler(RequestValidationError, invalid)
    api.add_exception_handler(HTTPException, http)
    api.add_exception_handler(Exception, library)


__all__ = ["ENDPOINTS", "ServerSettings", "create_app"]
