"""The server's app object driven in this process (`vlmo.serve.routes.create_app`, through httpx's ASGI transport), for
what the subprocess tests of tests/test_serve.py cannot set up cheaply: the taught model's segmentation masks, a
full queue, and remote images from a local HTTP server. Also the `vlmo serve` command's checks before loading.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import RED
from vlmo import VLMo, tasks
from vlmo.cli.commands import app as cli_app
from vlmo.demo.shapes import make_scene, render

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="pip install 'vlmo[serve]'")
pytest.importorskip("prometheus_client", reason="pip install 'vlmo[serve]'")

from vlmo.engine.worker import Engine  # noqa: E402
from vlmo.serve.errors import validation_message  # noqa: E402
from vlmo.serve.routes import ServerSettings, create_app  # noqa: E402


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


async def call(app: Any, requests: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    """Send the requests at once to `app` (an ASGI app: its engine is started by the caller)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        return await asyncio.gather(*(client.request(m, path, json=body) for m, path, body in requests))


@pytest.fixture
def shapes_app() -> Iterator[Any]:
    """An app on vlmo/shapes whose engine runs one request at a time and lets one wait."""
    engine = Engine(VLMo.from_pretrained("vlmo/shapes"), max_batch_size=1, max_queue=1)
    engine.start()
    try:
        yield create_app(engine, ServerSettings(model_name="shapes", max_image_mb=1, allow_remote_images=True))
    finally:
        engine.shutdown(cancel=True)


def test_segment_masks_are_coco_rle_as_the_cli_prints_them(taught_checkpoint: Path, filled_mask_decoder: Path) -> None:
    vlm = VLMo.from_pretrained(taught_checkpoint, device="cpu")
    engine = Engine(vlm)
    engine.start()
    try:
        app = create_app(engine, ServerSettings(model_name="taught", mask_decoder=filled_mask_decoder))
        image = Image.new("RGB", (96, 64), RED)
        body = {"image": data_uri(image), "labels": ["cat"], "model": "taught"}
        (got,) = asyncio.run(call(app, [("POST", "/v1/segment", body)]))
    finally:
        engine.shutdown(cancel=True)
    assert got.status_code == 200, got.text
    found = vlm.segment(image, "cat", mask_decoder=filled_mask_decoder)
    assert len(found) == 1 and found[0].mask.any()
    expected = tasks.located_payload("segment", image.size, found)  # what `vlmo segment --json` prints
    payload = got.json()
    assert {k: payload[k] for k in expected} == json.loads(json.dumps(expected))
    assert payload["segmentations"][0]["mask"]["counts"] and payload["mask_encoding"] == tasks.MASK_ENCODING


def test_segment_without_a_usable_mask_decoder_is_one_error_before_generating(tmp_path: Path) -> None:
    broken = tmp_path / "vae-oid.npz"
    broken.write_bytes(b"not a mask decoder")
    engine = Engine(VLMo.from_pretrained("vlmo/shapes"))
    engine.start()
    try:
        app = create_app(engine, ServerSettings(model_name="shapes", mask_decoder=broken))
        body = {"image": data_uri(render(make_scene("segment", 0))), "labels": "circle"}
        (first,) = asyncio.run(call(app, [("POST", "/v1/segment", body)]))
        (metrics,) = asyncio.run(call(app, [("GET", "/metrics", {})]))
    finally:
        engine.shutdown(cancel=True)
    assert first.status_code == 500 and first.json()["error"]["code"] == "mask_decoder_unavailable"
    assert "--mask-decoder" in first.json()["error"]["message"]
    assert "vlmo_completion_tokens_total 0.0" in metrics.text  # nothing was generated


