"""The prepared-weights cache (`weights/prepared.py`): written once, read after, bit-identical, safe when damaged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vlmo.nn.quant
import vlmo.weights.prepared as prepared
from conftest import RED
from test_lora import vlmo_with_lora
from vlmo import VLMo
from vlmo.cli.commands import app
from vlmo.fileio.atomic import OutputError
from vlmo.nn.lora import LoRAConfig
from vlmo.processing import preprocess_images
from vlmo.weights.adapters import save_adapter

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="int8 mode needs fbgemm (x86)"
)

MODES = {"int8": {"quantize": "int8"}, "float16": {"dtype": "bfloat16", "quantize": "none"}}


def load(path: Path, mode: str = "int8", **kw: object) -> VLMo:
    return VLMo.from_pretrained(path, device="cpu", **MODES[mode], **kw)  # type: ignore[arg-type]


def logits(vlm: VLMo) -> torch.Tensor:
    images = [Image.linear_gradient("L").convert("RGB").resize((80, 60)), Image.new("RGB", (50, 90), RED)]
    batch = vlm.text.encode(["caption en", "answer en what is this thing?"], ["a cat on a mat", "a dog"])
    pixels = preprocess_images(images, vlm.image_config).to(vlm.dtype)
    with torch.no_grad():
        return vlm.model(batch.input_ids, pixels, batch.attention_mask, batch.token_type_ids).float()


def cached() -> list[prepared.Entry]:
    return prepared.entries()


def forbid_preparing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if weights are quantized or an entry is written: a cache hit does neither."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("prepared again")

    monkeypatch.setattr(vlmo.nn.quant, "_quantize_rows", refuse)
    monkeypatch.setattr(prepared, "_write_entry", refuse)


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint (tests rewrite its files)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def adapter(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = vlmo_with_lora(tiny_checkpoints["gqa"], LoRAConfig(r=4, alpha=8))
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", LoRAConfig(r=4, alpha=8))


@pytest.mark.parametrize("with_adapter", [False, True])
@pytest.mark.parametrize("mode", ["int8", "float16"])
def test_first_load_writes_an_entry_and_later_loads_read_it_bit_identically(
    ckpt: Path, adapter: Path, mode: str, with_adapter: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"adapter": adapter} if with_adapter else {}
    reference = logits(load(ckpt, mode, cache=False, **extra))
    assert cached() == []
    first = load(ckpt, mode, **extra)
    (entry,) = cached()
    assert (entry.mode, entry.source) == (mode, str(ckpt.resolve()))
    assert torch.equal(logits(first), reference)
    forbid_preparing(monkeypatch)
    second = load(ckpt, mode, **extra)
    assert torch.equal(logits(second), reference)
    assert second.quantized == (mode == "int8")
    assert len(cached()) == 1


def test_adapter_and_mode_are_in_the_key(ckpt: Path, adapter: Path) -> None:
    load(ckpt)
    load(ckpt, adapter=adapter)
    load(ckpt, "float16")
    assert sorted(e.mode for e in cached()) == ["float16", "int8", "int8"]
    keys = {prepared.entry_key(ckpt, "int8"), prepared.entry_key(ckpt, "int8", adapter)}
    keys |= {prepared.entry_key(ckpt, "float16")}
    assert {e.path.name for e in cached()} == keys


@pytest.mark.parametrize("mode", ["int8", "float16"])
def test_an_adapter_with_a_dense_connector_projector_is_cached_with_it(
    ckpt: Path, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A LoRA + Dense Connector adapter (`vlmo_projector.*` beside it, as `finetune` exports one): the entry holds
    that projector, so later loads read it quietly and bit-identically; the projector's files are in the key."""
    model = vlmo_with_lora(ckpt, LoRAConfig(r=4, alpha=8))
    model.use_projector("sci")
    with torch.no_grad():  # a trained branch, not the zero start
        model.projector.mlp.fc2.weight.normal_(0.0, 0.02)
    adapter = save_adapter(model, tmp_path / "sci", LoRAConfig(r=4, alpha=8))
    reference = logits(load(ckpt, mode, cache=False, adapter=adapter))
    capfd.readouterr()
    first = load(ckpt, mode, adapter=adapter)
    (entry,) = cached()
    assert first.model.cfg.projector.kind == "sci"
    assert torch.equal(logits(first), reference)
    forbid_preparing(monkeypatch)
    second = load(ckpt, mode, adapter=adapter)
    assert second.model.cfg.projector.kind == "sci"
    assert torch.equal(logits(second), reference)
    assert capfd.readouterr().err == ""
    assert len(cached()) == 1
    key = prepared.entry_key(ckpt, mode, adapter)
    weights = adapter / "vlmo_projector.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: a new identity (its ctime), the same bytes
    assert prepared.entry_key(ckpt, mode, adapter) != key


