"""`vlmo.weights.hub` against local directories and a fake hub on 127.0.0.1 (see fake_hub.py); no internet."""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.file_download
import pytest
from huggingface_hub import constants

from fake_hub import FakeHub, SilentServer, isolate_hf
from vlmo.errors import CheckpointError, VlmoError
from vlmo.weights.hub import (
    DiskFullError,
    DownloadError,
    GatedModelError,
    ModelNotFoundError,
    OfflineError,
    cache_location,
    cached_models,
    resolve_model,
)

NEEDED = ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"]
WEIGHT_BYTES = 200_000  # big enough that a cut half-way is a real partial file


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate_hf(monkeypatch, tmp_path / "hf")


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub waits 1 s before it resumes, and resumes from whole 10 MB chunks: shrink both."""
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)


def write_model(directory: Path, *, weights: str = "single", config: dict | None = None) -> Path:
    """A fake checkpoint: `weights` is "single", "sharded" or "bin"; decoys that must never be downloaded."""
    rng = random.Random(str(directory))
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "paligemma"}))
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "preprocessor_config.json").write_text('{"image_seq_length": 256}')
    (directory / "README.md").write_text("# tiny\n")
    (directory / "pytorch_model.bin").write_bytes(rng.randbytes(1000))
    (directory / "flax_model.msgpack").write_bytes(rng.randbytes(1000))
    if weights == "single":
        (directory / "model.safetensors").write_bytes(rng.randbytes(WEIGHT_BYTES))
    elif weights == "sharded":
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for shard in shards:
            (directory / shard).write_bytes(rng.randbytes(WEIGHT_BYTES // 2))
        index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1], "c": shards[1]}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "models" / "tiny")


@pytest.fixture
def hub(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo("acme/tiny", model_dir)
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=fake.url)
        yield fake


# Local directories.


def test_local_directory_is_returned_as_is(model_dir: Path) -> None:
    assert resolve_model(model_dir) == model_dir
    assert resolve_model(str(model_dir)) == model_dir


def test_local_directory_without_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_model(tmp_path / "empty")


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-vlmo-model", "models/a/b"])
def test_missing_path_is_an_error_without_network(hub: FakeHub, name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model(name)
    assert hub.requests == []


@pytest.mark.parametrize("name", ["paligemma", "acme/bad name", "acme/x--y", ""])
def test_malformed_hub_id_is_an_error_without_network(hub: FakeHub, name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="owner/name"):
        resolve_model(name)
    assert hub.requests == []


# Downloads.


def test_download_fetches_only_the_needed_files(hub: FakeHub, model_dir: Path, hf_cache: Path) -> None:
    path = resolve_model("acme/tiny")
    assert path.is_relative_to(hf_cache)
    assert sorted(p.name for p in path.iterdir()) == NEEDED
    for name in NEEDED:
        assert (path / name).read_bytes() == (model_dir / name).read_bytes()
    assert not [r for r in hub.requests if r.path.endswith((".bin", ".msgpack", ".md"))]
    assert all("authorization" not in r.headers for r in hub.requests)  # HF_TOKEN is cleared


def test_a_repos_own_mask_decoder_is_fetched_with_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint that carries its own `<seg>` decoder (mask_decoder.safetensors) gets it from the hub too, so
    `VLMo.mask_decoder()` finds it beside the weights."""
    mine = write_model(tmp_path / "models" / "segmenter")
    (mine / "mask_decoder.safetensors").write_bytes(b"decoder bytes")
    with FakeHub() as fake:
        fake.add_repo("acme/segmenter", mine)
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=fake.url)
        path = resolve_model("acme/segmenter")
    assert sorted(p.name for p in path.iterdir()) == sorted([*NEEDED, "mask_decoder.safetensors"])
    assert (path / "mask_decoder.safetensors").read_bytes() == b"decoder bytes"


def test_token_is_sent_to_the_hub(hub: FakeHub) -> None:
    resolve_model("acme/tiny", token="hf_test")
    api = hub.seen("GET", "/api/models/acme/tiny")
    head = hub.seen("HEAD", "/resolve/")
    assert api and head
    assert {r.headers.get("authorization") for r in api + head} == {"Bearer hf_test"}


