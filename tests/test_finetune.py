"""Fine-tuning on CPU with tiny models: learning, exact resumption, DDP equivalence, data readers, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmo import VLMo
from vlmo.data.examples import Example, JsonlDataset
from vlmo.errors import InputError
from vlmo.finetune.train import FinetuneConfig, finetune, sample_indices, warmup_cosine

COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 210), "yellow": (230, 210, 40)}


def write_vqa_set(root: Path, seed: int, per_colour: int) -> Path:
    """A synthetic VQA set: solid-colour pictures (shades and sizes vary) asking for the colour; returns the JSONL."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            shade = tuple(int(min(255, max(0, c + torch.randint(-25, 26, (1,), generator=g).item()))) for c in rgb)
            size = (int(torch.randint(40, 120, (1,), generator=g)), int(torch.randint(40, 120, (1,), generator=g)))
            path = root / f"{name}{i}.png"
            Image.new("RGB", size, shade).save(path)
            lines.append({"image": path.name, "prefix": "answer en what color is it?", "suffix": name})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return data


def exact_match(model_dir: Path, data: Path) -> float:
    vlm = VLMo.from_pretrained(model_dir, device="cpu")
    examples = JsonlDataset(data).examples
    answers = vlm.generate([e.image for e in examples], [e.prefix for e in examples], max_new_tokens=4)
    return sum(a == e.suffix for a, e in zip(answers, examples, strict=True)) / len(examples)


def config(ckpt: Path, train_data: Path, out: Path, **kw: object) -> FinetuneConfig:
    base = dict(model=str(ckpt), out=str(out), data=str(train_data), train=("full",), lr=3e-3, steps=30, batch_size=8)
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vqa(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vqa")
    return write_vqa_set(root / "train", seed=0, per_colour=6), write_vqa_set(root / "heldout", seed=1, per_colour=3)


def test_training_lowers_the_loss_and_learns_held_out_questions(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path
) -> None:
    train, heldout = vqa
    before = exact_match(tiny_checkpoint, heldout)
    result = finetune(config(tiny_checkpoint, train, tmp_path / "run", warmup_steps=3, steps=60, lr=5e-3))
    assert result.steps == 60 and result.output == tmp_path / "run" / "final"
    assert sum(result.losses[-5:]) / 5 < 0.2 * sum(result.losses[:3]) / 3
    after = exact_match(result.output, heldout)
    assert before <= 0.25 and after >= 0.9, (before, after)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in logged] == pytest.approx(result.losses)


