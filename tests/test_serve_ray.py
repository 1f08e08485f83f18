"""`vlmo serve --ray`: the real thing, as an operator runs it: a `vlmo serve --ray` process that starts a local Ray
cluster with two replicas of the built-in model, driven through Ray Serve's HTTP proxy by the official `openai`
client and httpx, one replica frozen and killed under load, then stopped with SIGTERM (docs/serve.md, "Several
replicas and machines"). Slow: Ray and two replicas take half a minute to start on a 2-core machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="pip install 'vlmo[ray]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import KEY, MODEL, data_uri, free_port, message, scene  # noqa: E402
from vlmo import VLMo  # noqa: E402

pytestmark = pytest.mark.slow
STARTUP_SECONDS = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LINE = re.compile(r"\(ServeReplica:vlmo:Replica pid=(\d+)\) POST /v1/chat/completions (\d+)")


class RayServed:
    """A `vlmo serve --ray` process, its URL and stderr."""

    def __init__(self, tmp: Path, *args: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp / "serve-ray.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLMO_", "RAY_"))}
        env |= {"VLMO_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "VLMO_CACHE": str(tmp / "cache")}
        command = [sys.executable, "-m", "vlmo", "serve", "--ray", "--model", MODEL, "--port", str(port), *args]
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{self.stderr()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200 and "Ctrl-C" in self.stderr():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vlmo serve --ray did not start in {STARTUP_SECONDS} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return ANSI.sub("", self.log.read_text(errors="replace"))

    def served(self, at_least: int = 0) -> list[tuple[int, int]]:
        """(replica pid, status) of every chat request the replicas logged, once there are `at_least` of them (Ray
        forwards the replicas' lines a moment later), or after 30 s."""
        deadline = time.monotonic() + 30
        while True:
            found = [(int(pid), int(status)) for pid, status in LINE.findall(self.stderr())]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def descendants(self) -> set[int]:
        """Every process under the server (Ray's own and the replicas)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(stat.parent.name))
        found, todo = set(), [self.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.add(child)
                todo.append(child)
        return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_replicas_share_the_load_survive_a_kill_and_stop_cleanly(tmp_path: Path, shapes_int8: VLMo) -> None:
    server = RayServed(
        tmp_path, "--replicas", "2", "--replica-threads", "1", "--max-batch-size", "2", "--max-image-mb", "1"
    )
    family = server.descendants()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        questions = ["what color is the circle?", "how many shapes are there?", "is there a red square?"]
        work = [(i % 6, questions[i % 3]) for i in range(24)]
        images = {i: scene(30 + i) for i in range(6)}
        uris = {i: data_uri(image) for i, image in images.items()}
        expected = {(i, q): shapes_int8.ask(images[i], q) for i, q in set(work)}  # one by one

        def ask(item: tuple[int, str]) -> str:
            out = client.chat.completions.create(model=MODEL, messages=message(uris[item[0]], item[1]))
            return str(out.choices[0].message.content)

        # 24 concurrent requests through the proxy: the answers asked one by one, from both replicas.
        with ThreadPoolExecutor(max_workers=24) as pool:
            assert list(pool.map(ask, work)) == [expected[item] for item in work]
        served = server.served(at_least=24)
        assert len(served) == 24 and {s for _, s in served} == {200}
        replicas = sorted({pid for pid, _ in served})
        assert len(replicas) == 2, server.stderr()  # both replicas answered some

        # The app's own limits hold through the proxy: the API key, the image cap.
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        big = data_uri(os.urandom(2 * 1024 * 1024), "image/png")
        refused = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": message(big, "what?")},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "payload_too_large"

        # One replica frozen, then killed, while 24 requests are in flight: it holds at most --max-batch-size of
        # them (they fail, cleanly); every other request waits in Ray's router and is answered, once, by the other.
        victim = replicas[0]
        before = len(server.served(at_least=25))  # the 24 answers and the 413
        os.kill(victim, signal.SIGSTOP)
        outcomes: list[Any] = []

        def attempt(item: tuple[int, str]) -> Any:
            try:
                return ask(item)
            except openai.APIError as e:
                return e

        with ThreadPoolExecutor(max_workers=24) as pool:
            futures = [pool.submit(attempt, item) for item in work]
            time.sleep(3)  # the router has handed the frozen replica its share by now
            os.kill(victim, signal.SIGKILL)
            outcomes = [f.result() for f in futures]
        failed = [o for o in outcomes if not isinstance(o, str)]
        assert len(failed) <= 2, failed  # at most the dead replica's running batch
        assert all(isinstance(e, openai.APIStatusError) and e.status_code >= 500 for e in failed), failed
        answered = [(item, o) for item, o in zip(work, outcomes, strict=True) if isinstance(o, str)]
        assert all(o == expected[item] for item, o in answered)
        server.served(at_least=before + len(answered))
        time.sleep(2)  # every line forwarded
        served = server.served()[before:]
        survivor = [s for pid, s in served if pid == replicas[1]]
        # The survivor answered each request once; the frozen replica logged at most its batch before it stopped
        # (an answer it finished but could not send is asked again of the survivor: the client gets one).
        assert len(survivor) == len(answered) and set(survivor) == {200}, served
        assert len(served) - len(survivor) <= 2 and {pid for pid, _ in served} <= set(replicas), served

        # A replica killed while it streams an answer: the client's stream fails (Ray's proxy closes it without the
        # end of the response); it never ends as if the answer were whole.
        stream = client.chat.completions.create(
            model=MODEL, messages=message(uris[0], "caption en"), stream=True, temperature=5.0, seed=1, max_tokens=400
        )
        pieces = iter(stream)
        next(pieces)  # the answer has begun
        streamer = next(p for p in replicas[1:] if alive(p))
        os.kill(streamer, signal.SIGKILL)
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in pieces:
                pass
    finally:
        for pid in server.descendants():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            raise
    assert code == 0, server.stderr()
    assert "vlmo serve --ray stopped" in server.stderr()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in family):
        time.sleep(0.5)
    assert not [pid for pid in family if alive(pid)]  # the Ray it started is gone with it