def test_float16_checkpoint_without_adapter_is_not_cached(ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    half = Path(shutil.copytree(ckpt, tmp_path / "half"))
    tensors = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(half / "model.safetensors"), metadata={"format": "pt"})
    load(half, "float16")
    assert cached() == []


def test_a_rewritten_weight_file_misses(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    load(ckpt)
    file = ckpt / "model.safetensors"
    size = file.stat().st_size
    tensors = load_file(str(file))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 2  # same size, same header, new content
    save_file(tensors, str(file), metadata={"format": "pt"})
    assert file.stat().st_size == size
    fresh = logits(load(ckpt))
    assert len(cached()) == 2
    assert torch.equal(fresh, logits(load(ckpt, cache=False)))


def test_hub_blob_name_is_the_content_identity(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 10)
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert prepared.file_identity(link) == {"name": "model.safetensors", "size": 10, "sha256": "ab" * 32}


def _damage_cases() -> list[tuple[str, int]]:
    return [("cut", n) for n in (0, 7, 8, 60, -1000, -1)] + [("flip", n) for n in (9, 30, 100, 300)]


@pytest.mark.parametrize(("how", "where"), _damage_cases())
def test_a_damaged_entry_is_reported_deleted_and_rebuilt(
    ckpt: Path, how: str, where: int, capfd: pytest.CaptureFixture[str]
) -> None:
    reference = logits(load(ckpt, cache=False))
    load(ckpt)
    (entry,) = cached()
    file = entry.path / "weights.safetensors"
    data = bytearray(file.read_bytes())
    if how == "cut":
        data = data[: where % len(data)] if where else data[:0]
    else:
        data[where] ^= 0xFF
    file.write_bytes(bytes(data))
    capfd.readouterr()
    vlm = load(ckpt)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prepared-weights cache entry" in err[0] and "was damaged" in err[0], err
    assert err[0].endswith("rebuilding it")
    assert torch.equal(logits(vlm), reference)
    assert len(cached()) == 1  # rebuilt, and sound: the next load reads it quietly
    assert torch.equal(logits(load(ckpt)), reference)
    assert capfd.readouterr().err == ""


def test_a_failed_write_warns_once_and_still_loads(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    reference = logits(load(ckpt, cache=False))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("VLMO_CACHE", str(blocker))  # the cache folder cannot be made
    capfd.readouterr()
    assert torch.equal(logits(load(ckpt)), reference)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not save prepared weights" in err[0], err

    monkeypatch.setenv("VLMO_CACHE", str(tmp_path / "full"))

    def disk_full(path: object, content: object, **kwargs: object) -> None:
        raise OutputError(f"could not write {path}: no space left on device; free some space", str(path), errno.ENOSPC)

    monkeypatch.setattr(prepared, "write_output", disk_full)
    for mode in MODES:
        capfd.readouterr()
        vlm = load(ckpt, mode)
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no space left" in err[0], err
        if mode == "int8":
            assert torch.equal(logits(vlm), reference)
    assert cached() == []


def test_an_interrupted_write_leaves_nothing_trusted(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    real = vlmo.nn.quant._quantize_rows

    def interrupt(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vlmo.nn.quant, "_quantize_rows", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load(ckpt)
    root = prepared.cache_root()
    assert [p.name for p in root.rglob("*")] == []  # no weights, no temporary file, no empty entry folder
    monkeypatch.setattr(vlmo.nn.quant, "_quantize_rows", real)
    assert torch.equal(logits(load(ckpt)), logits(load(ckpt, cache=False)))


def test_two_processes_preparing_at_once_both_succeed(ckpt: Path) -> None:
    script = (
        "import sys, torch; from vlmo import VLMo; "
        "v = VLMo.from_pretrained(sys.argv[1], device='cpu', quantize='int8'); "
        "ids = torch.tensor([[2, 7, 9, 11]]); "
        "print(float(v.model.text.lm_head(v.model.text.embed(ids)).double().sum()))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    assert all(b"damaged" not in o[1] for o in outs)
    (entry,) = cached()
    assert {p.name for p in entry.path.iterdir()} == {"weights.safetensors", "meta.json"}


def test_cache_false_and_no_cache_write_nothing(ckpt: Path, tmp_path: Path) -> None:
    load(ckpt, cache=False)
    load(ckpt, "float16", cache=False)
    assert cached() == []
    image = tmp_path / "red.png"
    Image.new("RGB", (96, 64), RED).save(image)
    result = CliRunner().invoke(
        app, ["caption", str(image), "--model", str(ckpt), "--no-cache", "--max-tokens", "2"], prog_name="vlmo"
    )
    assert result.exit_code == 0, result.stderr
    assert cached() == []
    result = CliRunner().invoke(app, ["caption", str(image), "--model", str(ckpt), "--max-tokens", "2"])
    assert result.exit_code == 0, result.stderr
    assert len(cached()) == 1


def test_cli_cache_ls_and_rm(ckpt: Path, adapter: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["cache", "ls", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout)["entries"] == []
    load(ckpt)
    load(ckpt, "float16")
    load(ckpt, adapter=adapter)
    listed = runner.invoke(app, ["cache", "ls"])
    assert listed.exit_code == 0
    rows = listed.stdout.splitlines()
    assert len(rows) == 4 and rows[-1].startswith(f"cache: {prepared.cache_root()} (3 entries")
    assert all(row.startswith(str(ckpt.resolve()) + "\t") for row in rows[:3])
    data = json.loads(runner.invoke(app, ["cache", "ls", "--json"]).stdout)
    assert data["cache"] == str(prepared.cache_root()) and len(data["entries"]) == 3
    assert data["bytes"] == sum(e["bytes"] for e in data["entries"]) > 0
    assert {e["mode"] for e in data["entries"]} == {"int8", "float16"}

    unknown = runner.invoke(app, ["cache", "rm", "owner/never-loaded"])
    assert unknown.exit_code == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "no prepared weights of owner/never-loaded" in unknown.stderr
    both = runner.invoke(app, ["cache", "rm"])
    assert both.exit_code == 2

    removed = runner.invoke(app, ["cache", "rm", str(ckpt)])  # the path as typed; listed as its absolute form
    assert removed.exit_code == 0, removed.stderr
    assert len(removed.stdout.splitlines()) == 3 and cached() == []
    load(ckpt)
    gone = runner.invoke(app, ["cache", "rm", "--all"])
    assert gone.exit_code == 0 and len(gone.stdout.splitlines()) == 1 and cached() == []


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_first_load_shows_a_one_time_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, the load that prepares weights says so once; the next load (from the cache) does not."""
    import select

    example = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    env = {**os.environ, "VLMO_CACHE": str(tmp_path / "cache"), "COLUMNS": "120", "TERM": "xterm"}
    code = "from vlmo.cli.commands import main; main()"
    args = ["ask", str(example), "what color is the circle?", "--model", "vlmo/shapes"]

    def run() -> tuple[str, str]:
        master, slave = os.openpty()  # stderr is a terminal, stdout a pipe (the answer)
        done = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        shown = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        os.close(master)
        return done.stdout.decode(), shown.decode(errors="replace")

    first, second = run(), run()
    assert first[0] == second[0] == "yellow\n"
    assert "Preparing int8 weights (once for this checkpoint)" in first[1]
    assert "Preparing" not in second[1]


def _fake_entry(folder: Path, source: str) -> Path:
    """An entry as `entries()` lists it: a folder with a weights file and meta.json."""
    folder.mkdir(parents=True)
    (folder / prepared.WEIGHTS_FILE).write_bytes(b"\0" * 64)
    (folder / prepared.META_FILE).write_text(json.dumps({"source": source, "mode": "int8"}))
    return folder


def test_cache_rm_says_what_it_could_not_remove(monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal the system refuses (a read-only cache folder: simulated, since root ignores permissions) is a line
    on stderr naming the entry and the reason, exit 1; what was removed is still said on stdout."""
    kept = _fake_entry(prepared.cache_root() / ("a" * 64), "acme/kept")
    gone = _fake_entry(prepared.cache_root() / ("b" * 64), "acme/gone")
    real_rmtree = shutil.rmtree

    def refusing_rmtree(path: Path, ignore_errors: bool = False, **kwargs: object) -> None:
        if Path(path) != kept:
            return real_rmtree(path, ignore_errors=ignore_errors)
        if not ignore_errors:  # as shutil.rmtree does: with ignore_errors, a failure is silent
            raise PermissionError(errno.EACCES, "Permission denied", str(kept / prepared.WEIGHTS_FILE))

    monkeypatch.setattr(prepared.shutil, "rmtree", refusing_rmtree)
    result = CliRunner().invoke(app, ["cache", "rm", "--all"])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == ["removed acme/gone (int8, 0.00 GB)"] and not gone.exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: could not remove acme/kept (int8, 0.00 GB) at {kept}: permission denied")
    assert kept.is_dir() and [e.source for e in cached()] == ["acme/kept"]


def test_cache_rm_skips_a_symlinked_entry(tmp_path: Path) -> None:
    """An entry that is a symbolic link is not followed: the files it points at stay, and the skip is said, exit 1."""
    outside = _fake_entry(tmp_path / "not-the-cache" / "weights", "acme/linked")
    link = prepared.cache_root() / ("c" * 64)
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    result = CliRunner().invoke(app, ["cache", "rm", "acme/linked"])
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: could not remove acme/linked (int8, 0.00 GB) at {link}: skipped")
    assert "symbolic link" in line and str(outside) in line
    assert (outside / prepared.WEIGHTS_FILE).is_file() and link.is_symlink()
