"""Nothing the user had is lost on write (vlmo.fileio.atomic): temp file + fsync + rename, exclusive creation without
force, one-line errors naming the output and the real cause; and every writer of vlmo going through it.

A full disk is simulated by making a write or `os.fsync` raise OSError(ENOSPC); a file "appearing meanwhile" by
creating it from inside the write (between the up-front check and the rename).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import vlmo.api
import vlmo.fileio.atomic
from conftest import RED
from test_cli import SIZE, assert_error, ok, vlmo_cli
from vlmo.cli.errors import describe
from vlmo.errors import InputError
from vlmo.fileio.atomic import (
    OutputError,
    OutputPathError,
    atomic_dir,
    atomic_path,
    check_output,
    check_output_dir,
    write_output,
)


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders the mechanism left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# -- the mechanism ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"\x00bytes", "text ✓\n", lambda p: p.write_text("callable")])
def test_write_output_writes_whole_files_and_leaves_no_temp(tmp_path: Path, content: object) -> None:
    out = tmp_path / "out.txt"
    assert write_output(out, content, force=False) == out  # type: ignore[arg-type]
    expected = {bytes: content, str: str(content).encode()}.get(type(content), b"callable")
    assert out.read_bytes() == expected
    assert leftovers(tmp_path) == []
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert out.stat().st_mode == plain.stat().st_mode  # the umask applies as to any new file, not 0600


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_keeps_the_old_file_and_names_output_and_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "boxes.png"
    out.write_bytes(b"the user's previous file")

    def half_then_full(tmp: Path) -> None:
        tmp.write_bytes(b"half of a new fi")
        disk_full()

    if where == "fsync":
        monkeypatch.setattr(vlmo.fileio.atomic.os, "fsync", disk_full)
    with pytest.raises(OutputError) as caught:
        write_output(out, half_then_full if where == "write" else b"complete", force=True)
    assert str(caught.value) == f"could not write {out}: no space left on device; free some space"
    assert caught.value.path == out and caught.value.errno == errno.ENOSPC
    assert out.read_bytes() == b"the user's previous file"
    assert leftovers(tmp_path) == []
    message, code = describe(caught.value)
    assert code == 1 and "HF_HUB_CACHE" not in message and str(out) in message


def test_a_library_reporting_os_error_28_in_its_message_is_a_full_disk(tmp_path: Path) -> None:
    class SafetensorError(Exception):  # how safetensors (Rust) reports ENOSPC: not an OSError
        pass

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="no space left on device") as caught, atomic_path(out) as tmp:
        tmp.write_bytes(b"x")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: … })")
    assert caught.value.errno == errno.ENOSPC
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_other_exceptions_pass_through_and_leave_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    with pytest.raises(KeyError), atomic_path(out) as tmp:
        tmp.write_text("{")
        raise KeyError("bug")
    assert not out.exists() and leftovers(tmp_path) == []


def test_without_force_a_file_that_appeared_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    check_output(out, force=False)  # nothing there yet

    def race(tmp: Path) -> None:
        tmp.write_bytes(b"ours")
        out.write_bytes(b"another run's")

    with pytest.raises(OutputPathError, match="already exists") as caught:
        write_output(out, race, force=False)
    assert out.read_bytes() == b"another run's" and leftovers(tmp_path) == []
    assert describe(caught.value) == (f"{out} already exists; pass --force to overwrite it or choose another name", 2)
    assert "pass force to overwrite" in str(caught.value)  # the library's spelling
    write_output(out, race, force=True)
    assert out.read_bytes() == b"ours" and leftovers(tmp_path) == []


def test_without_hard_links_creation_is_still_exclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(vlmo.fileio.atomic.os, "link", no_links)
    out = tmp_path / "a.txt"
    write_output(out, "new", force=False)
    assert out.read_text() == "new"
    with pytest.raises(OutputPathError, match="already exists"):
        write_output(out, "newer", force=False)
    assert out.read_text() == "new" and leftovers(tmp_path) == []


def test_a_symbolic_link_to_a_file_is_written_through(tmp_path: Path) -> None:
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    with pytest.raises(OutputPathError, match="already exists"):
        write_output(link, "new", force=False)
    write_output(link, "new", force=True)
    assert link.is_symlink() and target.read_text() == "new"


def test_a_broken_symbolic_link_is_refused_and_its_target_not_created(tmp_path: Path) -> None:
    link, target = tmp_path / "out.png", tmp_path / "elsewhere" / "target.png"
    link.symlink_to(target)
    for attempt in (
        lambda: check_output(link, force=True, what="--out"),
        lambda: write_output(link, b"x", force=True),
        lambda: write_output(link, b"x", force=False),
    ):
        with pytest.raises(OutputPathError, match="broken symbolic link"):
            attempt()
    assert link.is_symlink() and not target.exists() and not target.parent.exists()


def test_check_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def error(path: Path, **kw: object) -> tuple[str, int]:
        with pytest.raises(OutputError) as caught:
            check_output(path, kw.pop("force", False), what="--out", **kw)  # type: ignore[arg-type]
        return describe(caught.value)

    assert error(tmp_path) == (f"--out {tmp_path} is a directory; name a file", 2)
    (tmp_path / "there.png").write_bytes(b"")
    assert error(tmp_path / "there.png")[1] == 2
    assert "pass --force" in error(tmp_path / "there.png")[0]
    check_output(tmp_path / "there.png", True)
    assert error(tmp_path / "no" / "x.png") == (f"no such directory for --out: {tmp_path / 'no'}", 2)
    check_output(tmp_path / "no" / "x.png", False, make_parents=True)  # the folder would be made
    assert error(tmp_path / "there.png" / "x.png", make_parents=True)[1] == 2  # a file where the folder goes
    monkeypatch.setattr(vlmo.fileio.atomic, "_read_only", lambda folder: True)
    message, code = error(tmp_path / "new.png")
    assert code == 1 and "read-only file system" in message and str(tmp_path / "new.png") in message


def test_check_output_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder") as caught:
        check_output_dir(tmp_path / "file", what="--out")
    assert describe(caught.value)[1] == 2
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="broken symbolic link"):
        check_output_dir(tmp_path / "dangling")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "checkpoint-10"
    with atomic_dir(ckpt) as tmp:
        (tmp / "a.bin").write_bytes(b"first")
    assert (ckpt / "a.bin").read_bytes() == b"first"
    with pytest.raises(OutputError, match="no space left"), atomic_dir(ckpt) as tmp:
        (tmp / "a.bin").write_bytes(b"sec")
        disk_full()
    assert sorted(os.listdir(ckpt)) == ["a.bin"] and (ckpt / "a.bin").read_bytes() == b"first"
    with pytest.raises(OutputPathError, match="already exists"), atomic_dir(ckpt, force=False) as tmp:
        (tmp / "b.bin").write_bytes(b"second")
    with atomic_dir(ckpt) as tmp:
        (tmp / "b.bin").write_bytes(b"second")
    assert sorted(os.listdir(ckpt)) == ["b.bin"]
    assert leftovers(tmp_path) == []


# -- the writers ------------------------------------------------------------------------------------------------


def test_write_jsonl_keeps_the_old_file_on_a_bad_example(tmp_path: Path) -> None:
    from vlmo.data.coco import write_jsonl

    out = tmp_path / "train.jsonl"
    write_jsonl([{"a": 1}], out)
    before = out.read_bytes()
    with pytest.raises(InputError, match="example 1"):
        write_jsonl([{"a": 2}, "not a dict"], out)  # type: ignore[list-item]
    assert out.read_bytes() == before and leftovers(tmp_path) == []


def test_weights_and_adapters_survive_a_full_disk(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmo.nn.lora import LoRAConfig
    from vlmo.weights.adapters import ADAPTER_WEIGHTS, apply_lora, save_adapter
    from vlmo.weights.loader import load_model
    from vlmo.weights.writer import save_weights

    model = load_model(tiny_checkpoint)
    weights = save_weights(model, tmp_path / "w")
    adapter = tmp_path / "adapter"
    lora_model = load_model(tiny_checkpoint)
    apply_lora(lora_model, LoRAConfig(r=2))
    save_adapter(lora_model, adapter, LoRAConfig(r=2))
    saved = {p: p.read_bytes() for p in (weights, adapter / ADAPTER_WEIGHTS)}
    monkeypatch.setattr(vlmo.fileio.atomic.os, "fsync", disk_full)
    for write, path in (
        (lambda: save_weights(model, tmp_path / "w"), weights),
        (lambda: save_adapter(lora_model, adapter, LoRAConfig(r=2)), adapter / ADAPTER_WEIGHTS),
    ):
        with pytest.raises(OutputError, match="no space left on device"):
            write()
        assert path.read_bytes() == saved[path] and leftovers(path.parent) == []


def test_finetune_checkpoint_is_complete_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import vlmo.finetune.train as finetune_module
    from vlmo.finetune.config import FinetuneConfig
    from vlmo.finetune.train import save_checkpoint

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = FinetuneConfig(model="m", out=str(tmp_path), data="d.jsonl")
    path = tmp_path / "checkpoint-1"
    save_checkpoint(path, layer, list(layer.named_parameters()), optimizer, scheduler, 1, cfg)
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    assert set(files) == {"trainable.safetensors", "training_state.pt", "finetune_config.json"}

    def half_then_full(tensors: object, filename: str, **kwargs: object) -> None:
        Path(filename).write_bytes(b"half")
        disk_full()

    monkeypatch.setattr(finetune_module, "save_file", half_then_full)
    with pytest.raises(OutputError, match="checkpoint-1: no space left on device"):
        save_checkpoint(path, layer, list(layer.named_parameters()), optimizer, scheduler, 2, cfg)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    assert leftovers(tmp_path) == []


def test_eval_write_creates_both_files_exclusively(tmp_path: Path) -> None:
    from vlmo.finetune.evaluate import VQAReport

    report = VQAReport(predictions=(), mode="official")
    out, results = tmp_path / "scores.json", tmp_path / "scores_results.json"
    results.write_text("the user's")
    with pytest.raises(OutputPathError, match="scores_results.json already exists"):
        report.write(out, force=False)
    assert not out.exists() and results.read_text() == "the user's" and leftovers(tmp_path) == []
    assert report.write(out, force=True) == (out, results)
    assert json.loads(results.read_text()) == []


# -- the command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def red(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", SIZE, RED).save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(taught_checkpoint: Path) -> str:
    return str(taught_checkpoint)


def test_detect_out_that_appears_while_the_model_works_is_not_replaced(
    red: Path, ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "boxes.png"
    run = vlmo.api.VLMo.run

    def racing(self: vlmo.api.VLMo, *args: object, **kwargs: object) -> object:
        out.write_bytes(b"another run's")  # after the up-front check, before the save
        return run(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vlmo.api.VLMo, "run", racing)
    assert_error(
        vlmo_cli("detect", red, "cat", "--model", ckpt, "--out", out), 2, str(out), "already exists", "--force"
    )
    assert out.read_bytes() == b"another run's" and leftovers(tmp_path) == []
    ok(vlmo_cli("detect", red, "cat", "--model", ckpt, "--out", out, "--force"))
    with Image.open(out) as drawn:
        assert drawn.size == SIZE
    assert leftovers(tmp_path) == []


def test_detect_out_on_a_full_disk_keeps_the_old_image(
    red: Path, ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "boxes.png"
    out.write_bytes(b"the user's picture")
    monkeypatch.setattr(vlmo.fileio.atomic.os, "fsync", disk_full)
    # --no-cache: on this full disk the prepared-weights cache would add its own warning line (test_prepared.py)
    line = assert_error(vlmo_cli("detect", red, "cat", "--model", ckpt, "--out", out, "--force", "--no-cache"), 1)
    assert line == f"error: could not write {out}: no space left on device; free some space"
    assert out.read_bytes() == b"the user's picture" and leftovers(tmp_path) == []


def test_out_errors_are_one_line(red: Path, ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detect = ("detect", red, "cat", "--model", ckpt, "--out")
    assert_error(vlmo_cli(*detect, tmp_path), 2, "is a directory")
    dangling, target = tmp_path / "link.png", tmp_path / "target.png"
    dangling.symlink_to(target)
    assert_error(vlmo_cli(*detect, dangling, "--force"), 2, "broken symbolic link")
    assert not target.exists()
    (tmp_path / "run").write_text("a file")
    finetune = ("finetune", "--model", ckpt, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "run")
    assert_error(vlmo_cli(*finetune), 2, "is a file, not a folder")
    monkeypatch.setattr(vlmo.fileio.atomic, "_read_only", lambda folder: True)
    assert_error(vlmo_cli(*detect, tmp_path / "new.png"), 1, "read-only file system", str(tmp_path / "new.png"))


def test_eval_refuses_an_existing_results_file_before_the_model_loads(ckpt: str, tmp_path: Path) -> None:
    from test_eval import COLOUR_QA, write_vqav2

    q, a, image_dir = write_vqav2(tmp_path / "vqa", COLOUR_QA)
    args = ("eval", "vqav2", "--questions", q, "--annotations", a, "--images", image_dir, "--model", ckpt)
    results = tmp_path / "scores_results.json"
    results.write_text("the user's")
    assert_error(vlmo_cli(*args, "--out", tmp_path / "scores.json"), 2, str(results), "--force")
    assert results.read_text() == "the user's" and not (tmp_path / "scores.json").exists()
    (tmp_path / "dir.json").mkdir()
    assert_error(vlmo_cli(*args, "--out", tmp_path / "dir.json"), 2, "is a directory")
    ok(vlmo_cli(*args, "--out", tmp_path / "new" / "scores.json"))  # eval makes its folder
    assert (tmp_path / "new" / "scores_results.json").is_file()
