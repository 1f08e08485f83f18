"""`vlmo serve` end to end: the real server (a `python -m vlmo serve` subprocess on a free loopback port, the built-in
`vlmo/shapes` model), driven by the official `openai` client (chat, streaming, models) and by httpx (detect,
segment, metrics and every error). Expected answers come from `VLMo` in this process, one request at a time.

One server serves the whole module (with an API key, a 1 MB image cap and a media folder); the stop tests start
their own. tests/test_serve_app.py drives the app object in this process (segmentation masks, a full queue,
remote images).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmo import VLMo, tasks
from vlmo.demo.shapes import make_scene, render

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install 'vlmo[test]'")
pytest.importorskip("fastapi", reason="pip install 'vlmo[serve]'")
pytest.importorskip("uvicorn", reason="pip install 'vlmo[serve]'")
pytest.importorskip("prometheus_client", reason="pip install 'vlmo[serve]'")

MODEL = "vlmo/shapes"
KEY = "test-key-123"
STARTUP_SECONDS = 120  # a loaded CI machine; the shapes model itself loads in about a second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A `vlmo serve` subprocess: its base URL, process and stderr log file."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def start_server(tmp: Path, *args: str, key: str | None = KEY) -> Served:
    """Start `vlmo serve` on a free loopback port and wait (bounded) until /health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLMO_"))}
    env |= {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "VLMO_CACHE": str(tmp / "vlmo-cache")}
    if key is not None:
        env["VLMO_API_KEY"] = key  # the key by environment variable, as the docs advise
    log = tmp / f"serve-{port}.log"
    command = [sys.executable, "-m", "vlmo", "serve", "--model", MODEL, "--port", str(port), *args]
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    served = Served(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"vlmo serve exited with {process.returncode}:\n{served.stderr()}")
        try:
            if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    served.stop()
    raise AssertionError(f"vlmo serve did not answer /health within {STARTUP_SECONDS} s:\n{served.stderr()}")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the server may read file:// images from (and a file beside it that it may not)."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    scene(0).save(allowed / "scene.png")
    scene(0).save(root / "secret.png")
    (allowed / "big.bin").write_bytes(os.urandom(1024 * 1024 + 10))
    (allowed / "escape.png").symlink_to(root / "secret.png")
    os.mkfifo(allowed / "pipe.png")  # opened for reading, a FIFO would wait for a writer forever
    return allowed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, media: Path, filled_mask_decoder: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    args = ["--max-image-mb", "1", "--allowed-local-media-path", str(media), "--mask-decoder", str(filled_mask_decoder)]
    served = start_server(tmp, *args)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def vlm(shapes_int8: VLMo) -> VLMo:
    return shapes_int8  # the server's defaults: CPU, int8 weights (loaded once, conftest.py)


@pytest.fixture
def http(server: Served) -> Iterator[Any]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture
def client(server: Served) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def scene(index: int) -> Image.Image:
    return render(make_scene("serve", index))


def data_uri(image: Image.Image | bytes, media_type: str = "image/png") -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return f"data:{media_type};base64," + base64.b64encode(image).decode()


def message(image_url: str, text: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}],
        }
    ]


