"""The resident model, driven as users drive it: `vlmo` commands in real processes, which start, reuse, replace and
stop a real resident process on a Unix socket in a private runtime folder (docs/resident.md).

Every test gets its own runtime folder (XDG_RUNTIME_DIR) under the session's, and stops whatever resident it
started by the pid in that folder's resident.json; conftest checks at the end that none outlived the session.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from conftest import BLUE, RED, SESSION_RUNTIME

SHAPES = "vlmo/shapes"
EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "shapes.png")
WAIT = 60.0  # seconds a condition may take on a loaded 2-core machine (it takes well under one here)


class Runtime:
    """A private runtime folder and the environment that points commands at it."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root, self.tmp = root, tmp
        self.folder = root / "vlmo"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VLMO_SERVER", "VLMO_API_KEY"))}
        self.env |= {"XDG_RUNTIME_DIR": str(root), "VLMO_KEEP_ALIVE": "5m", "HF_HUB_OFFLINE": "1"}

    def vlmo(self, *args: object, keep_alive: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        extra = [] if keep_alive is None else ["--keep-alive", keep_alive]
        return subprocess.run(
            [sys.executable, "-m", "vlmo", *map(str, args), *extra],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def info(self) -> dict | None:
        try:
            return json.loads((self.folder / "resident.json").read_text())
        except (OSError, ValueError):
            return None

    def pid(self) -> int:
        info = self.info()
        assert info is not None and info["state"] == "ready", info
        return int(info["pid"])

    def log(self) -> str:
        try:
            return (self.folder / "resident.log").read_text(errors="replace")
        except OSError:
            return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (a resident started by this process is reaped by the test's own wait).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def until(condition: object, what: str, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


def residents_in(folder: Path) -> list[int]:
    """Resident processes whose spec names `folder` (each test's own, so they are stopped by their own id)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "vlmo.cli.remote.process" in text and str(folder) in text:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    root = Path(tempfile.mkdtemp(dir=SESSION_RUNTIME))
    rt = Runtime(root, tmp_path)
    yield rt
    for pid in residents_in(root):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        until(lambda pid=pid: not alive(pid), f"resident {pid} gone")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    found = {}
    for name, colour in (("red", RED), ("blue", BLUE)):
        found[name] = folder / f"{name}.png"
        Image.new("RGB", (96, 64), colour).save(found[name])
    (folder / "broken.png").write_bytes(b"not a png")
    found["broken"] = folder / "broken.png"
    return found


def same(runtime: Runtime, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a command through the resident model and in-process: the same stdout and exit code (and, with --out,
    the same picture). Returns the resident run."""
    where = [i for i, a in enumerate(args) if a == "--out"]
    picture = runtime.tmp / "drawn.png"
    if where:
        args = (*args[: where[0] + 1], picture, *args[where[0] + 2 :])
    remote = runtime.vlmo(*args)
    drawn = picture.read_bytes() if where else b""
    picture.unlink(missing_ok=True)
    local = runtime.vlmo(*args, keep_alive="0")
    assert (remote.returncode, remote.stdout) == (local.returncode, local.stdout), (remote.stderr, local.stderr)
    if where:
        assert drawn == picture.read_bytes()
        picture.unlink()
    return remote


def test_commands_print_what_they_print_in_process(runtime: Runtime, tmp_path: Path) -> None:
    first = runtime.vlmo("ask", EXAMPLE, "what color is the circle?", "--model", SHAPES)
    assert first.returncode == 0 and first.stdout == "yellow\n", first.stderr
    assert "keeping vlmo/shapes loaded in the background for 5m" in first.stderr
    pid = runtime.pid()
    for args in (
        ("ask", EXAMPLE, "what color is the square?", "--stream"),
        ("caption", EXAMPLE, "--json"),
        ("detect", EXAMPLE, "circle ; square ; triangle", "--json", "--out", "x"),
    ):
        result = same(runtime, *args, "--model", SHAPES)
        assert result.returncode == 0 and result.stdout
        assert "keeping" not in result.stderr  # said once, by the command that started it
    assert runtime.pid() == pid and alive(pid)  # one resident process answered them all
    # Errors: the same one line and exit code, whether found here (an unreadable image) or in the resident process
    # (a model that is not there: the load failed over there).
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for args, code in ((("ask", broken, "what?"), 2), (("caption", EXAMPLE, "--model", tmp_path / "no-model"), 1)):
        remote, local = runtime.vlmo(*args), runtime.vlmo(*args, keep_alive="0")
        assert remote.returncode == local.returncode == code, (remote.stderr, local.stderr)
        assert remote.stderr.splitlines()[-1] == local.stderr.splitlines()[-1]
        assert remote.stderr.splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_more_commands_sampling_segment_and_errors_match_in_process(
    runtime: Runtime, taught_checkpoint: Path, filled_mask_decoder: Path, pictures: dict[str, Path]
) -> None:
    for args in (
        ("ask", EXAMPLE, EXAMPLE, "-q", "what shape is yellow?", "--json"),
        ("caption", EXAMPLE, "--detail", "long"),
        ("ocr", EXAMPLE),
        ("detect", EXAMPLE, "circle"),
    ):
        same(runtime, *args, "--model", SHAPES)
    model = ("--model", taught_checkpoint)
    red, blue = pictures["red"], pictures["blue"]
    same(runtime, "ask", red, blue, "-q", "what color is it?", "--sample", "--seed", "7", "--temperature", "2", *model)
    same(runtime, "caption", red, "--sample", "--seed", "3", "--top-k", "5", "--max-tokens", "6", "--json", *model)
    segment = ("segment", red, "cat", *model, "--mask-decoder", filled_mask_decoder)
    result = same(runtime, *segment, "--json", "--out", "x")
    assert json.loads(result.stdout)["segmentations"]
    same(runtime, *segment)
    for args, code in (
        (("ask", pictures["broken"], "what?", *model), 2),
        (("ask", red, "what?", "--model", "acme/not-cached"), 1),
        (("ask", red, " ".join(map(str, range(3000))), *model), 2),  # longer than the context
    ):
        remote, local = runtime.vlmo(*args), runtime.vlmo(*args, keep_alive="0")
        assert remote.returncode == local.returncode == code, (remote.stderr, local.stderr)
        assert remote.stderr.splitlines()[-1] == local.stderr.splitlines()[-1]


@pytest.mark.slow
def test_identity_staleness_and_replacement(runtime: Runtime, tiny_checkpoint: Path, pictures: dict[str, Path]) -> None:
    import shutil

    red = pictures["red"]
    ok = lambda r: r.returncode == 0 or pytest.fail(r.stderr)  # noqa: E731
    ok(runtime.vlmo("caption", red, "--model", SHAPES))
    shapes = runtime.pid()
    ckpt = runtime.tmp / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    ok(runtime.vlmo("caption", red, "--model", ckpt, "--max-tokens", "3"))
    tiny = runtime.pid()
    assert tiny != shapes and not alive(shapes)  # another model replaced it
    assert runtime.info()["identity"]["model"] == str(ckpt)
    ok(runtime.vlmo("caption", red, "--model", ckpt, "--max-tokens", "3", "--dtype", "float32"))
    float32 = runtime.pid()
    assert float32 != tiny and not alive(tiny)  # other load options: another identity
    ok(runtime.vlmo("caption", red, "--model", ckpt, "--max-tokens", "3", "--dtype", "float32"))
    assert runtime.pid() == float32  # the same command reuses it
    # New weights written over the checkpoint: the resident is stale, never used again.
    weights = next(ckpt.glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    ok(runtime.vlmo("caption", red, "--model", ckpt, "--max-tokens", "3", "--dtype", "float32"))
    assert runtime.pid() != float32 and not alive(float32)


@pytest.mark.slow
def test_a_killed_resident_is_replaced_and_a_stopped_one_costs_an_error(runtime: Runtime) -> None:
    ask = ("ask", EXAMPLE, "what color is the circle?", "--model", SHAPES)
    assert runtime.vlmo(*ask).stdout == "yellow\n"
    first = runtime.pid()
    os.kill(first, signal.SIGKILL)
    until(lambda: not alive(first), "the killed resident gone")
    again = runtime.vlmo(*ask)
    assert again.returncode == 0 and again.stdout == "yellow\n", again.stderr
    second = runtime.pid()
    assert second != first
    # A resident that accepts connections but never answers (stopped): a clear error, bounded in time.
    os.kill(second, signal.SIGSTOP)
    try:
        began = time.monotonic()
        wedged = runtime.vlmo(*ask, VLMO_SERVER_TIMEOUT="2")
        assert time.monotonic() - began < 30
        assert wedged.returncode == 1
        assert "not answering" in wedged.stderr and "vlmo stop" in wedged.stderr
        stopped = runtime.vlmo("stop", "--timeout", "2", VLMO_SERVER_TIMEOUT="1")
        assert stopped.returncode == 0 and f"pid {second}" in stopped.stdout, stopped.stderr
    finally:
        if alive(second):
            os.kill(second, signal.SIGCONT)
    until(lambda: not alive(second), "the stopped resident gone")
    assert not (runtime.folder / "resident.sock").exists()


def test_keep_alive_idle_exit_ps_stop_and_permissions(runtime: Runtime) -> None:
    runtime.folder.mkdir(mode=0o755)  # a folder of ours that is too open is tightened
    os.chmod(runtime.folder, 0o755)
    ask = ("ask", EXAMPLE, "what color is the circle?", "--model", SHAPES)
    assert runtime.vlmo(*ask, keep_alive="0").stdout == "yellow\n"
    assert runtime.info() is None and not residents_in(runtime.root)  # 0: nothing in the background
    assert runtime.vlmo(*ask).stdout == "yellow\n"
    pid = runtime.pid()
    assert stat.S_IMODE(runtime.folder.stat().st_mode) == 0o700
    sock = runtime.folder / "resident.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    listed = runtime.vlmo("ps", "--json")
    (row,) = json.loads(listed.stdout)["resident"]
    assert row["pid"] == pid and row["identity"]["model"] == SHAPES and row["state"] == "ready"
    assert row["rss_bytes"] > 0 and 0 < row["left_seconds"] <= 300 and row["log"].endswith("resident.log")
    table = runtime.vlmo("ps").stdout.splitlines()
    assert table[0].startswith("MODEL\t") and table[1].startswith(f"{SHAPES}\t")
    assert runtime.vlmo("stop", "google/paligemma-3b-mix-224").stdout == ""  # another model: left running
    stopped = runtime.vlmo("stop")
    assert stopped.stdout == f"stopped {SHAPES} (pid {pid})\n"
    until(lambda: not alive(pid), "stopped resident gone")
    assert not sock.exists() and runtime.info() is None
    assert "no resident model" in runtime.vlmo("ps").stderr
    # A short keep-alive: the process leaves on its own once idle that long, and takes its socket with it.
    assert runtime.vlmo(*ask, keep_alive="1s").stdout == "yellow\n"
    short = runtime.pid()
    until(lambda: not alive(short), "the idle resident gone")
    assert not sock.exists() and runtime.info() is None
    assert "idle for 1 s" in runtime.log()


def test_ctrl_c_frees_the_slot_and_two_shells_share_one_resident(
    runtime: Runtime, tiny_checkpoint: Path, pictures: dict[str, Path]
) -> None:
    model = ("--model", tiny_checkpoint, "--dtype", "float32", "--quantize", "none")
    short = ("caption", pictures["red"], *model, "--max-tokens", "2")
    assert runtime.vlmo(*short).returncode == 0
    pid = runtime.pid()

    def resident() -> dict:
        return json.loads(runtime.vlmo("ps", "--json").stdout)["resident"][0]

    long_run = [sys.executable, "-m", "vlmo", "caption", str(pictures["red"]), *map(str, model), "--max-tokens", "4000"]
    client = subprocess.Popen(long_run, env=runtime.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        until(lambda: resident()["running"] == 1, "the long request running")
        # A second shell meanwhile: answered by the same process, batched with the long one.
        other = runtime.vlmo(*short)
        assert other.returncode == 0 and runtime.pid() == pid
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=WAIT)
        assert client.returncode == 130 and b"interrupted" in err
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    until(lambda: resident()["running"] == 0, "the interrupted request's slot freed")
    assert runtime.pid() == pid


def test_server_url_and_api_key(runtime: Runtime, tmp_path: Path) -> None:
    from test_serve import KEY, start_server

    served = start_server(tmp_path)
    try:
        ask = ("ask", EXAMPLE, "what color is the circle?")
        remote = runtime.vlmo(*ask, "--server", served.url + "/v1", VLMO_API_KEY=KEY)
        local = runtime.vlmo(*ask, "--model", SHAPES, keep_alive="0")
        assert (remote.returncode, remote.stdout) == (0, local.stdout) == (0, "yellow\n"), remote.stderr
        detect = ("detect", EXAMPLE, "circle ; square", "--json")
        remote = runtime.vlmo(*detect, "--server", served.url, "--api-key", KEY)
        # The same boxes, and the model that answered: the server's.
        assert remote.stdout == runtime.vlmo(*detect, "--model", SHAPES, keep_alive="0").stdout
        wrong = runtime.vlmo(*ask, "--server", served.url, VLMO_API_KEY="wrong")
        assert wrong.returncode == 1 and "API key" in wrong.stderr and "--api-key" in wrong.stderr
        other = runtime.vlmo(*ask, "--server", served.url, "--model", "acme/other", VLMO_API_KEY=KEY)
        assert other.returncode == 2 and "'acme/other' is not served here" in other.stderr
        refused = runtime.vlmo(*ask, "--server", served.url, "--dtype", "float16", VLMO_API_KEY=KEY)
        assert refused.returncode == 2 and "--dtype cannot be used with --server" in refused.stderr
    finally:
        served.stop()
    gone = runtime.vlmo("ask", EXAMPLE, "what?", "--server", served.url, VLMO_SERVER_TIMEOUT="2")
    assert gone.returncode == 1 and f"cannot reach the model server {served.url}" in gone.stderr
    assert not residents_in(runtime.root)  # --server never starts a resident model


def test_where_no_resident_model_can_be_commands_load_in_process(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from vlmo.cli.remote import runtime as runtime_module

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (runtime.root / "vlmo").symlink_to(elsewhere)  # a runtime folder that is a link: never trusted
    result = runtime.vlmo("ask", EXAMPLE, "what color is the circle?", "--model", SHAPES)
    assert result.returncode == 0 and result.stdout == "yellow\n"
    assert "note: loading in-process" in result.stderr and "link" in result.stderr
    assert not residents_in(runtime.root) and not list(elsewhere.iterdir())
    monkeypatch.delattr(socket, "AF_UNIX")  # Windows: in-process, as always, and without a note
    with pytest.raises(runtime_module.NoUnixSockets):
        runtime_module.runtime_folder()