@pytest.mark.parametrize("sampling", [{"temperature": 1e-39}, {"temperature": 0.7, "top_p": 1e-320}])
def test_sampling_values_the_sampler_cannot_compute_are_a_400(shapes_app: Any, sampling: dict[str, float]) -> None:
    """Refused when the request is checked, so the request beside it in the engine never sees them."""
    message = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(render(make_scene("sampling", 0)))}},
        {"type": "text", "text": "caption en"},
    ]}  # fmt: skip
    (answer,) = asyncio.run(call(shapes_app, [("POST", "/v1/chat/completions", {"messages": [message], **sampling})]))
    assert answer.status_code == 400, answer.text
    assert "must be at least" in answer.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing(shapes_app: Any) -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(render(make_scene("queue", 0)))}},
                    {"type": "text", "text": "caption en"},
                ],
            }
        ],
        "temperature": 5.0,
        "seed": 3,
        "max_tokens": 40,
    }
    answers = asyncio.run(call(shapes_app, [("POST", "/v1/chat/completions", body)] * 6))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses  # each got an answer or an error
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    (again,) = asyncio.run(call(shapes_app, [("POST", "/v1/chat/completions", body)]))
    assert again.status_code == 200  # and it serves on


# -- remote images ---------------------------------------------------------------------------------------------