def chat_body(image_url: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": message(image_url, text), **extra}


def assert_error(response: Any, status: int, *words: str) -> dict[str, Any]:
    """An OpenAI-style error body with a one-line message containing `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# -- the OpenAI face ---------------------------------------------------------------------------------------------


def test_health_is_open_and_models_list_the_served_model(server: Served, client: Any) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL}  # no key needed
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_answers_equal_the_api(client: Any, vlm: VLMo) -> None:
    image = scene(1)
    out = client.chat.completions.create(model=MODEL, messages=message(data_uri(image), "how many shapes are there?"))
    assert out.choices[0].message.content == vlm.ask(image, "how many shapes are there?")
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "stop"
    assert out.model == MODEL and out.object == "chat.completion"
    usage = out.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # a task prefix is a PaliGemma prompt as it is (tasks.from_chat_text)
    caption = client.chat.completions.create(model=MODEL, messages=message(data_uri(image), "caption en"))
    assert caption.choices[0].message.content == vlm.caption(image)
    found = client.chat.completions.create(model=MODEL, messages=message(data_uri(image), "detect circle ; square"))
    assert found.choices[0].message.content == vlm.generate(image, tasks.detect("circle ; square"))


def test_streaming_sends_the_same_answer_in_openai_chunks(client: Any, http: Any, vlm: VLMo) -> None:
    image = scene(2)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=message(data_uri(image), "caption en"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == vlm.caption(image)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    # on the wire: server-sent events, chat.completion.chunk objects, ending with [DONE]
    with http.stream("POST", "/v1/chat/completions", json=chat_body(data_uri(image), "caption en", stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e.removeprefix("data: "))["object"] == "chat.completion.chunk" for e in events[:-1])


def test_max_tokens_stop_strings_and_seeded_sampling(client: Any, vlm: VLMo) -> None:
    uri, image = data_uri(scene(3)), scene(3)
    full = vlm.caption(image)
    cut = client.chat.completions.create(model=MODEL, messages=message(uri, "caption en"), max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    assert full.startswith(cut.choices[0].message.content)
    newer = client.chat.completions.create(model=MODEL, messages=message(uri, "caption en"), max_completion_tokens=2)
    assert newer.choices[0].message.content == cut.choices[0].message.content
    stopped = client.chat.completions.create(model=MODEL, messages=message(uri, "caption en"), stop=[" "])
    assert stopped.choices[0].message.content == full.split(" ")[0]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(
            model=MODEL, messages=message(uri, "caption en"), temperature=1.5, top_p=0.9, seed=7, max_tokens=12
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # same seed, same answer
    greedy = client.chat.completions.create(model=MODEL, messages=message(uri, "caption en"), temperature=0)
    assert greedy.choices[0].message.content == full


def test_detect_and_segment_give_the_apis_objects(http: Any, vlm: VLMo, filled_mask_decoder: Path) -> None:
    image = scene(4)
    labels = ["circle", "triangle"]  # the shapes in it
    got = http.post("/v1/detect", json={"image": data_uri(image), "labels": labels, "model": MODEL})
    assert got.status_code == 200, got.text
    body = got.json()
    expected = tasks.located_payload("detect", image.size, vlm.detect(image, labels))
    assert {k: body[k] for k in expected} == json.loads(json.dumps(expected))
    assert body["size"] == list(image.size) and body["detections"] and body["model"] == MODEL
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    got = http.post("/v1/segment", json={"image": data_uri(image), "labels": "circle ; square"})
    assert got.status_code == 200, got.text
    expected = tasks.located_payload(
        "segment", image.size, vlm.segment(image, "circle ; square", mask_decoder=filled_mask_decoder)
    )
    assert {k: got.json()[k] for k in expected} == json.loads(json.dumps(expected))


def test_the_built_in_model_segments_offline_with_its_own_decoder(tmp_path: Path, vlm: VLMo) -> None:
    """No --mask-decoder, HF_HUB_OFFLINE=1 and an empty cache: `/v1/segment` decodes with the mask decoder that
    ships with vlmo/shapes, and returns the masks `VLMo.segment` returns."""
    example = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    served = start_server(tmp_path, key=None)
    try:
        body = {"image": data_uri(example.read_bytes()), "labels": "circle ; square"}
        got = httpx.post(served.url + "/v1/segment", json=body, timeout=60)
    finally:
        served.stop()
    assert got.status_code == 200, got.text
    expected = tasks.located_payload("segment", (224, 224), vlm.segment(example, "circle ; square"))
    assert [s["label"] for s in got.json()["segmentations"]] == ["circle", "square"]
    assert {k: got.json()[k] for k in expected} == json.loads(json.dumps(expected))


def test_file_urls_under_the_allowed_folder_only(http: Any, media: Path, vlm: VLMo) -> None:
    inside = http.post("/v1/detect", json={"image": (media / "scene.png").as_uri(), "labels": "circle"})
    assert inside.status_code == 200, inside.text
    assert inside.json()["detections"] == [d.to_dict() for d in vlm.detect(scene(0), "circle")]
    assert_error(http.post("/v1/detect", json={"image": (media.parent / "secret.png").as_uri(), "labels": "circle"}),
                 400, "outside the allowed media folder")  # fmt: skip
    assert_error(http.post("/v1/detect", json={"image": (media / "escape.png").as_uri(), "labels": "circle"}),
                 400, "outside the allowed media folder")  # a symbolic link out of it  # fmt: skip
    assert_error(http.post("/v1/detect", json={"image": (media / "../allowed/../secret.png").as_uri(), "labels": "x"}),
                 400, "outside")  # fmt: skip
    assert_error(http.post("/v1/detect", json={"image": (media / "none.png").as_uri(), "labels": "x"}), 400, "no image")
    assert_error(http.post("/v1/detect", json={"image": (media / "big.bin").as_uri(), "labels": "x"}), 413, "1 MB")
    assert_error(http.post("/v1/detect", json={"image": (media / "pipe.png").as_uri(), "labels": "x"}),
                 400, "not a regular file")  # answered at once, not after a writer  # fmt: skip
    nul = (media / "scene.png").as_uri() + "%00.txt"
    assert_error(http.post("/v1/detect", json={"image": nul, "labels": "x"}), 400, "NUL character")


def test_metrics_count_requests_tokens_and_latency(http: Any) -> None:
    http.post("/v1/chat/completions", json=chat_body(data_uri(scene(5)), "caption en"))
    text = http.get("/metrics").text
    assert 'vlmo_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for name in ("vlmo_prompt_tokens_total", "vlmo_completion_tokens_total"):
        assert metric(text, name) > 0
    for name in ("vlmo_queue_depth", "vlmo_running_batch_size"):
        # idle: a finished row leaves the engine's batch before its answer is sent
        assert metric(http.get("/metrics").text, name) == 0, name
    assert metric(text, "vlmo_time_to_first_token_seconds_count") >= 1
    assert 'vlmo_request_latency_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"}' in text


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_each_request_is_logged_on_one_line(server: Served, http: Any) -> None:
    http.post("/v1/chat/completions", json=chat_body(data_uri(scene(6)), "caption en"))
    log = server.stderr()
    assert log.startswith(f"Loading {MODEL}")
    assert f"vlmo serve: {MODEL} at {server.url}/v1" in log
    line = [x for x in log.splitlines() if x.startswith("POST /v1/chat/completions 200 tokens=")][-1]
    assert line.endswith("s") and float(line.split()[-1].removesuffix("s")) > 0
    assert "warning" not in log  # loopback: no warning


# -- errors: one line each, and the server keeps serving --------------------------------------------------------


def test_api_key_is_required_and_compared(server: Served, client: Any) -> None:
    anonymous = httpx.post(server.url + "/v1/chat/completions", json=chat_body(data_uri(scene(0)), "caption en"))
    error = assert_error(anonymous, 401, "API key")
    assert error["type"] == "authentication_error" and anonymous.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(server.url + "/metrics", headers={"Authorization": KEY}), 401)  # not "Bearer KEY"
    big = chat_body(data_uri(os.urandom(900 * 1024)), "caption en")  # under the cap: read, then refused
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=big), 401)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "what is this?"}]}, 400, "no image"),
        (chat_body("data:image/png;base64,!!!!", "caption en"), 400, "not valid base64"),
        (chat_body("data:image/png,rawbytes", "caption en"), 400, "not base64"),
        (chat_body(data_uri(b"just some text", "text/plain"), "caption en"), 400, "not an image Pillow can read"),
        (chat_body("https://example.com/cat.png", "caption en"), 400, "--allow-remote-images"),
        (chat_body("/etc/passwd", "caption en"), 400, "data: URI"),
        (chat_body("file:///etc/passwd", "caption en"), 400, "outside the allowed media folder"),
        (chat_body(data_uri(os.urandom(1024 * 1024 + 4096)), "caption en"), 413, "larger than the server's limit"),
        (chat_body("data:,x", "caption en", n=2), 400, "n must be 1"),
        (chat_body("data:,x", "caption en", max_tokens=0), 400, "max_tokens must be at least 1"),
        (chat_body(data_uri(scene(0)), "caption en", max_tokens=100000), 400, "max_tokens may be at most"),
        (chat_body("data:,x", "caption en", temperature=-1), 400, "temperature"),
        (chat_body("data:,x", "caption en", seed=-1), 400, "seed"),
        (chat_body("data:,x", "caption en", stream="yes"), 400, "valid boolean"),
        (chat_body("data:,x", "caption en", max_tokens=True), 400, "valid integer"),
        (chat_body("data:,x", "caption en", temperature="0.5"), 400, "valid number"),
        (chat_body("data:,x", "caption en", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (chat_body("data:,x", "caption en", tools=[]), 400, "unsupported parameter: tools"),
        (chat_body("data:,x", "caption en", logprobs=True), 400, "logprobs"),
        (chat_body("data:,x", "detect"), 400, "empty label"),
        ({**chat_body("data:,x", "caption en"), "model": "gpt-4o"}, 404, "not served here"),
        ({"messages": [{"role": "system", "content": "be nice"}, *message("data:,x", "hi")]}, 400, "no chat template"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "x": 1}]}]}, 400, "messages.0.content.0"),
        ({}, 400, "missing parameter: messages"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_chat_requests_are_one_line_errors(http: Any, body: dict, status: int, words: str) -> None:
    assert_error(http.post("/v1/chat/completions", json=body), status, words)


def test_bad_bodies_and_routes_are_errors_too(http: Any) -> None:
    headers = {"content-type": "application/json"}
    assert_error(http.post("/v1/chat/completions", content=b"{nope", headers=headers), 400, "not valid JSON")
    assert_error(http.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400, "JSON object")
    assert_error(http.post("/v1/detect", json={"image": "data:,x"}), 400, "missing parameter: labels")
    assert_error(http.post("/v1/detect", json={"image": data_uri(scene(0)), "labels": ["a<b"]}), 400, "label")
    assert_error(http.get("/v1/nothing"), 404, "Not Found")
    assert_error(http.get("/v1/chat/completions"), 405)


def test_bodies_over_the_cap_are_refused_declared_or_not(http: Any, server: Served) -> None:
    big = b'{"messages": "' + b"x" * (2 * 1024 * 1024) + b'"}'  # the cap: 4/3 MB + 64 kB
    headers = {"content-type": "application/json"}
    declared = http.post("/v1/chat/completions", content=big, headers=headers)  # with Content-Length
    assert_error(declared, 413, "request body is larger than the server's limit")
    chunked = http.post("/v1/chat/completions", content=iter([big[:65536], big[65536:]]), headers=headers)
    assert "content-length" not in chunked.request.headers  # sent chunked: counted as it arrives
    assert_error(chunked, 413, "request body is larger than the server's limit")
    # curl's way: Expect: 100-continue, answered before the body is sent
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {KEY}",
                "Expect: 100-continue", f"Content-Length: {len(big)}", "", ""]  # fmt: skip
        sock.sendall("\r\n".join(head).encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")


def test_a_decompression_bomb_is_too_large(http: Any) -> None:
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")  # 100 M pixels in a few kB; the limit is ~89 M
    assert len(buffer.getvalue()) < 1024 * 1024
    assert_error(http.post("/v1/detect", json={"image": data_uri(buffer.getvalue()), "labels": "x"}), 413, "too large")


def test_the_server_keeps_serving_after_every_error(server: Served, http: Any, vlm: VLMo) -> None:
    assert http.post("/v1/chat/completions", content=b"{nope").status_code == 400
    out = http.post("/v1/chat/completions", json=chat_body(data_uri(scene(7)), "what color is the circle?"))
    assert out.status_code == 200
    assert out.json()["choices"][0]["message"]["content"] == vlm.ask(scene(7), "what color is the circle?")
    assert server.process.poll() is None


# -- many clients, and clients that leave --------------------------------------------------------------------------


def test_32_requests_from_8_threads_get_the_answers_asked_one_by_one(client: Any, vlm: VLMo) -> None:
    questions = ["how many shapes are there?", "what color is the circle?", "is there a red square?", "caption en"]
    work = [(i % 6, questions[i % 4]) for i in range(32)]  # repeated images: in flight together, encoded once
    images = {i: scene(10 + i) for i in range(6)}
    expected = {
        (i, q): vlm.caption(images[i]) if q == "caption en" else vlm.ask(images[i], q) for i, q in set(work)
    }  # one by one, no batching
    uris = {i: data_uri(image) for i, image in images.items()}

    def ask(item: tuple[int, str]) -> str:
        out = client.chat.completions.create(model=MODEL, messages=message(uris[item[0]], item[1]))
        return out.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, work))
    assert answers == [expected[item] for item in work]


def test_a_client_that_leaves_mid_stream_frees_its_slot(server: Served, http: Any) -> None:
    # Sampling at a high temperature runs to max_tokens: hundreds of decode steps, unless the row leaves early.
    body = chat_body(data_uri(scene(8)), "caption en", stream=True, temperature=5.0, seed=1, max_tokens=440)
    before = metric(http.get("/metrics").text, "vlmo_completion_tokens_total")
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith('data: {"id"'):  # up to the first chunk
            pass
        assert wait_for(lambda: metric(http.get("/metrics").text, "vlmo_running_batch_size") == 1)
    # the connection is closed: the row must leave the batch at the next step, long before 440 tokens
    assert wait_for(lambda: metric(http.get("/metrics").text, "vlmo_running_batch_size") == 0), "it still runs"
    # the same without streaming: a client that gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert wait_for(lambda: metric(http.get("/metrics").text, "vlmo_running_batch_size") == 0), "it still runs"
    assert metric(http.get("/metrics").text, "vlmo_completion_tokens_total") == before  # neither finished
    assert any(line.startswith("POST /v1/chat/completions 499 ") for line in server.stderr().splitlines())


# -- stopping ------------------------------------------------------------------------------------------------------


def long_stream(url: str, results: list[Any]) -> None:
    """A streamed request that runs for hundreds of tokens; appends its events (or the error) to `results`."""
    body = chat_body(data_uri(scene(9)), "caption en", stream=True, temperature=5.0, seed=2, max_tokens=300)
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            results.append(r.status_code)
            results.extend(line for line in r.iter_lines() if line)
    except httpx.HTTPError as exc:
        results.append(exc)


@pytest.mark.slow  # a server process per case; test_engine.py checks the engine's finish and cancel in-process
@pytest.mark.parametrize("grace", ["30", "0"], ids=["finishes", "cancels"])
def test_sigterm_answers_every_accepted_request_and_exits_0(tmp_path: Path, grace: str) -> None:
    served = start_server(tmp_path, "--shutdown-timeout", grace, key=None)
    try:
        results: list[Any] = []
        streaming = threading.Thread(target=long_stream, args=(served.url, results))
        streaming.start()
        deadline = time.monotonic() + 60
        while len(results) < 3:  # the status and two events: the request is running
            assert time.monotonic() < deadline and streaming.is_alive(), results
            time.sleep(0.02)
        served.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections while the accepted request finishes
            httpx.get(served.url + "/health", timeout=5)
        streaming.join(timeout=120)
        assert served.process.wait(timeout=60) == 0, served.stderr()
    finally:
        served.stop()
    assert results[0] == 200 and results[-1] == "data: [DONE]", results[-3:]
    last = json.loads(results[-2].removeprefix("data: "))
    if grace == "30":  # it had time to finish
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
    else:  # cancelled at once, with an error event the openai client raises
        assert last["error"]["code"] == "shutting_down"
    assert "stopping: no new requests" in served.stderr() and "vlmo serve stopped" in served.stderr()


def test_sigint_on_an_idle_server_exits_0(tmp_path: Path) -> None:
    served = start_server(tmp_path, key=None)
    try:
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(timeout=60) == 0, served.stderr()
    finally:
        served.stop()
    assert served.stderr().rstrip().endswith("vlmo serve stopped")
