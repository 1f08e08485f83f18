"""`vlmo serve`: check the options, load the model once, serve the HTTP API (`vlmo.serve.routes`) with uvicorn, and stop
cleanly on SIGINT/SIGTERM.

Stopping: the first signal stops taking connections and new requests (503) and lets the accepted ones finish,
for at most `shutdown_timeout` seconds; what is still queued or running then ends with an error answer (a 503
body, or an error event in a stream), as it does at once on a second Ctrl-C. No accepted request is dropped
without an answer, and the process exits 0. Two things of uvicorn's own stop are replaced for that: its handler
re-raises the signal after its shutdown (ending the process with 130 or -15), and its graceful-shutdown timeout
cancels the handlers that still run, which would drop their clients' connections unanswered. Here the engine is
stopped first (a cancelled request ends at the worker's next step, which on a CPU may take seconds), and only
connections still open `FLUSH_SECONDS` after that (a client that does not read its answer) are abandoned.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlmo.errors import VlmoError
from vlmo.serve.launch import check_serving, load_model, say, warn_if_exposed

if TYPE_CHECKING:
    from vlmo.api import VLMo
    from vlmo.engine.worker import Engine
    from vlmo.serve.routes import ServerSettings

# After the engine has stopped, how long the handlers get to send their last bytes before their connections are
# abandoned (only a client that does not read its answer needs it).
FLUSH_SECONDS = 10.0
# The server's modules (core dependencies since the resident model runs on them), and httpx, the serve extra's,
# which fetches remote images.
DEPENDENCIES = ("fastapi", "uvicorn", "prometheus_client")
REMOTE_IMAGES = ("httpx",)


class ServeDependencyError(VlmoError):
    """The server's optional dependencies (`vlmo[serve]`) are not installed."""


def check_dependencies(remote_images: bool = False) -> None:
    """ServeDependencyError naming the extra when a module the server needs is missing (before the model loads);
    with `remote_images`, httpx too."""
    wanted = DEPENDENCIES + (REMOTE_IMAGES if remote_images else ())
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeDependencyError(
            f"vlmo serve needs {', '.join(missing)}, which is not installed; run: pip install 'vlmo[serve]'"
        )


def serve(
    load: Callable[[], VLMo],
    settings: ServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_queue: int = 64,
    shutdown_timeout: float = 30.0,
) -> None:
    """`vlmo serve`: everything the user typed is checked before the (slow) model load; then serve until a signal.

    `load` loads the model (progress on stderr); `settings` say what clients may do (`routes.ServerSettings`).
    """
    check_dependencies(settings.allow_remote_images)
    check_serving(host, port, max_batch_size, max_queue, shutdown_timeout)
    vlm = load_model(load, settings.model_name)
    if settings.mask_decoder is not None:  # a file that is not a mask decoder is an error now, not at a request
        vlm.mask_decoder(settings.mask_decoder)

    import uvicorn

    from vlmo.engine.worker import Engine
    from vlmo.serve.routes import create_app

    engine = Engine(vlm, max_batch_size=max_batch_size, max_queue=max_queue)
    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        lifespan="on",
        log_level="warning",  # our own line per request replaces uvicorn's access log
        access_log=False,
        timeout_graceful_shutdown=None,  # the stop below ends the handlers (module docstring)
    )
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def ready() -> None:
        warn_if_exposed(host, "the server" + ("" if settings.api_key else " (no --api-key)"))
        limits = f"batch {max_batch_size}, queue {max_queue}"
        say(f"vlmo serve: {settings.model_name} at {where}/v1 ({limits}; Ctrl-C to stop)")

    stopping_server(config, engine, shutdown_timeout, ready).run()
    say("vlmo serve stopped")


def stopping_server(config: Any, engine: Engine, grace: float, ready: Callable[[], None]) -> Any:
    """A uvicorn.Server with vlmo's stop (module docstring) that calls `ready` once it listens. The class is
    defined here, on first use, because uvicorn is an optional import."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config, engine: Engine, grace: float, ready: Callable[[], None]) -> None:
            super().__init__(config)
            self.engine, self.grace, self.ready, self.signals = engine, grace, ready, 0

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                self.ready()

        def handle_exit(self, sig: int, frame: Any) -> None:
            """Replaces uvicorn's: stop accepting (uvicorn's main loop sees `should_exit`), then stop the engine in a
            thread, gracefully on the first signal and at once on the next."""
            self.signals += 1
            self.should_exit = True
            if self.signals == 1:
                accepted = self.engine.waiting + self.engine.running
                say(f"stopping: no new requests; finishing {accepted} accepted (Ctrl-C again to cancel them)")
                threading.Thread(target=self._stop, name="vlmo-stop", daemon=True).start()
            else:
                say("stopping: cancelling the requests still running")
                threading.Thread(target=self.engine.shutdown, kwargs={"cancel": True}, daemon=True).start()

        def _stop(self) -> None:
            self.engine.shutdown(cancel=False, timeout=self.grace)
            if self.engine.waiting + self.engine.running:
                say(f"stopping: requests still running after {self.grace:g} s are cancelled")
                self.engine.shutdown(cancel=True)  # returns once the worker has failed them all
            deadline = time.monotonic() + FLUSH_SECONDS
            while self.server_state.connections and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.server_state.connections:
                say(f"stopping: abandoning {len(self.server_state.connections)} connections that did not finish")
                self.force_exit = True

    return Server(config, engine, grace, ready)


__all__ = ["DEPENDENCIES", "ServeDependencyError", "check_dependencies", "serve", "stopping_server"]