class ImageHost(http.server.BaseHTTPRequestHandler):
    """Serves a test image, redirects and misbehaviours by path."""

    image = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        port = self.server.server_address[1]
        if self.path == "/scene.png":
            self.reply(200, self.image)
        elif self.path == "/hop":
            self.redirect(f"http://127.0.0.1:{port}/scene.png")  # same host
        elif self.path == "/away":
            self.redirect(f"http://localhost:{port}/scene.png")  # another host name, same machine
        elif self.path == "/big":
            self.reply(200, b"x" * (1024 * 1024 + 1))
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()  # no Content-Length: read until the connection closes
            self.wfile.write(b"x" * (1024 * 1024 + 1))
            self.close_connection = True
        elif self.path == "/slow":
            time.sleep(3)
            self.reply(200, self.image)
        else:
            self.reply(404, b"no")

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # /slow: the server gave up waiting, as it should
            pass

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[str]:
    ImageHost.image = png(render(make_scene("remote", 0)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_images_with_the_flag(image_host: str) -> None:
    vlm = VLMo.from_pretrained("vlmo/shapes")
    engine = Engine(vlm)
    engine.start()
    settings = ServerSettings(
        model_name="shapes", max_image_mb=1, allow_remote_images=True, remote_timeout=1.0, allow_private_addresses=True
    )  # the test's image host is on loopback, which is refused without allow_private_addresses
    app = create_app(engine, settings)
    paths = ["/scene.png", "/hop", "/away", "/big", "/big-unannounced", "/missing", "/slow", "/../scene.png"]
    try:
        answers = asyncio.run(
            call(app, [("POST", "/v1/detect", {"image": image_host + p, "labels": "circle"}) for p in paths])
        )
    finally:
        engine.shutdown(cancel=True)
    got = dict(zip(paths, answers, strict=True))
    expected = vlm.detect(render(make_scene("remote", 0)), "circle")
    assert got["/scene.png"].json()["detections"] == [d.to_dict() for d in expected]
    assert got["/hop"].status_code == 200 and got["/hop"].json() == got["/scene.png"].json()
    for path, status, words in [
        ("/away", 400, "redirects to another host (localhost)"),
        ("/big", 413, "larger than the server's limit of 1 MB"),
        ("/big-unannounced", 413, "larger than the server's limit"),
        ("/missing", 400, "HTTP 404"),
        ("/slow", 400, "took longer than 1 s"),
    ]:
        assert got[path].status_code == status, (path, got[path].text)
        assert words in got[path].json()["error"]["message"], got[path].text


# -- pieces ----------------------------------------------------------------------------------------------------


def test_validation_errors_become_one_line() -> None:
    assert validation_message([{"type": "json_invalid", "loc": ("body", 0), "msg": "x"}]).startswith("the request body")
    union = [
        {"type": "string_type", "loc": ("body", "messages", 0, "content", "str"), "msg": "Input should be a string"},
        {"type": "union_tag_invalid", "loc": ("body", "messages", 0, "content", "list[...]", 0), "msg": "bad tag"},
    ]
    assert validation_message(union) == "messages.0.content.0: bad tag"  # the deeper error, without branch names
    assert validation_message([{"type": "extra_forbidden", "loc": ("body", "tools"), "msg": ""}]) == (
        "unsupported parameter: tools"
    )


def test_settings_are_checked(tmp_path: Path) -> None:
    from vlmo.errors import InputError

    # Python spellings here; the CLI's flags in test_serve_checks_its_options_before_loading
    with pytest.raises(InputError, match="^max_image_mb must be a number > 0 and < 1000000, got 0$"):
        ServerSettings(model_name="m", max_image_mb=0)
    with pytest.raises(InputError, match="^allowed_local_media_path must be an existing folder"):
        ServerSettings(model_name="m", allowed_local_media_path=tmp_path / "none")
    with pytest.raises(InputError, match="^api_key is empty"):
        ServerSettings(model_name="m", api_key=" ")
    with pytest.raises(InputError, match="^no such file for mask_decoder: "):
        ServerSettings(model_name="m", mask_decoder=tmp_path / "none.npz")
    with pytest.raises(InputError, match="^remote_timeout must be a number > 0 and < 3600, got 0$"):
        ServerSettings(model_name="m", remote_timeout=0)
    settings = ServerSettings(model_name="m", max_image_mb=3)
    assert settings.max_image_bytes == 3 * 1024 * 1024 and settings.max_body_bytes > 4 * 1024 * 1024


# -- the command -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--replicas", "2"], "--replicas, --min-replicas, --max-replicas and --replica-threads need --ray"),
        (["--ray", "--replicas", "0"], "--replicas must be a whole number ≥ 1"),
        (["--ray", "--min-replicas", "2"], "give both --min-replicas and --max-replicas"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas must be a whole number ≥ 3"),
        (["--ray", "--replica-threads", "0"], "--replica-threads must be a whole number ≥ 1"),
    ],
)
def test_serve_ray_options_are_checked_before_anything_starts(args: list[str], words: str) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--model", "never-loaded", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("error: ")


def test_replicas_hold_only_their_batch_and_a_full_queue_answers_503_with_retry_after() -> None:
    from vlmo.serve.errors import RETRY_AFTER_SECONDS
    from vlmo.serve.ray_serve import RayServeOptions, deployment_options

    fixed = deployment_options(RayServeOptions(replicas=3, threads=2), 8, 64, 30.0)
    assert fixed["max_ongoing_requests"] == 8 and fixed["max_queued_requests"] == 64  # waiting is in Ray's router
    assert fixed["backpressure_config"] == {"status_code": 503, "retry_after_s": RETRY_AFTER_SECONDS}
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    scaled = deployment_options(RayServeOptions(min_replicas=1, max_replicas=4, gpu=True), 8, 64, 30.0)
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert scaled["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 1} and "num_replicas" not in scaled


def test_a_replica_health_check_fails_only_when_a_step_overruns(shapes_int8: VLMo) -> None:
    from vlmo.serve.ray_serve import Replica

    replica = Replica.__new__(Replica)  # the checks only; building one loads a model (tests/test_serve_ray.py)
    replica.engine, replica.step_timeout = Engine(shapes_int8), 0.5
    replica.check_health()  # no step running
    replica.engine._step_began = time.monotonic() - 1.0  # a step running for a second: wedged for this budget
    with pytest.raises(RuntimeError, match="the engine's step has run for 1 s"):
        replica.check_health()


def test_serve_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails; find_spec says missing
    result = CliRunner().invoke(cli_app, ["serve", "--model", "never-loaded"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'vlmo[serve]'" in lines[0] and lines[0].startswith("error: ")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-image-mb", "0"], "--max-image-mb must be a number > 0 and < 1000000, got 0.0"),
        (["--max-batch-size", "0"], "--max-batch-size must be a whole number ≥ 1, got 0"),
        (["--max-queue", "0"], "--max-queue must be a whole number ≥ 1, got 0"),
        (["--allowed-local-media-path", "/no/such/folder"], "--allowed-local-media-path"),
        (["--mask-decoder", "/no/such/file.npz"], "no such file for --mask-decoder: /no/such/file.npz"),
        (["--port", "70000"], "--port must be a whole number from 1 to 65535, got 70000"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a number ≥ 0 and < 86400, got -1.0"),
    ],
)
def test_serve_checks_its_options_before_loading(args: list[str], words: str) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--model", "never-loaded", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Loading" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_serve_refuses_a_taken_port_before_loading() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--model", "never-loaded", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Loading" not in result.output


class Connections:
    """Records every socket connection attempt; one to an address off this machine fails the test at once (tests
    send traffic to loopback only)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ipaddress
        import socket

        self.made: list[str] = []
        connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

        def guarded(real: Any) -> Any:
            def attempt(sock: socket.socket, address: Any) -> Any:
                host = str(address[0]) if isinstance(address, tuple) else str(address)
                self.made.append(host)
                if isinstance(address, tuple) and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                    raise AssertionError(f"a connection to {host}, off this machine")
                return real(sock, address)

            return attempt

        monkeypatch.setattr(socket.socket, "connect", guarded(connect))
        monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "localhost", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"],
)
def test_remote_images_from_private_addresses_are_refused_before_connecting(
    image_host: str, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every spelling of a non-public address is refused after resolving the name and before any connection, unless
    the server was started with --allow-private-addresses (every address here is this machine's loopback)."""
    from vlmo.serve.media import MediaPolicy, fetch_image

    port = image_host.rsplit(":", 1)[1]
    connections = Connections(monkeypatch)
    policy = MediaPolicy(2**20, allow_remote_images=True, remote_timeout=2.0)
    with pytest.raises(Exception, match="not a public address.*--allow-private-addresses") as info:
        asyncio.run(fetch_image(f"http://{host}:{port}/scene.png", policy))
    assert type(info.value).__name__ == "BadRequest"
    assert connections.made == []  # refused before a connection was attempted


def test_only_addresses_that_are_not_public_are_refused() -> None:
    """The classification itself, on literal addresses (nothing is resolved over a network, nothing connects)."""
    from vlmo.serve.media import MediaPolicy, _check_address

    policy = MediaPolicy(2**20, allow_remote_images=True)
    private = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "[fe80::1]", "[fc00::1]", "100.64.0.1"]
    for url in [f"http://{host}/" for host in [*private, "[::ffff:10.0.0.1]"]]:
        with pytest.raises(Exception, match="not a public address"):
            asyncio.run(_check_address(url, policy))
    for url in ("http://8.8.8.8/", "https://[2001:4860:4860::8888]/"):
        asyncio.run(_check_address(url, policy))  # public: allowed (only classified here, never fetched)
    allowed = MediaPolicy(2**20, allow_remote_images=True, allow_private_addresses=True)
    asyncio.run(_check_address("http://10.1.2.3/", allowed))


