"""Images per second for `vlmo batch` at several batch sizes, against static batches, a plain loop over
`VLMo.caption` and a transformers loop, on the same model and the same images, in one process.

    python benchmarks/batch.py --size shapes --runs 3                          # the built-in vlmo/shapes (seconds)
    python benchmarks/batch.py --size paligemma-3b --images 16 --hf-images 2 --runs 1   # random 3B weights (minutes)
    python benchmarks/batch.py --size paligemma-3b --answer-lengths 8:64 --images 24 --batch-sizes 8 --runs 3

Every mode captions the same `--images` scenes (`vlmo.demo.shapes`, sizes 160–400 px, so every image is resized),
greedy, at most `--max-new-tokens` tokens, after the model is loaded (load time is not counted):

- `batch-N`: what `vlmo batch --task caption --batch-size N --out x.jsonl` runs (`vlmo.batch.write_results`: the
  background image loader, continuous batching of N rows — a finished row's slot goes to the next image at the next
  step —, rows appended and fsynced N at a time to a JSON Lines file);
- `static-N`: the same images in static batches of N (`VLMo.run` on each N images in turn, what `vlmo batch` did
  before continuous batching): each batch waits for its longest answer before the next one starts (its finished
  rows leave the decode step, so this peer is, if anything, faster than the old padded batches);
- `loop`: `for image in images: vlm.caption(image)`, the loop a user writes by hand;
- `hf-loop`: the same loop over transformers' `PaliGemmaForConditionalGeneration.generate` (float32, one image at a
  time, `PaliGemmaProcessor`), on `--hf-images` of the images (a per-image rate does not need all of them).

vlmo runs in its CPU default mode (`quantize="auto"`: int8 on a CPU with fbgemm). With random weights (the 3B
sizes, `checkpoints.py`) answers never end early (the random decoder repeats one token), so every answer is
`--max-new-tokens` long and static and continuous batches do the same work. The shapes model's answers are its real
captions (5–15 tokens).

`--answer-lengths MIN:MAX` measures what continuous batching is for, answers of differing lengths, at any size: each
image's answer is made exactly n tokens long, n drawn uniformly from MIN..MAX (seeded, the same for both modes; the
engine's `ignore_eos`), and two modes run the same requests through the engine's loop (`Scheduler`):
- `continuous-N`: at most N rows at once, a finished row's slot refilled at the next step (what `vlmo batch` does);
- `static-N`: N requests at a time, the next N only when all have finished (what it did before).
Rounds alternate the modes; the table shows medians, and the
ratio of each mode's images/s to the loop's (and continuous to static) measured in the same round. Results:
benchmarks/results/batch-<size>.json (batch-<size>-lengths.json with --answer-lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def lscpu() -> dict[str, str]:
    """The machine as `lscpu` describes it (model, cores, the vector extensions the int8 kernels care about)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f in ("avx2", "fma") or f.startswith("avx512") or f.startswith("amx")]
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L3")
    return {**{k: fields[k] for k in keep if k in fields}, "simd": " ".join(simd)}


def write_images(folder: Path, count: int) -> list[Path]:
    from vlmo.demo.shapes import make_scene, render

    paths = []
    for i in range(count):
        path = folder / f"scene-{i:03d}.png"
        render(make_scene("bench", i, size=None)).save(path)
        paths.append(path)
    return paths