def test_cached_model_resolves_with_no_network(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve_model("acme/tiny")
    hub.stop()
    assert resolve_model("acme/tiny") == first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("acme/tiny") == first


def test_offline_and_not_cached_is_an_offline_error(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match=r"vlmo download acme/tiny.*HF_HUB_OFFLINE"):
        resolve_model("acme/tiny")
    assert hub.requests == []


def test_unreachable_hub_is_a_download_error(hub: FakeHub) -> None:
    hub.stop()
    with pytest.raises(DownloadError, match="could not reach"):
        resolve_model("acme/tiny")


@pytest.mark.parametrize(("status", "code"), [(401, "GatedRepo"), (403, "GatedRepo"), (403, None)])
def test_gated_repo(hub: FakeHub, status: int, code: str | None) -> None:
    hub.gate("acme/tiny", status, code)
    with pytest.raises(GatedModelError, match="hf auth login") as caught:
        resolve_model("acme/tiny")
    message = str(caught.value)
    assert f"{hub.url}/acme/tiny" in message and "licence" in message and "\n" not in message


def test_missing_repo(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFoundError, match=r"acme/nope was not found.*HF_TOKEN"):
        resolve_model("acme/nope")


def test_missing_revision(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFoundError, match="has no revision 'v9'"):
        resolve_model("acme/tiny", revision="v9")


def test_revision_is_passed_through(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.add_repo("acme/tiny", write_model(tmp_path / "v2", config={"model_type": "v2"}), revision="v2")
    v2 = resolve_model("acme/tiny", revision="v2")
    assert json.loads((v2 / "config.json").read_text()) == {"model_type": "v2"}
    assert v2.name == commit
    assert hub.seen("GET", "/api/models/acme/tiny/revision/v2")
    assert hub.seen("HEAD", "/acme/tiny/resolve/v2/config.json")
    main = resolve_model("acme/tiny")
    assert main != v2
    hub.stop()  # both revisions are now cached side by side
    assert resolve_model("acme/tiny", revision="v2") == v2
    assert resolve_model("acme/tiny", revision=commit) == v2
    assert resolve_model("acme/tiny") == main


def test_sharded_checkpoint(hub: FakeHub, tmp_path: Path) -> None:
    source = write_model(tmp_path / "sharded", weights="sharded")
    hub.add_repo("acme/sharded", source)
    path = resolve_model("acme/sharded")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names = sorted(p.name for p in path.iterdir())
    expected = {*NEEDED, "model.safetensors.index.json", *shards} - {"model.safetensors"}
    assert names == sorted(expected)
    for shard in shards:
        assert (path / shard).read_bytes() == (source / shard).read_bytes()


def test_repo_with_only_pickle_weights(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("acme/pickled", write_model(tmp_path / "pickled", weights="bin"))
    with pytest.raises(CheckpointError, match=r"no safetensors weights \(it has .*pytorch_model.bin"):
        resolve_model("acme/pickled")
    assert not hub.seen(contains="/resolve/")  # refused before downloading anything


@pytest.mark.usefixtures("fast_retries")
def test_cut_download_resumes_with_a_range_request(hub: FakeHub, model_dir: Path) -> None:
    hub.cut("model.safetensors")
    path = resolve_model("acme/tiny")
    first, second = hub.seen("GET", "/cdn/")
    assert "range" not in first.headers
    # huggingface_hub resumes from the last whole chunk it received before the cut.
    offset = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= WEIGHT_BYTES // 2
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


@pytest.mark.usefixtures("fast_retries")
def test_dropped_download_is_a_download_error_and_rerun_completes(hub: FakeHub, model_dir: Path) -> None:
    hub.cut("model.safetensors", times=100)  # half the file, then nothing more on every retry
    with pytest.raises(DownloadError, match="run the same command again"):
        resolve_model("acme/tiny")
    config_gets = len(hub.seen("GET", "config.json"))
    hub.cut("model.safetensors", times=0)
    path = resolve_model("acme/tiny")
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert len(hub.seen("GET", "config.json")) == config_gets  # finished files are kept


def test_disk_full(hub: FakeHub, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", no_space)
    with pytest.raises(DiskFullError, match="HF_HUB_CACHE") as caught:
        resolve_model("acme/tiny")
    assert str(hf_cache) in str(caught.value)


def test_progress_bars_only_when_asked_or_on_a_terminal(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resolve_model("acme/tiny")  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
    resolve_model("acme/tiny", progress=True, cache_dir=tmp_path / "other-cache")
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "200.0 kB" in err


def test_cache_listing(hub: FakeHub, hf_cache: Path) -> None:
    assert cache_location() == hf_cache
    assert cached_models() == []
    resolve_model("acme/tiny")
    [(repo_id, size)] = cached_models()
    assert repo_id == "acme/tiny" and size > WEIGHT_BYTES


# Timeouts, and one line per failure.


def within(seconds: float, call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """(result, exception) of `call`, which must finish within `seconds`: run in a thread, so a hang fails the
    test instead of blocking it."""
    outcome: list[tuple[Any, BaseException | None]] = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append((None, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting for the hub after {seconds} s"
    return outcome[0]


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's own variables, set after it was imported: vlmo must read them at call time."""
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.3")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "0.3")


@pytest.fixture
def silent_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    with SilentServer() as silent:
        isolate_hf(monkeypatch, tmp_path / "hf", endpoint=silent.url)
        yield silent


@pytest.fixture
def hf_records() -> Iterator[list[logging.LogRecord]]:
    """Every record huggingface_hub's loggers pass on, as its own stderr handler would receive them."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    library = logging.getLogger("huggingface_hub")
    library.addHandler(handler)
    yield records
    library.removeHandler(handler)


def test_timeouts_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmo.weights.hub import hub_timeouts

    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    default = hub_timeouts()
    assert 0 < default.metadata <= 10 and 10 <= default.download <= 30
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2.5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "40")
    assert (hub_timeouts().metadata, hub_timeouts().download) == (2.5, 40)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(VlmoError, match="HF_HUB_DOWNLOAD_TIMEOUT='soon'") as caught:
        hub_timeouts()
    assert "\n" not in str(caught.value)


def _fetch_adapter() -> Path:
    from vlmo.weights.adapters import resolve_adapter

    return resolve_adapter("acme/lora")


def _fetch_mask_decoder() -> Path:
    from vlmo.weights.vqvae import _download_vae

    return _download_vae()


@pytest.mark.usefixtures("short_timeouts", "fast_retries")
@pytest.mark.parametrize("fetch", [lambda: resolve_model("acme/tiny"), _fetch_adapter, _fetch_mask_decoder])
def test_a_hub_that_never_answers_is_unreachable_after_the_timeout(
    silent_hub: SilentServer, fetch: Callable[[], Path], hf_records: list[logging.LogRecord]
) -> None:
    _, error = within(8, fetch)
    assert isinstance(error, DownloadError), repr(error)
    message = str(error)
    assert message.startswith(f"could not reach {silent_hub.url} for ") and "\n" not in message
    assert silent_hub.connections >= 1  # it did ask
    assert [r.getMessage() for r in hf_records if r.levelno >= logging.WARNING] == []


@pytest.mark.usefixtures("short_timeouts", "fast_retries")
def test_a_stalled_download_times_out_and_resumes_quietly(
    hub: FakeHub,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    hf_records: list[logging.LogRecord],
    recwarn: pytest.WarningsRecorder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A nearly full disk makes huggingface_hub warn ("Not enough free disk space"); a stalled connection makes it
    # log "Trying to resume download..." before each retry. Neither may reach the user; vlmo's bar still does.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    hub.stall("model.safetensors", times=2)
    path, error = within(8, lambda: resolve_model("acme/tiny", progress=True))
    assert error is None, error
    assert (path / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert len(hub.seen("GET", "/cdn/")) == 3  # two stalls, then the rest of the file
    assert [str(w.message) for w in recwarn] == []
    assert [r.getMessage() for r in hf_records if r.levelno >= logging.WARNING] == []
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Trying to resume" not in err and "disk space" not in err


@pytest.mark.usefixtures("short_timeouts", "fast_retries")
def test_a_download_that_stays_silent_is_one_error(hub: FakeHub, hf_records: list[logging.LogRecord]) -> None:
    hub.stall("model.safetensors", times=100)
    _, error = within(8, lambda: resolve_model("acme/tiny"))
    assert isinstance(error, DownloadError), repr(error)
    assert str(error).startswith(f"could not reach {hub.url} for acme/tiny") and "\n" not in str(error)
    assert [r.getMessage() for r in hf_records if r.levelno >= logging.WARNING] == []


def test_unreachable_and_offline_messages_name_the_built_in_model(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.stop()
    with pytest.raises(DownloadError, match="could not reach .*built-in model vlmo/shapes works offline"):
        resolve_model("acme/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE.*built-in model vlmo/shapes works offline"):
        resolve_model("acme/tiny")


@pytest.mark.parametrize(
    "shard", ["../x.safetensors", "/tmp/x.safetensors", "a/../../x.safetensors", "a\\x.safetensors"]
)
def test_hub_shard_outside_the_snapshot_is_refused_before_downloading_it(
    hub: FakeHub, tmp_path: Path, shard: str
) -> None:
    source = write_model(tmp_path / "evil", weights="sharded")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = shard
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add_repo("acme/evil", source)
    with pytest.raises(CheckpointError, match="not a plain file name") as caught:
        resolve_model("acme/evil")
    assert "\n" not in str(caught.value)
    assert not [r for r in hub.requests if r.path.endswith(".safetensors")]  # no shard was fetched