def test_resuming_gives_the_same_losses_as_an_uninterrupted_run(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path
) -> None:
    train, _ = vqa
    kw = dict(steps=6, batch_size=4, grad_accum=2, warmup_steps=2, train=("attention", "projector"))
    whole = finetune(config(tiny_checkpoint, train, tmp_path / "whole", save_every=3, **kw))
    again = finetune(
        config(tiny_checkpoint, train, tmp_path / "part", resume=str(tmp_path / "whole/checkpoint-3"), **kw)
    )
    assert again.losses == whole.losses[3:]
    a = load_file(str(tmp_path / "whole/checkpoint-6/trainable.safetensors"))
    b = load_file(str(tmp_path / "part/checkpoint-6/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(("projector.", "text.layers.")) for k in a) and any(".attn." in k for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes under torchrun
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path
) -> None:
    train, _ = vqa
    args = ["--model", str(tiny_checkpoint), "--data", str(train), "--train", "attention", "--steps", "3"]
    args += ["--lr", "1e-3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    ddp += ["--master-port", str(_free_port()), "-m", "vlmo", "finetune"]
    done = subprocess.run(
        [*ddp, *args, "--batch-size", "3", "--out", str(tmp_path / "ddp")], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    single = config(tiny_checkpoint, train, tmp_path / "one", train=("attention",), steps=3, lr=1e-3, batch_size=3)
    single.grad_accum = 2  # the same 6 samples per step as 2 processes × 3
    finetune(single)
    a = load_file(str(tmp_path / "ddp/checkpoint-3/trainable.safetensors"))
    b = load_file(str(tmp_path / "one/checkpoint-3/trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


def test_sample_order_is_a_pure_function_of_seed_and_position() -> None:
    run = sample_indices(5, seed=3, start=0, count=12)
    assert sorted(i for e, i in run if e == 0) == list(range(5))  # every example once per epoch
    assert run[7:12] == sample_indices(5, seed=3, start=7, count=5)
    assert run != sample_indices(5, seed=4, start=0, count=12)


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(4, 14)
    assert [round(f(s), 3) for s in (0, 3, 4, 9, 14)] == [0.2, 0.8, 1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"train": ("everything",)}, "^train must list some of lora, projector, attention, full; got everything"),
        ({"steps": 0}, "^steps must be a whole number ≥ 1, got 0$"),
        ({"lora_r": 0}, "^lora_r must be a whole number ≥ 1, got 0$"),
        ({"save_every": -1}, "^save_every must be a whole number ≥ 0, got -1$"),
        ({"vqa_questions": "q.json"}, "either as data "),  # both kinds of data files
        ({"data": None, "vqa_questions": "q.json"}, "vqa_annotations"),  # half the VQAv2 layout
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr must be a number > 0, got nan"),
        ({"lr": float("inf")}, "lr"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"lora_dropout": 1.0}, "^lora_dropout must be a number ≥ 0 and < 1, got 1.0$"),
    ],
)
def test_config_errors(kw: dict, words: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=words):
        config(tmp_path, tmp_path / "x.jsonl", tmp_path / "out", **kw)


class SolidColours:
    """A dataset made on the fly: `get(index, epoch)` paints a fresh picture, nothing is read from disk."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return 8

    def get(self, index: int, epoch: int) -> Example:
        self.requests.append((epoch, index))
        name = list(COLOURS)[index % len(COLOURS)]
        return Example(Image.new("RGB", (40 + epoch, 30), COLOURS[name]), "answer en what color is it?", name)


def test_finetune_trains_on_a_dataset_object(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = SolidColours()
    cfg = FinetuneConfig(model=str(tiny_checkpoint), out=str(tmp_path / "run"), train=("full",), steps=3, batch_size=4)
    result = finetune(cfg, dataset=data)
    assert result.steps == 3 and result.output is not None and (result.output / "model.safetensors").is_file()
    assert data.requests == sample_indices(len(data), cfg.seed, 0, 12)  # the usual seeded order, over 2 epochs


def test_finetune_needs_data_from_exactly_one_place(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bare = FinetuneConfig(model=str(tiny_checkpoint), out=str(tmp_path / "run"))  # allowed: a dataset may come
    with pytest.raises(InputError, match=r"^give training data either as data \(a JSONL file\) or as all of vqa_"):
        finetune(bare)
    with pytest.raises(InputError, match="not both"):
        finetune(config(tiny_checkpoint, tmp_path / "x.jsonl", tmp_path / "run"), dataset=SolidColours())
    assert not (tmp_path / "run").exists()


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "prefix": "ocr", "suffix": "x"}\n{"image": "a.png", "prefix": "ocr"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2 lacks string field\(s\) suffix"):
        JsonlDataset(bad)
    bad.write_text('{"image": "missing.png", "prefix": "ocr", "suffix": "x"}\n')
    with pytest.raises(InputError, match="no image file"):
        JsonlDataset(bad)
    bad.write_text("not json\n")
    with pytest.raises(InputError, match=":1 is not valid JSON"):
        JsonlDataset(bad)


def test_dense_connector_projector_trains_and_reloads(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path
) -> None:
    """--projector sci starts equal to the base model, trains its branch, and the exported checkpoint reloads it."""
    train, heldout = vqa
    result = finetune(config(tiny_checkpoint, train, tmp_path / "sci", train=("attention",), projector="sci", steps=4))
    assert result.output is not None
    saved = json.loads((result.output / "config.json").read_text())
    assert saved["vlmo_projector"]["kind"] == "sci"
    vlm = VLMo.from_pretrained(result.output, device="cpu")
    assert vlm.model.cfg.projector.kind == "sci"
    assert vlm.model.projector.mlp.fc2.weight.abs().sum() > 0  # the branch moved away from its zero start
    # the base checkpoint's config with this projector kind but without its weights is an error, not random weights
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    base_cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**base_cfg, "vlmo_projector": saved["vlmo_projector"]}))
    from vlmo.errors import CheckpointError

    with pytest.raises(CheckpointError, match="lacks"):
        VLMo.from_pretrained(broken, device="cpu")


def test_the_connector_branch_can_warm_up_alone_and_train_at_its_own_rate(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path
) -> None:
    """--branch-warmup-steps N: for N steps only the new branch moves; --branch-lr-scale: its AdamW group's rate."""
    from safetensors.torch import load_file

    from vlmo.finetune.train import param_groups

    train, _ = vqa
    cfg = config(tiny_checkpoint, train, tmp_path / "warm", train=("attention",), projector="sci", steps=3,
                 branch_warmup_steps=2, branch_lr_scale=0.1, save_every=2)  # fmt: skip
    finetune(cfg)
    before = VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32").model.state_dict()
    after_warmup = load_file(str(tmp_path / "warm" / "checkpoint-2" / "trainable.safetensors"))
    after_all = load_file(str(tmp_path / "warm" / "checkpoint-3" / "trainable.safetensors"))
    attention = [n for n in after_warmup if ".attn." in n]
    branch = [n for n in after_warmup if n.startswith("projector.") and not n.startswith("projector.linear.")]
    assert attention and branch
    assert all(torch.equal(after_warmup[n], before[n]) for n in attention)  # frozen while the branch warms up
    assert any(after_warmup[n].abs().sum() > 0 for n in branch if n.endswith("fc2.weight"))  # it moved
    assert not all(torch.equal(after_all[n], before[n]) for n in attention)  # then the joint run
    model = VLMo.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32").model
    model.use_projector("sci")
    named = [(n, p) for n, p in model.named_parameters()]
    groups = param_groups(named, cfg)
    assert [g["lr"] for g in groups] == [cfg.lr, cfg.lr * 0.1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in named if n in branch}
    # The defaults for a connector kind are the measured recipe's (0.1 × the rate, a twelfth of the steps alone).
    measured = config(tiny_checkpoint, train, tmp_path / "x", projector="dci", steps=1200)
    assert (measured.branch_lr, measured.branch_warmup) == (measured.lr * 0.1, 100)
    plain = config(tiny_checkpoint, train, tmp_path / "x")
    assert (plain.branch_lr, plain.branch_warmup) == (plain.lr, 0)
    with pytest.raises(InputError, match="branch_lr_scale and branch_warmup_steps are for a Dense Connector"):
        config(tiny_checkpoint, train, tmp_path / "x", branch_lr_scale=0.1)
    with pytest.raises(InputError, match="branch_warmup_steps must be fewer than steps"):
        config(tiny_checkpoint, train, tmp_path / "x", projector="sti", steps=2, branch_warmup_steps=2)


def test_lora_run_exports_a_peft_adapter_that_reloads(taught_checkpoint: Path, tmp_path: Path) -> None:
    """LoRA teaches the taught model to swap its colour answers; the exported PEFT adapter reproduces that."""
    from conftest import BLUE, RED

    lines = []
    for i, (rgb, answer) in enumerate([(RED, "blue"), (BLUE, "red")] * 4):
        Image.new("RGB", (96, 64), rgb).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": "answer en what color is it?", "suffix": answer}))
    data = tmp_path / "swap.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = finetune(config(taught_checkpoint, data, tmp_path / "lora", train=("lora",), lr=1e-2, steps=20))
    assert result.output is not None and result.losses[-1] < 0.1 * result.losses[0]
    assert sorted(p.name for p in result.output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((result.output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    red, blue = Image.new("RGB", (96, 64), RED), Image.new("RGB", (96, 64), BLUE)
    base = VLMo.from_pretrained(taught_checkpoint, device="cpu")
    tuned = VLMo.from_pretrained(taught_checkpoint, device="cpu", adapter=result.output)
    assert base.ask([red, blue], "what color is it?") == ["red", "blue"]
    assert tuned.ask([red, blue], "what color is it?") == ["blue", "red"]
    assert tuned.quantized  # the CPU default (int8) quantizes the merged weights
    exact = VLMo.from_pretrained(taught_checkpoint, device="cpu", dtype="float32", adapter=result.output)
    assert type(exact.model.text.layers[0].attn.q_proj) is torch.nn.Linear  # merged for inference


def test_cli_finetune_then_ask_with_the_adapter(taught_checkpoint: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conftest import RED
    from vlmo.cli.commands import app

    Image.new("RGB", (96, 64), RED).save(tmp_path / "red.png")
    line = {"image": "red.png", "prefix": "answer en what color is it?", "suffix": "blue"}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    runner = CliRunner()
    args = ["finetune", "--model", str(taught_checkpoint), "--data", str(tmp_path / "d.jsonl")]
    args += ["--out", str(tmp_path / "run"), "--steps", "20", "--lr", "1e-2", "--batch-size", "2", "--device", "cpu"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    adapter = done.stdout.strip()
    assert adapter == str(tmp_path / "run" / "final")
    again = runner.invoke(app, args)  # the run directory is not empty: refused, nothing overwritten
    assert again.exit_code == 2 and "--resume" in again.stderr
    ask = ["ask", str(tmp_path / "red.png"), "what color is it?", "--model", str(taught_checkpoint)]
    assert runner.invoke(app, ask).stdout.strip() == "red"
    assert runner.invoke(app, [*ask, "--adapter", adapter]).stdout.strip() == "blue"


@pytest.mark.parametrize("projector", ["linear", "dci"])
def test_lora_with_the_projector_saves_it_with_the_adapter(
    taught_checkpoint: Path, tmp_path: Path, projector: str
) -> None:
    from conftest import RED

    Image.new("RGB", (96, 64), RED).save(tmp_path / "red.png")
    line = {"image": "red.png", "prefix": "answer en what color is it?", "suffix": "blue"}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    kw = dict(train=("lora", "projector"), projector=projector, lr=1e-2, steps=15, batch_size=2)
    result = finetune(config(taught_checkpoint, tmp_path / "d.jsonl", tmp_path / "run", **kw))
    assert result.output is not None
    files = sorted(p.name for p in result.output.iterdir())
    settings = json.loads((result.output / "adapter_config.json").read_text())
    if projector == "linear":  # PEFT's own mechanism: a full copy of the projector in the adapter file
        assert settings["modules_to_save"] == ["multi_modal_projector"]
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
    else:
        assert "vlmo_projector.json" in files and "vlmo_projector.safetensors" in files
    tuned = VLMo.from_pretrained(taught_checkpoint, device="cpu", adapter=result.output)
    assert tuned.model.cfg.projector.kind == projector
    assert tuned.ask(Image.new("RGB", (96, 64), RED), "what color is it?") == "blue"


def test_vqav2_layout_samples_one_human_answer_per_epoch_reproducibly(tmp_path: Path) -> None:
    from test_eval import write_vqav2
    from vlmo.data.examples import VQAv2Dataset
    from vlmo.data.vqav2 import load_vqav2

    qa = [(1, 1, "what color is it?", ["red"] * 5 + ["dark red"] * 5, "other")]
    data = VQAv2Dataset(load_vqav2(*write_vqav2(tmp_path, qa)), seed=3)
    drawn = [data.get(0, epoch).suffix for epoch in range(40)]
    assert set(drawn) == {"red", "dark red"}  # both answers appear over the epochs
    assert drawn == [VQAv2Dataset(data.examples, seed=3).get(0, e).suffix for e in range(40)]
    assert data.get(0, 0).prefix == "answer en what color is it?"


def test_finetune_reads_the_vqav2_layout(taught_checkpoint: Path, tmp_path: Path) -> None:
    from test_eval import COLOUR_QA, write_vqav2

    q, a, images = write_vqav2(tmp_path / "vqa", COLOUR_QA)
    cfg = FinetuneConfig(
        model=str(taught_checkpoint),
        out=str(tmp_path / "run"),
        vqa_questions=str(q),
        vqa_annotations=str(a),
        vqa_images=str(images),
        train=("attention",),
        steps=2,
        batch_size=2,
    )
    assert finetune(cfg).steps == 2


def test_gradient_checkpointing_gives_the_same_step(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path
) -> None:
    train, _ = vqa
    runs = [
        finetune(config(tiny_checkpoint, train, tmp_path / str(gc), steps=2, gradient_checkpointing=gc))
        for gc in (False, True)
    ]
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)


def test_progress_shows_loss_learning_rate_and_speed(
    tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, _ = vqa
    finetune(config(tiny_checkpoint, train, tmp_path / "p", steps=2, progress=True))
    err = capsys.readouterr().err
    assert "loss" in err and "lr" in err and "samples/s" in err


@pytest.mark.slow  # two processes under torchrun
def test_two_process_fsdp_equals_one_process(tiny_checkpoint: Path, vqa: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file as load

    train, _ = vqa
    args = ["--model", str(tiny_checkpoint), "--data", str(train), "--train", "full", "--steps", "2"]
    args += ["--lr", "1e-3", "--device", "cpu", "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    run += ["--master-port", str(_free_port()), "-m", "vlmo", "finetune"]
    done = subprocess.run(
        [*run, *args, "--fsdp", "--out", str(tmp_path / "fsdp")], env=env, capture_output=True, timeout=300
    )
    assert (tmp_path / "fsdp/final/model.safetensors").is_file(), done.stderr.decode()[-3000:]
    single = config(tiny_checkpoint, train, tmp_path / "one", steps=2, lr=1e-3, batch_size=3)
    single.grad_accum = 2
    finetune(single)
    a, b = load(str(tmp_path / "fsdp/final/model.safetensors")), load(str(tmp_path / "one/final/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)


# -- resuming from a checkpoint directory that is not what it claims -------------------------------------------------


class _Payload:
    """Pickles to a call of `Path.touch(marker)`: unpickling it would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def _resume_target() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_resume_refuses_to_unpickle_a_malicious_training_state(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vlmo.errors import CheckpointError
    from vlmo.finetune.train import load_checkpoint

    model, optimizer, scheduler = _resume_target()
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "trainable.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "optimizer": _Payload(marker)}, tmp_path / "training_state.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "training_state.pt") in msg, msg
    assert "not a vlmo training state" in msg and "refused to unpickle" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"not a torch file", "not a vlmo training state"), (None, "not a vlmo training state")],
    ids=["garbage", "wrong-contents"],
)
def test_resume_with_an_unreadable_training_state(tmp_path: Path, content: bytes | None, words: str) -> None:
    from safetensors.torch import save_file

    from vlmo.errors import CheckpointError
    from vlmo.finetune.train import load_checkpoint

    model, optimizer, scheduler = _resume_target()
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "trainable.safetensors"))
    if content is None:
        torch.save({"step": 1}, tmp_path / "training_state.pt")  # loads, but lacks the optimizer state
    else:
        (tmp_path / "training_state.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model, optimizer, scheduler)
    assert "\n" not in str(info.value) and words in str(info.value)


def test_resume_reads_trainable_weights_through_the_validated_reader(tmp_path: Path) -> None:
    """trainable.safetensors with two tensors on the same bytes is refused, as every safetensors file is."""
    from vlmo.errors import CheckpointError
    from vlmo.finetune.train import load_checkpoint

    model, optimizer, scheduler = _resume_target()
    header = {
        "weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    raw = json.dumps(header).encode()
    (tmp_path / "trainable.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    (tmp_path / "training_state.pt").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match="overlaps"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)


def test_cli_finetune_refuses_a_nan_learning_rate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlmo.cli.commands import app

    args = ["finetune", "--model", "vlmo/shapes", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run")]
    done = CliRunner().invoke(app, [*args, "--lr", "nan"])
    assert done.exit_code == 2 and done.output.strip() == "error: --lr must be a number > 0, got nan"
    assert not (tmp_path / "run").exists()