def time_batch(vlm: Any, folder: Path, batch_size: int, max_new_tokens: int) -> float:
    """Seconds for `vlmo batch` (the CLI's code path) over the folder, model already loaded."""
    from vlmo.batch import BatchJob, open_results, write_results
    from vlmo.batch.inputs import list_inputs

    job = BatchJob(task="caption", max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        results = open_results(Path(tmp) / "rows.jsonl", "caption", resume=False, force=False)
        started = time.perf_counter()
        summary = write_results(lambda: vlm, job, list_inputs(folder), results, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - started
        results.close()
    assert summary.errors == 0
    return seconds


def time_static(vlm: Any, paths: list[Path], batch_size: int, max_new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for static batches of `batch_size` (each waits for its longest answer), and the answers' lengths."""
    from vlmo import tasks

    lengths: list[int] = []
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[i : i + batch_size]]
        answers = vlm.run(chunk, [tasks.caption()] * len(chunk), max_new_tokens=max_new_tokens)
        lengths += [len(vlm.tokenize([a.text]).input_ids[0]) for a in answers]
    return time.perf_counter() - started, lengths


def time_engine(vlm: Any, paths: list[Path], lengths: list[int], batch_size: int, continuous: bool) -> float:
    """Seconds for the engine's loop over the images, answer i exactly `lengths[i]` tokens long, continuous or
    static batches of `batch_size`."""
    from collections import deque

    from PIL import Image

    from vlmo import tasks
    from vlmo.engine.scheduler import Collector, Scheduler

    scheduler = Scheduler(vlm, max_batch_size=batch_size, ignore_eos=True)
    sinks = [Collector() for _ in paths]
    images = [Image.open(p).convert("RGB") for p in paths]
    started = time.perf_counter()
    waiting = deque(
        scheduler.request(image, tasks.caption(), {"max_new_tokens": n}, sink)
        for image, n, sink in zip(images, lengths, sinks, strict=True)
    )
    while waiting or scheduler.running:
        if continuous or not scheduler.running:
            scheduler.step([waiting.popleft() for _ in range(min(scheduler.free, len(waiting)))])
        else:
            scheduler.step()
    seconds = time.perf_counter() - started
    assert [len(sink.finished().token_ids) for sink in sinks] == lengths
    return seconds


def time_loop(vlm: Any, paths: list[Path], max_new_tokens: int) -> float:
    started = time.perf_counter()
    for path in paths:
        vlm.caption(path, max_new_tokens=max_new_tokens)
    return time.perf_counter() - started


class HfLoop:
    """transformers' PaliGemma, float32, one image per `generate` call."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()
        self.proc = transformers.PaliGemmaProcessor(
            image_processor=transformers.models.siglip.SiglipImageProcessorPil.from_pretrained(model_dir),
            tokenizer=transformers.GemmaTokenizer(tokenizer_file=str(model_dir / "tokenizer.json")),
        )

    def time(self, paths: list[Path], max_new_tokens: int) -> float:
        from PIL import Image

        started = time.perf_counter()
        for path in paths:
            with Image.open(path) as image:
                inputs = self.proc(images=image.convert("RGB"), text="<image>caption en", return_tensors="pt")
            with self.torch.inference_mode():
                self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="shapes", help="shapes (the built-in model) | paligemma-3b | paligemma2-3b")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--hf-images", type=int, help="images for hf-loop (default: all; 0 skips it)")
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the caption task's default")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache" / "vlmo-bench")
    parser.add_argument("--answer-lengths", help="MIN:MAX: answers of n tokens, n uniform in MIN..MAX (engine modes)")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/batch-<size>.json)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from bench import environment

    from vlmo import VLMo
    from vlmo.demo import MODEL_DIR

    if args.size == "shapes":
        model_dir = MODEL_DIR
    else:
        from checkpoints import write_checkpoint

        model_dir = write_checkpoint(args.size, args.checkpoints / args.size)
    threads = torch.get_num_threads()
    sizes = [int(n) for n in args.batch_sizes.split(",")]
    hf_images = args.images if args.hf_images is None else args.hf_images
    lengths: list[int] = []
    if args.answer_lengths:
        import random

        low, high = (int(v) for v in args.answer_lengths.split(":"))
        lengths = [random.Random(i).randint(low, high) for i in range(args.images)]
        hf_images = 0
    started = time.perf_counter()
    vlm = VLMo.from_pretrained(model_dir)  # the CPU default mode
    print(f"loaded vlmo ({'int8' if vlm.quantized else vlm.dtype}) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)  # fmt: skip
    hf = HfLoop(model_dir) if hf_images else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vlmo-batch-bench-") as tmp:
        paths = write_images(Path(tmp), args.images)
        vlm.caption(paths[0], max_new_tokens=2)  # warm-up: first-call costs (thread pools, allocator) out of the runs
        for round_ in range(args.runs):
            statics = [f"static-{n}" for n in sizes if n > 1]
            modes = ["loop", *(f"batch-{n}" for n in sizes), *statics] + (["hf-loop"] if hf else [])
            if lengths:
                modes = [f"{kind}-{n}" for n in sizes for kind in ("continuous", "static")]
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                vlm.image_cache.clear()
                load1 = os.getloadavg()[0]  # other work on the machine shows here (runs are only as quiet as it)
                if mode == "loop":
                    seconds, count = time_loop(vlm, paths, args.max_new_tokens), len(paths)
                elif mode == "hf-loop":
                    assert hf is not None
                    seconds, count = hf.time(paths[:hf_images], args.max_new_tokens), hf_images
                elif lengths:
                    n = int(mode.split("-")[1])
                    seconds = time_engine(vlm, paths, lengths, n, continuous=mode.startswith("continuous"))
                    count = len(paths)
                elif mode.startswith("static-"):
                    seconds, lengths = time_static(vlm, paths, int(mode.split("-")[1]), args.max_new_tokens)
                    count = len(paths)
                else:
                    n = int(mode.split("-")[1])
                    seconds, count = time_batch(vlm, Path(tmp), n, args.max_new_tokens), len(paths)
                rows.append({"round": round_, "mode": mode, "images": count, "seconds": seconds, "load1_before": load1})
                if mode.startswith("static-"):
                    rows[-1]["answer_tokens"] = lengths  # with the separators the tokenizer adds; same for every mode
                print(f"round {round_} {mode}: {count / seconds:.3f} images/s", file=sys.stderr)
    rates = {
        m: [r["images"] / r["seconds"] for r in rows if r["mode"] == m] for m in dict.fromkeys(r["mode"] for r in rows)
    }
    loop_by_round = {r["round"]: r["images"] / r["seconds"] for r in rows if r["mode"] == "loop"}
    summary: dict[str, dict[str, float]] = {m: {"images_s": statistics.median(v)} for m, v in rates.items()}
    for m in rates if loop_by_round else ():
        mine = [r["images"] / r["seconds"] / loop_by_round[r["round"]] for r in rows if r["mode"] == m]
        summary[m]["x_loop"] = statistics.median(mine)
    for n in sizes:  # continuous against static batches of the same size, measured in the same round
        by_round = {r["round"]: r["seconds"] for r in rows if r["mode"] == f"static-{n}"}
        for kind in ("batch", "continuous"):
            mine = [r for r in rows if r["mode"] == f"{kind}-{n}" and r["round"] in by_round]
            if mine:
                paired = [by_round[r["round"]] / r["seconds"] for r in mine]
                summary[f"{kind}-{n}"]["x_static"] = statistics.median(paired)
    env = {**environment(threads), "lscpu": lscpu()}
    suffix = "-lengths" if lengths else ""  # the engine modes' results, beside the others'
    out = args.out or HERE / "results" / f"batch-{args.size}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ("size", "images", "hf_images", "max_new_tokens", "runs", "answer_lengths")
    settings = {**{k: getattr(args, k) for k in keys}, "lengths": lengths}
    out.write_text(json.dumps({**settings, "environment": env, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"| mode | images/s | × loop | × static |  ({args.size}, {args.images} images, "
          f"≤ {args.max_new_tokens} new tokens, medians of {args.runs})")  # fmt: skip
    print("|---|---|---|---|")
    for mode, m in summary.items():
        loop, static = (f"{m[k]:.2f}" if k in m else "" for k in ("x_loop", "x_static"))
        print(f"| {mode} | {m['images_s']:.3f} | {loop} | {static} |")


if __name__ == "__main__":
    main()
