"""Do the Dense Connector projector kinds help a fine-tune that needs spatial detail? PaliGemma's linear projector
against `sti`, `sci`, `dci` and `seed` (`vlmo.nn.projector`), on a task the base model was never trained for.

    python benchmarks/connector.py --jobs 2          # the first table: 15 runs + the base model, 30–50 min on 2 cores
    python benchmarks/connector.py --steps 1200 --variants 0.1:100,0.01:100,1:0 --no-base --jobs 2
        # the recipe's confounds (docs/finetune.md): 2× the steps; the branch at 0.1× and 0.01× the learning rate
        # after 100 steps alone; and at the same rate: 39 runs, about 1.5 h on this project's AVX-512 machine
    python benchmarks/connector.py --steps 5 --seeds 0 --kinds linear,sti --train-size 16 --heldout-size 16 \
        --jobs 1 --work /tmp/conn-smoke --out /tmp/conn-smoke.json        # smoke run: about a minute

Branch settings (connector kinds only; `--variants SCALE:WARMUP,…` runs several): `--branch-lr-scale` trains the
zero-initialised branch at that multiple of `--lr` (its own AdamW group), `--branch-warmup` trains it alone (all
else frozen) for that many first steps (`vlmo finetune --branch-lr-scale / --branch-warmup-steps`). Each run also
records `branch_norm`: the branch's mean output norm per image token against the linear path's, over 32 held-out
images, after training. `--merge A.json B.json` combines runs made by several invocations into one table.

The task: two kinds of question about `vlmo.demo.shapes` scenes (224×224) that the shipped `vlmo/shapes` model never
saw, both answerable only from where things are in the image:

    answer en which side is the {kind} on?                → left | right
    answer en is the {a} above or below the {b}?          → above | below

A side question is asked only when exactly one shape of that kind is in the scene and its box centre is at least
10 % of the width from the vertical midline; an above/below question only when exactly one `a` and one `b` (a ≠ b)
are in the scene and their box centres are at least 10 % of the height apart (`MARGIN`). One question per scene; the
four answers, hence the two question types, are balanced (`spatial_set`). Training data is a *fixed* set of
`--train-size` (400) questions from the scene stream "spatial-train": the point is generalisation from few examples
(LoRA alone on the decoder memorised 400 such examples and stayed at chance on new ones). Held out:
`--heldout-size` (400) questions from the stream "spatial-heldout".

Each projector kind × seed fine-tunes `--model` with `vlmo.finetune.finetune`, `train=("lora", "projector")`: LoRA
on the decoder's seven projections plus the whole projector (for a connector kind: PaliGemma's `linear` and the new,
zero-initialised branch, which `finetune` swaps in with `model.use_projector`). Same data, steps, batch, learning
rate and seeds for every kind. Then the run's `final/` (a PEFT adapter, with the connector projector's config and
weights in vlmo's files beside it) is loaded with `VLMo.from_pretrained(model, adapter=final/)` in float32 and
asked every held-out question (greedy, at most 8 new tokens) and every training question (to tell memorising from
learning). The base model, not fine-tuned, is evaluated once: the "before" row (chance is 50 % for a model that
answers with a word of the pair; the shipped model answers with colours and shapes, 0 %).

`vlmo/shapes`'s tokenizer has no pieces for left, right, above or below: they are spelled in characters, some of
whose (tied, frozen) embedding rows the shipped model never trained, so after fine-tuning the right character can
lead at a probability of only 0.1-0.2 (a per-token loss near 1 while greedy answers are right), and a misspelling
such as "rft" counts as hallucinated. A model whose vocabulary has these words avoids that.

Counted per run: exact-match accuracy (answer after `strip()`); blank answers (empty after `strip()`);
hallucinated answers (neither blank nor one of the two answers of the question asked), of which "wrong pair" is a
word of the other question type ("left" to an above/below question) and the rest is anything else; training seconds
(wall time of the `finetune` call, model load and export included); trainable parameters (the tensors `finetune`
selected, i.e. `requires_grad` after `vlmo.finetune.select_trainable`, counted on a fresh model built the same way
and checked against the run's `checkpoint-N/trainable.safetensors`, which holds exactly those tensors); total
parameters (every parameter of that model as it trains: base + LoRA factors + connector branch, the tied head once).

Every run is its own process with one torch thread, `--jobs` at a time; each writes under `--work/<kind>-s<seed>/`
(replaced on a rerun). Results go to `--out` (JSON, rewritten after every run, so a cut-short run keeps what
finished) and a Markdown table to stdout; progress to stderr.

Defaults: 600 steps of batch 16 (24 passes over the 400 questions), AdamW at a peak of 2e-3 after 20 warm-up steps,
cosine decay to 0, LoRA rank 8 (alpha 16). In short trials of the linear run (seed 0, on the first round's model),
300 steps at 1e-3 reached 59.8 % held out, 300 at 2e-3 74.8 %, 600 at 2e-3 79.0 % (side questions 97 %, above/below
61 %).

How long: on this project's 2-core machines (AMD EPYC, 1 thread per run) a step of batch 16 costs 0.30 s of CPU
time with AVX-512 and about 0.55 s with AVX2 only, and loading plus the 800 answers about 10 s, so a run takes
3.3–6 min; 15 runs + the base model with `--jobs 2`: 28 min (AVX-512) to 48 min (AVX2) on an otherwise idle
machine (the run's wall and CPU seconds are both recorded: a gap between them means the machine was shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmo.data.examples import Example
from vlmo.demo.shapes import SHAPES, Scene, Shape, make_scene, render

HERE = Path(__file__).resolve().parent
KINDS = ("linear", "sti", "sci", "dci", "seed")
SIDE = ("left", "right")
VERTICAL = ("above", "below")
# Quota order when the set size is not a multiple of 4: alternate the question types, so they stay balanced too.
ANSWERS = ("left", "above", "right", "below")
MARGIN = 0.10  # a shape's distance from the midline (side) or from the other shape (vertical), × the image side
TRAIN_STREAM, HELDOUT_STREAM = "spatial-train", "spatial-heldout"
SCENE_SIZE = (224, 224)
MAX_NEW_TOKENS = 8  # the answers are 4-5 tokens ("left" is spelled in characters by the demo tokenizer)


# -- the questions -------------------------------------------------------------------------------------------------


def _only(scene: Scene, kind: str) -> Shape | None:
    found = [s for s in scene.shapes if s.kind == kind]
    return found[0] if len(found) == 1 else None


def side_answer(scene: Scene, kind: str) -> str | None:
    """`left`/`right` for "which side is the {kind} on?", or None when the question is not asked (no single such
    shape, or its box centre within `MARGIN` × width of the vertical midline)."""
    shape = _only(scene, kind)
    if shape is None:
        return None
    offset = shape.centre_x - scene.width / 2
    if abs(offset) < MARGIN * scene.width:
        return None
    return "left" if offset < 0 else "right"


def vertical_answer(scene: Scene, a: str, b: str) -> str | None:
    """`above`/`below` for "is the {a} above or below the {b}?" (image y grows downwards), or None when it is not
    asked (a = b, not exactly one of each, or box centres less than `MARGIN` × height apart vertically)."""
    first, second = _only(scene, a), _only(scene, b)
    if a == b or first is None or second is None:
        return None
    dy = (first.box[1] + first.box[3]) / 2 - (second.box[1] + second.box[3]) / 2
    if abs(dy) < MARGIN * scene.height:
        return None
    return "above" if dy < 0 else "below"


def scene_questions(scene: Scene) -> list[tuple[str, str]]:
    """Every (prompt, answer) the rules allow for `scene`."""
    out = []
    for kind in SHAPES:
        answer = side_answer(scene, kind)
        if answer is not None:
            out.append((f"answer en which side is the {kind} on?", answer))
    for a in SHAPES:
        for b in SHAPES:
            answer = vertical_answer(scene, a, b)
            if answer is not None:
                out.append((f"answer en is the {a} above or below the {b}?", answer))
    return out


@dataclass(frozen=True)
class SpatialQuestion:
    stream: str
    index: int  # the scene is make_scene(stream, index, SCENE_SIZE)
    scene: Scene
    prefix: str
    answer: str


def spatial_set(stream: str, size: int) -> list[SpatialQuestion]:
    """`size` questions, one per scene, from scenes 0, 1, 2, … of `stream`, with each answer's quota size // 4 (the
    remainder goes to the first answers of `ANSWERS`, alternating the question types). A scene is asked, among the
    answers it allows whose quota is not yet full, the one with the most left to fill (ties broken at random), then
    one of that answer's questions at random; a scene that allows none is skipped. Pure function of its arguments."""
    quota = {a: size // 4 + (i < size % 4) for i, a in enumerate(ANSWERS)}
    out: list[SpatialQuestion] = []
    index = 0
    while len(out) < size:
        scene = make_scene(stream, index, SCENE_SIZE)
        rng = random.Random(f"{stream}:question:{index}")
        by_answer: dict[str, list[str]] = {}
        for prefix, answer in scene_questions(scene):
            if quota[answer] > 0:
                by_answer.setdefault(answer, []).append(prefix)
        if by_answer:
            most = max(quota[a] for a in by_answer)
            answer = rng.choice(sorted(a for a in by_answer if quota[a] == most))
            out.append(SpatialQuestion(stream, index, scene, rng.choice(by_answer[answer]), answer))
            quota[answer] -= 1
        index += 1
    return out


class SpatialDataset:
    """A fixed list of questions as a `finetune` dataset (`get` ignores the epoch: the same 400 every pass)."""

    def __init__(self, questions: Sequence[SpatialQuestion]) -> None:
        self.questions = list(questions)
        self.images = [render(q.scene) for q in self.questions]

    def __len__(self) -> int:
        return len(self.questions)

    def get(self, index: int, epoch: int) -> Example:
        q = self.questions[index]
        return Example(self.images[index], q.prefix, q.answer)


def score(questions: Sequence[SpatialQuestion], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact match after `strip()`, and what the wrong answers were."""
    correct = blank = wrong_pair = other = 0
    examples: list[dict[str, str]] = []
    for q, raw in zip(questions, predictions, strict=True):
        p = raw.strip()
        pair = SIDE if q.answer in SIDE else VERTICAL
        if p == q.answer:
            correct += 1
        elif not p:
            blank += 1
        elif p not in pair:
            if p in SIDE + VERTICAL:
                wrong_pair += 1
            else:
                other += 1
            if len(examples) < 5:
                examples.append({"prompt": q.prefix, "answer": q.answer, "prediction": raw})

    def accuracy(pair: tuple[str, str]) -> float | None:
        rows = [(q, p) for q, p in zip(questions, predictions, strict=True) if q.answer in pair]
        return sum(p.strip() == q.answer for q, p in rows) / len(rows) if rows else None

    n = len(questions)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "side_accuracy": accuracy(SIDE),
        "vertical_accuracy": accuracy(VERTICAL),
        "blank": blank,
        "hallucinated": wrong_pair + other,
        "wrong_pair": wrong_pair,
        "answers": dict(Counter(p.strip() for p in predictions).most_common(8)),
        "hallucination_examples": examples,
    }


# -- one run (a worker process) ------------------------------------------------------------------------------------


def evaluate(vlm: Any, questions: Sequence[SpatialQuestion], batch_size: int = 32) -> list[str]:
    predictions: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        images = [render(q.scene) for q in chunk]
        predictions += vlm.generate(images, [q.prefix for q in chunk], max_new_tokens=MAX_NEW_TOKENS)
    return predictions


def parameter_counts(model: str, cfg: Any) -> tuple[int, int]:
    """(trainable, total) for `cfg`: the model built as `finetune` builds it, the parameters it selects."""
    from vlmo import VLMo
    from vlmo.finetune import select_trainable

    net = VLMo.from_pretrained(model, device="cpu", dtype="float32", quantize="none").model
    if cfg.projector != net.cfg.projector.kind:
        net.use_projector(cfg.projector)
    trainable = select_trainable(net, cfg)
    return sum(p.numel() for _, p in trainable), sum(p.numel() for p in net.parameters())


def branch_norms(vlm: Any, questions: Sequence[SpatialQuestion], count: int = 32) -> dict[str, float] | None:
    """How strong the connector's branch is against the linear path after training: the mean L2 norm per image
    token of `linear(features)` and of `branch(features, hidden_states)` over the first `count` held-out images,
    and their ratio. None for the linear projector (no branch)."""
    import torch

    from vlmo.nn.projector import DenseProjector
    from vlmo.processing import preprocess_images

    projector = vlm.model.projector
    if not isinstance(projector, DenseProjector):
        return None
    pixels = preprocess_images([render(q.scene) for q in questions[:count]], vlm.image_config)
    with torch.inference_mode():
        features, hidden = vlm.model.vision(pixels.to(vlm.device, vlm.dtype), output_hidden_states=True)
        linear = projector.linear(features).norm(dim=-1).mean().item()
        branch = projector.branch(features, hidden).norm(dim=-1).mean().item()
    return {"linear": linear, "branch": branch, "ratio": branch / linear}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one kind with one seed (or, for kind "base", nothing) and evaluate it; returns the run's row."""
    import torch

    torch.set_num_threads(1)
    from vlmo import VLMo
    from vlmo.finetune import FinetuneConfig, finetune
    from vlmo.weights.safetensors_io import open_tensors

    train = spatial_set(TRAIN_STREAM, spec["train_size"])
    heldout = spatial_set(HELDOUT_STREAM, spec["heldout_size"])
    row: dict[str, Any] = {"kind": spec["kind"], "seed": spec["seed"]}
    if spec["kind"] not in ("base", "linear"):
        row |= {"branch_lr_scale": spec["branch_lr_scale"], "branch_warmup": spec["branch_warmup"]}
    adapter = None
    if spec["kind"] != "base":
        out = Path(spec["out"])
        shutil.rmtree(out, ignore_errors=True)  # this run's own folder: a rerun starts afresh
        cfg = FinetuneConfig(
            model=spec["model"],
            out=str(out),
            train=("lora", "projector"),
            projector=spec["kind"],
            lora_r=spec["lora_r"],
            lora_alpha=2.0 * spec["lora_r"],
            lr=spec["lr"],
            warmup_steps=spec["warmup"],
            **(branch_options(spec) if spec["kind"] != "linear" else {}),
            steps=spec["steps"],
            batch_size=spec["batch_size"],
            seed=spec["seed"],
            device="cpu",
            progress=False,
        )
        trainable, total = parameter_counts(spec["model"], cfg)
        data = SpatialDataset(train)
        started, cpu = time.perf_counter(), time.process_time()
        result = finetune(cfg, dataset=data)
        row["train_seconds"] = time.perf_counter() - started
        row["train_cpu_seconds"] = time.process_time() - cpu
        saved = open_tensors(out / f"checkpoint-{result.steps}" / "trainable.safetensors")
        assert sum(t.numel() for t in saved.values()) == trainable, "the rebuilt selection differs from the run's"
        row |= {"trainable_params": trainable, "total_params": total}
        row["final_loss"] = statistics.fmean(result.losses[-10:])  # per target token, last 10 steps
        adapter = out / "final"
    started = time.perf_counter()
    vlm = VLMo.from_pretrained(spec["model"], device="cpu", dtype="float32", quantize="none", adapter=adapter)
    row["loaded_projector"] = vlm.model.cfg.projector.kind
    if spec["kind"] != "base" and row["loaded_projector"] != spec["kind"]:
        raise SystemExit(f"{adapter} loaded back with a {row['loaded_projector']!r} projector, not {spec['kind']!r}")
    if spec["kind"] == "base":
        row["total_params"] = sum(p.numel() for p in vlm.model.parameters())
    row["branch_norm"] = branch_norms(vlm, heldout)
    row["heldout"] = score(heldout, evaluate(vlm, heldout))
    row["train"] = score(train, evaluate(vlm, train))
    row["eval_seconds"] = time.perf_counter() - started
    row["load1_after"] = os.getloadavg()[0]  # other work on the machine shows here
    return row


def branch_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The connector kinds' branch settings (`FinetuneConfig.branch_lr_scale`, `branch_warmup_steps`)."""
    return {"branch_lr_scale": spec["branch_lr_scale"], "branch_warmup_steps": spec["branch_warmup"]}


def run_name(spec: dict[str, Any]) -> str:
    """A run's folder: kind, seed, and the settings that differ between the table's variants."""
    name = f"{spec['kind']}-s{spec['seed']}-{spec['steps']}st"
    if spec["kind"] != "linear":
        name += f"-b{spec['branch_lr_scale']:g}-w{spec['branch_warmup']}"
    return name


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """`worker(spec)` in a fresh process with one torch (and OpenMP) thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {spec['kind']} seed {spec['seed']} failed (exit {done.returncode}); see above")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -----------------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], kinds: Sequence[str]) -> str:
    """Held-out accuracy in %, mean ± sample std over seeds, then each seed's; side / above-below and the training
    set's accuracy as means over seeds; blank and hallucinated answers summed over seeds."""
    lines = [
        "| kind | held-out accuracy (mean ± std) | per seed | side / above-below | train-set accuracy | blank "
        "| hallucinated / wrong pair | branch / linear norm | train s (median) | trainable params | total params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ["base", *kinds]:
        runs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["seed"])
        if not runs:
            continue
        acc = [100 * r["heldout"]["accuracy"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        per_seed = ", ".join(f"{a:.1f}" for a in acc)
        train_acc = statistics.fmean(100 * r["train"]["accuracy"] for r in runs)
        side = statistics.fmean(100 * (r["heldout"]["side_accuracy"] or 0.0) for r in runs)
        vertical = statistics.fmean(100 * (r["heldout"]["vertical_accuracy"] or 0.0) for r in runs)
        blank = sum(r["heldout"]["blank"] for r in runs)
        halluc = f"{sum(r['heldout']['hallucinated'] for r in runs)} / {sum(r['heldout']['wrong_pair'] for r in runs)}"
        n = sum(r["heldout"]["n"] for r in runs)
        trained = kind != "base"
        seconds = f"{statistics.median(r['train_seconds'] for r in runs):.0f}" if trained else "—"
        trainable = f"{runs[0]['trainable_params']:,}" if trained else "0"
        name = "base (no fine-tuning)" if kind == "base" else kind
        ratios = [r["branch_norm"]["ratio"] for r in runs if r.get("branch_norm")]
        ratio = f"{statistics.fmean(ratios):.3f}" if ratios else "—"
        lines.append(
            f"| {name} | {statistics.fmean(acc):.1f} % ± {std:.1f} | {per_seed} | {side:.1f} / {vertical:.1f} "
            f"| {train_acc:.1f} % | {blank} "
            f"| {halluc} (of {n}) | {ratio} | {seconds} | {trainable} | {runs[0]['total_params']:,} |"
        )
    return "\n".join(lines)


def parse_variants(text: str) -> list[tuple[float, int]]:
    """ "0.1:100,1:0" → [(0.1, 100), (1.0, 0)]: the branch's learning-rate scale and warm-up steps of each variant."""
    variants = []
    for part in text.split(","):
        scale, _, warm = part.strip().partition(":")
        variants.append((float(scale), int(warm or 0)))
    return variants


def variant_label(row: dict[str, Any]) -> str:
    """A row's kind, with its branch's settings for a connector kind (× the learning rate, warm-up steps)."""
    scale, warm = row.get("branch_lr_scale", 1.0), row.get("branch_warmup", 0)
    if row["kind"] in ("base", "linear"):
        return row["kind"]
    if scale == 1.0 and warm == 0:
        return f"{row['kind']} (branch at the full rate)"
    return f"{row['kind']} (branch lr ×{scale:g}, warm-up {warm})"


def labelled(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows with each kind labelled by its variant, and the labels in table order (kind, then variant)."""
    out = [{**r, "kind": variant_label(r)} for r in rows]
    order = {k: i for i, k in enumerate(KINDS)}
    keys = {variant_label(r): (order.get(r["kind"], -1), -r.get("branch_lr_scale", 1.0), r.get("branch_warmup", 0))
            for r in rows if r["kind"] != "base"}  # fmt: skip
    return out, sorted(keys, key=keys.__getitem__)


def merge(files: list[Path], out: Path) -> None:
    """Combine results files (runs of the same settings split over several invocations) into `out`."""
    reports = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    merged = {**reports[0], "command": [r["command"] for r in reports], "runs": [], "failed": []}
    for r in reports:
        settings = r.get("settings", {})
        for row in r["runs"]:  # files written before rows carried their variant: it is in the run's settings
            if row["kind"] not in ("base", "linear"):
                row.setdefault("branch_lr_scale", settings.get("branch_lr_scale", 1.0))
                row.setdefault("branch_warmup", settings.get("branch_warmup", 0))
        merged["runs"] += r["runs"]
        merged["failed"] += r.get("failed", [])
    merged["wall_seconds"] = sum(r.get("wall_seconds", 0.0) for r in reports)
    out.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    print(table(*labelled(merged["runs"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlmo/shapes", help="base model to fine-tune (default vlmo/shapes)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"projector kinds (default {','.join(KINDS)})")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps (default 20)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank; alpha is 2 × rank (default 8)")
    parser.add_argument(
        "--branch-lr-scale", type=float, default=1.0, help="connector kinds: the branch's learning rate × --lr (1)"
    )
    parser.add_argument(
        "--branch-warmup", type=int, default=0, help="connector kinds: steps that train the branch alone first (0)"
    )
    parser.add_argument(
        "--variants",
        help="connector kinds: several branch settings in one run, SCALE:WARMUP comma-separated (e.g. 0.1:100,1:0); "
        "default: --branch-lr-scale:--branch-warmup",
    )
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="no runs: combine these results files into --out and print the table"
    )
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--heldout-size", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process of one thread each")
    parser.add_argument("--work", type=Path, default=Path("runs/connector"), help="run folders (runs/connector)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "connector.json", help="JSON results")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's evaluation")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"--kinds takes some of {', '.join(KINDS)}; got {args.kinds!r}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.merge:
        merge(args.merge, args.out)
        return
    variants = parse_variants(args.variants) if args.variants else [(args.branch_lr_scale, args.branch_warmup)]
    sys.path.insert(0, str(HERE))
    from batch import lscpu
    from bench import environment

    names = ("model", "steps", "batch_size", "lr", "warmup", "lora_r")
    settings = {k: getattr(args, k) for k in names}
    settings |= {"train_size": args.train_size, "heldout_size": args.heldout_size}
    specs = [] if args.no_base else [{**settings, "kind": "base", "seed": None, "out": None}]
    # Seed-major order: with --jobs 2 each kind shares the machine with the same mix of other runs.
    specs += [
        {**settings, "kind": kind, "seed": seed, "branch_lr_scale": scale, "branch_warmup": warm}
        for seed in seeds
        for kind in kinds
        for scale, warm in (variants if kind != "linear" else [(1.0, 0)])
    ]
    for spec in specs:
        if spec["kind"] != "base":
            spec["out"] = str((args.work / run_name(spec)).resolve())
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings
        | {"kinds": kinds, "seeds": seeds, "variants": variants, "jobs": args.jobs, "margin": MARGIN}
        | {"max_new_tokens": MAX_NEW_TOKENS},
        "environment": {**environment(1), "lscpu": lscpu(), "load1_at_start": os.getloadavg()[0]},
        "runs": [],
        "failed": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"{len(specs)} runs, {args.jobs} at a time; run folders in {args.work}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_job, spec): spec for spec in specs}
        for future in as_completed(futures):
            spec, elapsed = futures[future], f"[{time.perf_counter() - started:6.0f} s]"
            try:
                row = future.result()
            except (RuntimeError, ValueError) as e:  # one failed run: report it, keep the others
                print(f"{elapsed} {spec['kind']} seed {spec['seed']} failed: {e}", file=sys.stderr)
                report["failed"].append({"kind": spec["kind"], "seed": spec["seed"], "error": str(e)})
            else:
                report["runs"].append(row)
                seconds = row.get("train_seconds")
                name = row["kind"] if row["seed"] is None else f"{row['kind']} s{row['seed']}"
                print(f"{elapsed} {name}: held-out {100 * row['heldout']['accuracy']:.1f} %"
                      f", train set {100 * row['train']['accuracy']:.1f} %"
                      + (f", trained in {seconds:.0f} s" if seconds is not None else ""), file=sys.stderr)  # fmt: skip
            report["wall_seconds"] = time.perf_counter() - started
            args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table(*labelled(report["runs"])))
    print(f"results: {args.out} ({(time.perf_counter() - started) / 60:.1f} min)", file=sys.stderr)
    if report["failed"]:
        raise SystemExit(f"{len(report['failed'])} run(s) failed: see {args.out}")


if __name__ == "__main__":
    main()