def test_serve_help_lists_the_issue_options() -> None:
    result = CliRunner().invoke(cli_app, ["serve", "-h"])
    assert result.exit_code == 0
    for option in (
        "--model", "--adapter", "--device", "--dtype", "--quantize", "--host", "--port", "--api-key", "VLMO_API_KEY",
        "--served-model-name", "--max-batch-size", "--max-queue", "--max-image-mb", "--allowed-local-media-path",
        "--allow-remote-images", "--allow-private-addresses",
    ):  # fmt: skip
        assert option in result.output


def test_a_huge_question_is_refused_by_its_length_without_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12 MB question (under the body cap) is refused by its length: the tokenizer never sees it (tokenizing it
    took seconds, during which the server's other clients waited), and /health answers beside it."""
    vlm = VLMo.from_pretrained("vlmo/shapes")
    seen: list[int] = []
    encode = vlm.text.encode
    monkeypatch.setattr(
        vlm.text, "encode", lambda texts, *a, **k: seen.append(max(map(len, texts))) or encode(texts, *a, **k)
    )
    engine = Engine(vlm, max_batch_size=1)
    engine.start()
    app = create_app(engine, ServerSettings(model_name="shapes", max_image_mb=20))
    body = chat_body_for(data_uri(render(make_scene("huge", 0))), "what is " + "very " * (12 * 2**20 // 5) + "red?")

    async def both() -> tuple[Any, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            big = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            health = await client.get("/health")
            return await big, health

    try:
        big, health = asyncio.run(both())
    finally:
        engine.shutdown(cancel=True)
    assert health.status_code == 200
    assert big.status_code == 400 and "characters, more than the model's" in big.json()["error"]["message"]
    assert all(n < 1000 for n in seen)  # nothing the size of the question reached the tokenizer


def chat_body_for(image_url: str, text: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}]}
