"""`vlmo serve --ray`: the same server as `vlmo serve`, as a Ray Serve deployment of several model replicas.

Each replica is a Ray actor that loads the model and runs the server's own app and engine
(`routes.create_app(Engine(vlm))`: every endpoint, the API key, the media allow-lists and caps, metrics), which Ray
Serve's HTTP proxy reaches through `serve.ingress`. Nothing here knows a route: the app is built in the replica
by `Replica.__serve_build_asgi_app__`, so there is one copy of the routes for both ways of serving.

How load and failure are handled (docs/serve.md, "Several replicas and machines"):

- a replica takes at most `max_batch_size` requests at a time (`max_ongoing_requests`): every request a replica
  holds is in its running batch or joins it at the next step; the others wait in Ray Serve's router (at most
  `max_queue` of them, then 503 with `Retry-After`), so a request that has not started is never lost with a
  replica: the router sends it to one that is alive;
- a replica whose process dies is replaced by Ray Serve; the requests it was running end with an error (500 before
  their answer began; a stream that had begun is closed by Ray's proxy before the end of the response, which a
  client sees as a connection error, never as a whole answer);
- `check_health` fails when the engine's current step has run longer than `step_timeout` seconds (a wedged
  replica), and Ray Serve restarts it; it loads nothing;
- `--min-replicas` / `--max-replicas` scale on the requests in flight per replica (`target_ongoing_requests`).

The command joins the cluster named by RAY_ADDRESS, or starts a local one, as `vlmo batch --ray` does; Ctrl-C or
SIGTERM deletes the deployment (accepted requests get `shutdown_timeout` seconds) and stops a Ray it started,
leaving a cluster it joined running. Exit code 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmo.errors import OptionError, VlmoError, check_count, check_number
from vlmo.serve.launch import check_serving, say

if TYPE_CHECKING:
    from vlmo.serve.routes import ServerSettings

APP_NAME = "vlmo"
STEP_TIMEOUT = 300.0  # seconds one engine step may run before the replica counts as wedged
GRACE = 15.0  # seconds, beyond the requests' own, that stopping Ray may take
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # vlmo's own line per request is the log


class RayServeMissing(VlmoError):
    """Ray Serve is not installed."""


@dataclass(frozen=True)
class RayServeOptions:
    """How many replicas, and what each asks of Ray.

    replicas: a fixed number; min_replicas / max_replicas: autoscaling between them instead (both given).
    threads: CPU threads per replica (Ray reserves as many CPUs; default: this machine's cores / replicas).
    gpu: one GPU per replica (the model's device is CUDA).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    threads: int | None = None
    gpu: bool = False
    step_timeout: float = STEP_TIMEOUT

    def __post_init__(self) -> None:
        check_count(self.replicas, "replicas")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise OptionError(
                "give both {min_replicas} and {max_replicas}, or neither", min_replicas=None, max_replicas=None
            )
        if self.min_replicas is not None and self.max_replicas is not None:
            check_count(self.min_replicas, "min_replicas")
            check_count(self.max_replicas, "max_replicas", minimum=self.min_replicas)
        if self.threads is not None:
            check_count(self.threads, "replica_threads")
        check_number(self.step_timeout, "step_timeout", above=0, below=86400)

    @property
    def most(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.replicas

    def cpus(self) -> int:
        """Threads (and Ray CPUs) per replica."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.most)


class Replica:
    """One model replica: the model, its engine and the server's app, in a Ray Serve actor."""

    def __init__(
        self,
        load: dict[str, Any],
        settings: ServerSettings,
        max_batch_size: int,
        max_queue: int,
        threads: int | None,
        step_timeout: float,
    ) -> None:
        import torch

        from vlmo.api import VLMo
        from vlmo.engine.worker import Engine
        from vlmo.serve.routes import create_app

        if threads:
            torch.set_num_threads(threads)
        vlm = VLMo.from_pretrained(load.pop("model"), **load)
        if settings.mask_decoder is not None:
            vlm.mask_decoder(settings.mask_decoder)
        self.engine = Engine(vlm, max_batch_size=max_batch_size, max_queue=max_queue)
        self.asgi = create_app(self.engine, settings)
        self.step_timeout = step_timeout

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi

    def check_health(self) -> None:
        """Ray Serve's health check: fails when the engine's step has run past its budget (a wedged replica)."""
        seconds = self.engine.step_seconds()
        if seconds > self.step_timeout:
            raise RuntimeError(f"the engine's step has run for {seconds:.0f} s (budget {self.step_timeout:g} s)")


def serve_ray(
    load: dict[str, Any],
    settings: ServerSettings,
    options: RayServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_queue: int = 64,
    shutdown_timeout: float = 30.0,
) -> None:
    """Run the deployment until SIGINT / SIGTERM (module docstring). `load`: `VLMo.from_pretrained`'s arguments."""
    check_serving(host, port, max_batch_size, max_queue, shutdown_timeout)
    # Every replica's request line reaches this process's stderr, with its pid: Ray's deduplication of repeated lines
    # would hide most of them (the log is how an operator sees which replica served what).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RayServeMissing(f"vlmo serve --ray needs Ray Serve ({e}); run: pip install 'vlmo[ray]'") from None

    started_here = _connect(ray, options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
        deployment = serve.deployment(**deployment_options(options, max_batch_size, max_queue, shutdown_timeout))(
            serve.ingress()(Replica)
        )
        app = deployment.bind(
            dict(load),
            settings,
            max_batch_size,
            max_queue,
            None if options.gpu else options.cpus(),
            options.step_timeout,
        )
        say(f"Loading {settings.model_name} in {_replicas_text(options)} …")
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        where = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        say(f"vlmo serve --ray: {settings.model_name} at {where}/v1 ({_replicas_text(options)}; Ctrl-C to stop)")
        stop.wait()
        say("stopping: deleting the deployment (accepted requests finish first)")
        _within(lambda: serve.delete(APP_NAME), shutdown_timeout + GRACE)
        if started_here:
            _within(serve.shutdown, GRACE)
    finally:
        if started_here:
            ray.shutdown()
    say("vlmo serve --ray stopped")


def deployment_options(
    options: RayServeOptions, max_batch_size: int, max_queue: int, shutdown_timeout: float
) -> dict[str, Any]:
    """Ray Serve's settings for the replicas (module docstring): resources, how many requests a replica holds and
    how many wait, the full queue's answer (503 with the single-process server's Retry-After), health, stopping."""
    from vlmo.serve.errors import RETRY_AFTER_SECONDS

    return {
        "name": "Replica",
        "ray_actor_options": {"num_cpus": 0 if options.gpu else options.cpus(), "num_gpus": 1 if options.gpu else 0},
        "max_ongoing_requests": max_batch_size,
        "max_queued_requests": max_queue,
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_SECONDS},
        "graceful_shutdown_timeout_s": shutdown_timeout,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "logging_config": QUIET,
        **_scaling(options, max_batch_size),
    }


def _within(stop: Any, seconds: float) -> None:
    """Run `stop` for at most `seconds`: a cluster whose processes also got the signal (a terminal's Ctrl-C reaches
    its whole process group) may never confirm, and the command must still end."""
    worker = threading.Thread(target=stop, name="vlmo-ray-stop", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        say(f"stopping: Ray did not confirm within {seconds:g} s; going on")


def _scaling(options: RayServeOptions, max_batch_size: int) -> dict[str, Any]:
    if options.min_replicas is None:
        return {"num_replicas": options.replicas}
    return {
        "autoscaling_config": {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            # scale up when a replica's batch is more than half full on average
            "target_ongoing_requests": max(1, max_batch_size // 2),
        }
    }


def _replicas_text(options: RayServeOptions) -> str:
    if options.min_replicas is not None:
        return f"{options.min_replicas}–{options.max_replicas} replicas"
    return f"{options.replicas} replica" + ("s" if options.replicas != 1 else "")


def _connect(ray: Any, options: RayServeOptions) -> bool:
    """Join RAY_ADDRESS's cluster, or start a local Ray with room for every replica; True when started here."""
    debug = bool(os.environ.get("VLMO_DEBUG"))
    level = logging.DEBUG if debug else logging.ERROR
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(level)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=level)
        return False
    need = 0 if options.gpu else options.most * options.cpus()
    ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level=level)
    return True


__all__ = ["RayServeOptions", "Replica", "deployment_options", "serve_ray"]
