"""`vlmo.weights.hub` against local directories and a fake hub on 127.0.0.1 (see fake_hub.py); no internet."""

from __future__ import annotations

import errno
import json
import random
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.file_download
import pytest
from huggingface_hub import constants

from fake_hub import FakeHub, isolate_hf
from vlmo.errors import CheckpointError
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
