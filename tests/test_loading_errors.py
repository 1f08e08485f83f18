"""Loading checkpoints that are broken, incomplete or do not match their config: each is one clear, one-line error.

Every test copies the session's tiny checkpoint (written by transformers' `save_pretrained`) into `tmp_path` and
breaks the copy; the fixture directories stay untouched.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmo.errors import CheckpointError, ConfigError
from vlmo.weights.files import INDEX_FILE, SINGLE_FILE, check_shard_name
from vlmo.weights.loader import load_model, weight_files
from vlmo.weights.safetensors_io import open_tensors, read_header

# --- helpers ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny checkpoint (vision_use_head: true, so it carries `vision_tower.head.*`)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's parameters as loaded from the untouched single file."""
    return {k: v.clone() for k, v in load_model(tiny_checkpoint).state_dict().items()}


def rewrite_weights(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(model_dir / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, model_dir / SINGLE_FILE, metadata={"format": "pt"})


def edit_config(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    edit(cfg)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def load_error(model_dir: Path, error: type[Exception] = CheckpointError) -> str:
    """Load `model_dir`, expecting `error`; return its message after checking it is one line."""
    with pytest.raises(error) as info:
        load_model(model_dir)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


def assert_same_params(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, want in reference.items():
        assert torch.equal(state[name], want), name


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


# --- the directory and config.json -----------------------------------------------------------------------------------


def test_directory_does_not_exist(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "nope")
    assert "no such checkpoint directory" in msg and "nope" in msg


def test_path_is_a_file(ckpt: Path) -> None:
    assert "no such checkpoint directory" in load_error(ckpt / "config.json")


def test_directory_without_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    msg = load_error(ckpt)
    assert "config.json" in msg and "checkpoint directory" in msg


def test_config_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"model_type": "paligemma",')
    msg = load_error(ckpt)
    assert "config.json" in msg and "not valid JSON" in msg


def test_config_not_utf8(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert "not valid JSON" in load_error(ckpt)


def test_config_not_an_object(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("[1, 2, 3]")
    assert "not a JSON object" in load_error(ckpt)


def test_unknown_model_type(ckpt: Path) -> None:
    edit_config(ckpt, lambda c: c.update(model_type="llava"))
    msg = load_error(ckpt, ConfigError)
    assert "model_type" in msg and "llava" in msg


def test_config_hidden_size_without_projection_dim(ckpt: Path) -> None:
    edit_config(ckpt, lambda c: c["text_config"].update(hidden_size=48))
    assert "projection_dim" in load_error(ckpt, ConfigError)


# --- which weight files ----------------------------------------------------------------------------------------------


def test_weight_files_single(tiny_checkpoint: Path) -> None:
    assert weight_files(tiny_checkpoint) == [tiny_checkpoint / SINGLE_FILE]


def test_no_weights_file(ckpt: Path) -> None:
    (ckpt / SINGLE_FILE).unlink()
    msg = load_error(ckpt)
    assert SINGLE_FILE in msg and INDEX_FILE in msg


def test_only_pickle_weights(ckpt: Path) -> None:
    (ckpt / SINGLE_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not opened anyway")
    msg = load_error(ckpt)
    assert "safetensors only" in msg and "pickle" in msg


def test_pickle_file_next_to_safetensors_is_ignored(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    (ckpt / "pytorch_model.bin").write_bytes(b"not opened anyway")
    assert_same_params(load_model(ckpt), reference)


def test_nothing_is_unpickled(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_model(ckpt)
    (ckpt / SINGLE_FILE).unlink()
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    assert "safetensors only" in load_error(ckpt)


# --- damaged safetensors files ---------------------------------------------------------------------------------------


def _cut_points(path: Path) -> dict[str, int]:
    n, size = header_length(path), path.stat().st_size
    return {
        "empty": 0,
        "in-length": 5,
        "after-length": 8,
        "in-header": 8 + n // 2,
        "after-header": 8 + n,
        "in-data": 8 + n + (size - 8 - n) // 2,
        "last-byte": size - 1,
    }


@pytest.mark.parametrize(
    ("where", "word"),
    [
        ("empty", "not a safetensors file"),
        ("in-length", "not a safetensors file"),
        ("after-length", "truncated header"),
        ("in-header", "truncated header"),
        # the header is intact from here on: the tensor data is short
        ("after-header", "is truncated"),
        ("in-data", "is truncated"),
        ("last-byte", "is truncated"),
    ],
)
def test_truncated_file(ckpt: Path, where: str, word: str) -> None:
    path = ckpt / SINGLE_FILE
    cut = _cut_points(path)[where]
    path.write_bytes(path.read_bytes()[:cut])
    msg = load_error(ckpt)
    assert str(path) in msg and word in msg


def _patch_header(path: Path, header: bytes) -> None:
    """Replace the JSON header with `header`, padded with spaces to the original length."""
    data = path.read_bytes()
    n = header_length(path)
    assert len(header) <= n
    path.write_bytes(data[:8] + header.ljust(n, b" ") + data[8 + n :])


@pytest.mark.parametrize(
    "header",
    [b'{"a": {"dtype": "F32",', b"\xff\xfe not utf-8", b"[1, 2, 3]"],
    ids=["broken-json", "not-utf8", "not-an-object"],
)
def test_corrupt_header(ckpt: Path, header: bytes) -> None:
    _patch_header(ckpt / SINGLE_FILE, header)
    msg = load_error(ckpt)
    assert "header" in msg and SINGLE_FILE in msg


def test_absurd_header_length(ckpt: Path) -> None:
    path = ckpt / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    assert "header" in load_error(ckpt)


def _retable(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the header's tensor table and write it back (with its new length) in front of the same data."""
    data = path.read_bytes()
    n = header_length(path)
    table = json.loads(data[8 : 8 + n])
    edit(table)
    header = json.dumps(table).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])


def test_header_with_unknown_dtype(ckpt: Path) -> None:
    key = "language_model.model.norm.weight"
    _retable(ckpt / SINGLE_FILE, lambda t: t[key].update(dtype="F8_E4M3"))
    msg = load_error(ckpt)
    assert key in msg


def test_header_offsets_disagree_with_shape(ckpt: Path) -> None:
    key = "language_model.model.norm.weight"
    _retable(ckpt / SINGLE_FILE, lambda t: t[key].update(shape=[63]))
    msg = load_error(ckpt)
    assert key in msg and "bytes" in msg


def test_header_offsets_past_end(ckpt: Path) -> None:
    path = ckpt / SINGLE_FILE
    key = "language_model.model.norm.weight"
    past = path.stat().st_size  # data offsets are relative to the data section, so this is beyond the file

    def move(t: dict[str, Any]) -> None:
        begin, end = t[key]["data_offsets"]
        t[key]["data_offsets"] = [past, past + end - begin]

    _retable(path, move)
    msg = load_error(ckpt)
    assert "truncated" in msg and key in msg


def test_header_offsets_before_the_data(ckpt: Path) -> None:
    key = "language_model.model.norm.weight"

    def move(t: dict[str, Any]) -> None:
        begin, end = t[key]["data_offsets"]
        t[key]["data_offsets"] = [-16, -16 + end - begin]

    _retable(ckpt / SINGLE_FILE, move)
    assert key in load_error(ckpt)


# --- tensors that do not match the config ----------------------------------------------------------------------------


def test_wrong_shape_text_tensor(ckpt: Path) -> None:
    key = "language_model.model.layers.0.mlp.gate_proj.weight"
    rewrite_weights(ckpt, lambda sd: sd.update({key: sd[key][:95].clone()}))
    msg = load_error(ckpt)
    assert key in msg and "(95, 64)" in msg and "(96, 64)" in msg


def test_wrong_shape_is_reshaped_not_resized(ckpt: Path) -> None:
    key = "language_model.model.layers.1.self_attn.o_proj.weight"  # (64, 64) → (32, 128): same numel
    rewrite_weights(ckpt, lambda sd: sd.update({key: sd[key].reshape(32, 128).clone()}))
    msg = load_error(ckpt)
    assert key in msg and "(32, 128)" in msg and "(64, 64)" in msg


def test_wrong_shape_vision_tensor_names_its_layer(ckpt: Path) -> None:
    key = "vision_tower.encoder.layers.0.mlp.fc1.weight"  # 5.24 layout: no `vision_model.` segment
    rewrite_weights(ckpt, lambda sd: sd.update({key: sd[key][:47].clone()}))
    msg = load_error(ckpt)
    assert "encoder.layers.0.mlp.fc1.weight" in msg and "(47, 32)" in msg and "(48, 32)" in msg


def test_wrong_shape_names_the_key_as_stored(ckpt: Path) -> None:
    key = "vision_tower.encoder.layers.0.mlp.fc1.weight"
    rewrite_weights(ckpt, lambda sd: sd.update({key: sd[key][:47].clone()}))
    assert repr(key) in load_error(ckpt)


def test_missing_tensor(ckpt: Path) -> None:
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    rewrite_weights(ckpt, lambda sd: sd.pop(key))
    msg = load_error(ckpt)
    assert key in msg and "lacks 1 tensor" in msg


def test_missing_vision_tensor(ckpt: Path) -> None:
    rewrite_weights(ckpt, lambda sd: sd.pop("vision_tower.post_layernorm.bias"))
    assert "post_layernorm.bias" in load_error(ckpt)


def test_many_missing_tensors_are_summarised(ckpt: Path) -> None:
    rewrite_weights(ckpt, lambda sd: [sd.pop(k) for k in list(sd) if ".layers.1." in k])
    msg = load_error(ckpt)
    assert "language_model.model.layers.1" in msg or "encoder.layers.1" in msg
    assert "more)" in msg


@pytest.mark.parametrize(
    "key",
    ["foo.bar", "language_model.model.layers.0.self_attn.rotary_emb.inv_freq", "multi_modal_projector.linear2.weight"],
)
def test_unexpected_tensor(ckpt: Path, key: str) -> None:
    rewrite_weights(ckpt, lambda sd: sd.update({key: torch.zeros(4)}))
    msg = load_error(ckpt)
    assert key in msg and "not part of PaliGemma" in msg


def test_gemma2_norms_in_a_gemma1_checkpoint_are_unexpected(ckpt: Path) -> None:
    key = "language_model.model.layers.0.pre_feedforward_layernorm.weight"
    rewrite_weights(ckpt, lambda sd: sd.update({key: torch.zeros(64)}))
    assert key in load_error(ckpt)


def test_two_layouts_of_one_tensor(ckpt: Path) -> None:
    rewrite_weights(ckpt, lambda sd: sd.update({"vision_tower.vision_model.post_layernorm.weight": torch.zeros(32)}))
    msg = load_error(ckpt)
    assert "post_layernorm.weight" in msg and "two checkpoint tensors" in msg


@pytest.mark.parametrize("tower", ["text_config", "vision_config"])
def test_checkpoint_with_more_layers_than_config(ckpt: Path, tower: str) -> None:
    edit_config(ckpt, lambda c: c[tower].update(num_hidden_layers=1))
    assert "layers.1." in load_error(ckpt)


def test_config_with_other_hidden_size(ckpt: Path) -> None:
    def shrink(c: dict[str, Any]) -> None:
        c["text_config"]["hidden_size"] = 48
        c["projection_dim"] = 48
        c["vision_config"]["projection_dim"] = 48

    edit_config(ckpt, shrink)
    msg = load_error(ckpt)
    assert "shape" in msg and "(64, 32)" in msg and "(48, 32)" in msg


def test_config_with_more_layers_than_checkpoint(ckpt: Path) -> None:
    edit_config(ckpt, lambda c: c["text_config"].update(num_hidden_layers=3))
    msg = load_error(ckpt)
    assert "language_model.model.layers.2" in msg and "config" in msg


# --- lm_head ---------------------------------------------------------------------------------------------------------


def test_identical_lm_head_is_tied(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    embed = "language_model.model.embed_tokens.weight"
    rewrite_weights(ckpt, lambda sd: sd.update({"language_model.lm_head.weight": sd[embed].clone()}))
    model = load_model(ckpt)
    assert_same_params(model, reference)


def test_different_lm_head_is_kept(ckpt: Path) -> None:
    embed = "language_model.model.embed_tokens.weight"
    head = torch.randn(load_file(ckpt / SINGLE_FILE)[embed].shape)
    rewrite_weights(ckpt, lambda sd: sd.update({"lm_head.weight": head}))
    state = load_model(ckpt).state_dict()
    heads = [v for k, v in state.items() if "lm_head" in k]
    assert len(heads) == 1 and torch.equal(heads[0], head)


def test_untied_config_without_lm_head(ckpt: Path) -> None:
    def untie(c: dict[str, Any]) -> None:
        c["tie_word_embeddings"] = False
        c["text_config"]["tie_word_embeddings"] = False

    edit_config(ckpt, untie)
    assert "lm_head.weight" in load_error(ckpt)


# --- sharded checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_sharded(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model re-saved by transformers in several small shards with a `model.safetensors.index.json`."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("sharded")
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="200KB")
    return out


def test_transformers_sharded_checkpoint(hf_sharded: Path, reference: dict[str, torch.Tensor]) -> None:
    files = weight_files(hf_sharded)
    assert len(files) > 1 and not (hf_sharded / SINGLE_FILE).exists()
    assert files == sorted(files)
    assert_same_params(load_model(hf_sharded), reference)


def split_in_two(model_dir: Path) -> tuple[str, str]:
    """Split model.safetensors into two shards plus an index, as transformers lays them out."""
    tensors = load_file(model_dir / SINGLE_FILE)
    (model_dir / SINGLE_FILE).unlink()
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    keys = sorted(tensors)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    weight_map = {}
    for name, part in zip(names, halves, strict=True):
        save_file({k: tensors[k] for k in part}, model_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / INDEX_FILE).write_text(json.dumps(index))
    return names


def test_hand_split_checkpoint(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    names = split_in_two(ckpt)
    assert weight_files(ckpt) == [ckpt / n for n in names]
    assert_same_params(load_model(ckpt), reference)


def test_index_lists_a_missing_shard(ckpt: Path) -> None:
    _, second = split_in_two(ckpt)
    (ckpt / second).unlink()
    msg = load_error(ckpt)
    assert second in msg and INDEX_FILE in msg


def test_index_without_weight_map(ckpt: Path) -> None:
    split_in_two(ckpt)
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in load_error(ckpt)


def test_index_not_json(ckpt: Path) -> None:
    split_in_two(ckpt)
    (ckpt / INDEX_FILE).write_text("{")
    msg = load_error(ckpt)
    assert INDEX_FILE in msg and "not valid JSON" in msg


def test_truncated_shard(ckpt: Path) -> None:
    first, _ = split_in_two(ckpt)
    data = (ckpt / first).read_bytes()
    (ckpt / first).write_bytes(data[:-4])
    msg = load_error(ckpt)
    assert first in msg and "truncated" in msg


def test_tensor_missing_from_all_shards(ckpt: Path) -> None:
    _, second = split_in_two(ckpt)
    tensors = load_file(ckpt / second)
    key = "vision_tower.post_layernorm.weight"  # keys are split in sorted order: the vision tower is in shard 2
    del tensors[key]
    save_file(tensors, ckpt / second, metadata={"format": "pt"})
    assert "post_layernorm.weight" in load_error(ckpt)


# --- SigLIP's unused pooling head ------------------------------------------------------------------------------------


def test_head_tensors_are_skipped_when_declared(tiny_checkpoint: Path) -> None:
    assert any(k.startswith("vision_tower.head.") for k in open_tensors(tiny_checkpoint / SINGLE_FILE))
    model = load_model(tiny_checkpoint)
    assert not [n for n in model.state_dict() if "head" in n and "lm_head" not in n]


def test_head_tensors_are_unexpected_when_not_declared(ckpt: Path) -> None:
    edit_config(ckpt, lambda c: c["vision_config"].update(vision_use_head=False))
    msg = load_error(ckpt)
    assert "vision_tower.head." in msg and "not part of PaliGemma" in msg


def test_declared_head_may_be_absent(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    rewrite_weights(ckpt, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("vision_tower.head.")])
    assert_same_params(load_model(ckpt), reference)


# --- dtypes and zero-copy --------------------------------------------------------------------------------------------


def test_load_as_bfloat16(tiny_checkpoint: Path, reference: dict[str, torch.Tensor]) -> None:
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params and {p.dtype for p in params.values()} == {torch.bfloat16}
    for name, p in params.items():
        assert torch.equal(p, reference[name].to(torch.bfloat16)), name


def test_bfloat16_file_loads_as_float32(ckpt: Path) -> None:
    rewrite_weights(ckpt, lambda sd: sd.update({k: v.to(torch.bfloat16) for k, v in sd.items()}))
    stored = load_file(ckpt / SINGLE_FILE)
    model = load_model(ckpt, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    p = dict(model.named_parameters())["text.embed.weight"]
    assert torch.equal(p, stored["language_model.model.embed_tokens.weight"].float())


def test_load_accepts_str_path(tiny_checkpoint: Path) -> None:
    model = load_model(str(tiny_checkpoint))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process maps `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and Path(parts[5]) == path.resolve():
            begin, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((begin, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_float32_load_is_zero_copy(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / SINGLE_FILE
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    ranges = _file_mappings(path)
    assert ranges, "model.safetensors is not memory-mapped"

    def mapped(p: torch.Tensor) -> bool:
        return any(begin <= p.data_ptr() < end for begin, end in ranges)

    assert all(mapped(p) for p in model.parameters())
    cast = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert not any(mapped(p) for p in cast.parameters())


def test_mapped_tensors_do_not_write_through(ckpt: Path) -> None:
    """The map is copy-on-write: changing a loaded parameter never changes the file."""
    path = ckpt / SINGLE_FILE
    before = path.read_bytes()
    model = load_model(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    del model
    assert path.read_bytes() == before


def test_read_header_skips_metadata(tiny_checkpoint: Path) -> None:
    header = read_header(tiny_checkpoint / SINGLE_FILE)
    assert "__metadata__" not in header
    assert header.keys() == load_file(tiny_checkpoint / SINGLE_FILE).keys()


# --- tensor byte ranges: what the safetensors format requires (and the reference reader enforces) ---------------------


def _raw_safetensors(path: Path, table: dict[str, tuple[str, list[int], int, int]], data_len: int) -> Path:
    """A safetensors file written by hand: `table` is name → (dtype, shape, begin, end); the data is zeros."""
    header = {name: {"dtype": d, "shape": s, "data_offsets": [b, e]} for name, (d, s, b, e) in table.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_len))
    return path


BAD_RANGES: dict[str, tuple[dict[str, tuple[str, list[int], int, int]], int, str, str]] = {
    # name: (table, data bytes, the tensor the error names, a word of the error)
    "overlap": ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 4, 12)}, 12, "b", "overlaps"),
    "same-bytes": ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 0, 8)}, 8, "b", "overlaps"),
    "inside-another": ({"a": ("F32", [4], 0, 16), "b": ("F32", [1], 4, 8)}, 16, "b", "overlaps"),
    "gap": ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 12, 20)}, 20, "b", "gap"),
    "gap-at-start": ({"a": ("F32", [2], 4, 12)}, 12, "a", "gap"),
    "trailing-bytes": ({"a": ("F32", [2], 0, 8)}, 12, "a", "after"),
    "length-vs-shape": ({"a": ("F32", [3], 0, 8)}, 8, "a", "bytes"),
    "past-the-end": ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 8, 16)}, 12, "b", "truncated"),
}


@pytest.mark.parametrize("case", BAD_RANGES)
def test_bad_tensor_ranges_are_refused_like_the_reference_reader(tmp_path: Path, case: str) -> None:
    table, data_len, culprit, word = BAD_RANGES[case]
    path = _raw_safetensors(tmp_path / "x.safetensors", table, data_len)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the reference reader's own error types vary by version
        load_file(path)
    with pytest.raises(CheckpointError) as info:
        open_tensors(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and repr(culprit) in msg and word in msg, msg


def test_trailing_bytes_after_an_empty_table(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "x.safetensors", {}, 4)
    with pytest.raises(Exception):  # noqa: B017, PT011
        load_file(path)
    with pytest.raises(CheckpointError, match="after"):
        open_tensors(path)


@pytest.mark.parametrize(
    "table",
    [
        {"b": ("F32", [2], 8, 16), "a": ("F32", [2], 0, 8)},  # header order is not data order
        {"a": ("F32", [2], 0, 8), "empty": ("F32", [0, 3], 8, 8), "b": ("I8", [8], 8, 16)},  # zero-size tensor
    ],
    ids=["unsorted-header", "zero-size"],
)
def test_good_tensor_ranges_are_accepted(tmp_path: Path, table: dict[str, tuple[str, list[int], int, int]]) -> None:
    path = _raw_safetensors(tmp_path / "x.safetensors", table, 16)
    want = load_file(path)
    got = open_tensors(path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_empty_file_table_is_accepted(tmp_path: Path) -> None:
    assert open_tensors(_raw_safetensors(tmp_path / "x.safetensors", {}, 0)) == {}


def test_two_checkpoint_tensors_on_the_same_bytes(ckpt: Path) -> None:
    """The issue's case: a header that puts one tensor on another's bytes used to load and answer."""
    key, other = "language_model.model.norm.weight", "language_model.model.layers.0.input_layernorm.weight"
    _retable(ckpt / SINGLE_FILE, lambda t: t[key].update(data_offsets=t[other]["data_offsets"]))
    with pytest.raises(Exception):  # noqa: B017, PT011
        load_file(ckpt / SINGLE_FILE)
    msg = load_error(ckpt)
    assert "overlaps" in msg and str(ckpt / SINGLE_FILE) in msg and (key in msg or other in msg)


# --- shard names in the index: inside the checkpoint directory only --------------------------------------------------


def _point_index_at(model_dir: Path, shard: str, new_name: str) -> None:
    index = json.loads((model_dir / INDEX_FILE).read_text())
    index["weight_map"] = {k: (new_name if v == shard else v) for k, v in index["weight_map"].items()}
    (model_dir / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "grandparent", "absolute", "dotdot-inside", "backslash"])
def test_index_pointing_outside_the_directory_is_refused(ckpt: Path, where: str) -> None:
    _, second = split_in_two(ckpt)
    outside = ckpt.parent / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.copy(ckpt / second, outside)  # a perfectly good shard, just not this checkpoint's business
    name = {
        "parent": "../elsewhere/x.safetensors",
        "grandparent": f"../../{ckpt.parent.name}/elsewhere/x.safetensors",
        "absolute": str(outside),
        "dotdot-inside": "sub/../../elsewhere/x.safetensors",
        "backslash": "..\\elsewhere\\x.safetensors",
    }[where]
    _point_index_at(ckpt, second, name)
    msg = load_error(ckpt)
    assert INDEX_FILE in msg and repr(name) in msg and "inside" in msg


@pytest.mark.parametrize("name", [7, None, "", ".", "x.bin", "./", "a//b.safetensors", "nul\0.safetensors"])
def test_index_with_a_malformed_shard_name(ckpt: Path, name: Any) -> None:
    _, second = split_in_two(ckpt)
    _point_index_at(ckpt, second, name)
    msg = load_error(ckpt)
    assert INDEX_FILE in msg and "shard" in msg


def test_shard_symlinked_into_a_blobs_folder_is_normal(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    """Hub snapshots hold symlinks to ../../blobs/<hash>: the *name* is checked, not where the link leads."""
    names = split_in_two(ckpt)
    blobs = ckpt.parent / "blobs"
    blobs.mkdir()
    for i, name in enumerate(names):
        (ckpt / name).rename(blobs / f"blob{i}")
        (ckpt / name).symlink_to(Path("..") / "blobs" / f"blob{i}")
    assert_same_params(load_model(ckpt), reference)


def test_shard_in_a_subfolder_is_allowed(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    _, second = split_in_two(ckpt)
    (ckpt / "weights").mkdir()
    (ckpt / second).rename(ckpt / "weights" / second)
    _point_index_at(ckpt, second, f"weights/{second}")
    assert_same_params(load_model(ckpt), reference)


def test_check_shard_name() -> None:
    assert check_shard_name("model-00001-of-00002.safetensors") == "model-00001-of-00002.safetensors"
    for bad in ("../x.safetensors", "/abs/x.safetensors", "C:/x.safetensors", "a/../../x.safetensors", "x.json"):
        with pytest.raises(CheckpointError, match="shard"):
            check_shard_name(bad)


# --- a config.json with impossible sizes: refused before the model is built (so torch has nothing to warn about) -----


@pytest.mark.parametrize(
    ("tower", "key", "value"),
    [
        ("vision_config", "patch_size", 0),
        ("vision_config", "num_attention_heads", 0),
        ("vision_config", "hidden_size", -32),
        ("text_config", "num_attention_heads", 0),
        ("text_config", "num_key_value_heads", 0),
        ("text_config", "head_dim", 0),
        ("text_config", "max_position_embeddings", -1),
    ],
)
def test_impossible_sizes_are_one_config_error_and_no_torch_warning(
    ckpt: Path, tower: str, key: str, value: int
) -> None:
    edit_config(ckpt, lambda c: c[tower].update({key: value}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (torch's "zero heads", "zero-element tensors") fails the test
        msg = load_error(ckpt, ConfigError)
    assert f"{tower}.{key}" in msg and str(value) in msg


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},  # negative dimensions whose product fits
        {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
        {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]},
    ],
    ids=["negative-dims", "string-offsets", "float-dim", "three-offsets", "shape-not-a-list"],
)
def test_malformed_tensor_entry(tmp_path: Path, entry: dict[str, Any]) -> None:
    raw = json.dumps({"a": entry}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(CheckpointError, match="'a' has an invalid entry"):
        open_tensors(path)


def test_every_safetensors_read_in_src_goes_through_the_validated_reader() -> None:
    """Weights, shards, adapters, the VQ-VAE cache, fine-tuning's trainable.safetensors, the demo: all are read by
    `safetensors_io.open_tensors`, never by the safetensors package's own readers (which skip vlmo's checks)."""
    src = Path(__file__).parent.parent / "src" / "vlmo"
    readers = ("load_file", "safe_open", "safetensors.torch.load", "from safetensors.torch import load")
    found = [
        f"{path.relative_to(src)}:{n}"
        for path in sorted(src.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(r in line for r in readers)
    ]
    assert not found, found
