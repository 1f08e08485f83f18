"""Images per second for `vlmo batch` at several batch sizes, against a plain loop over `VLMo.caption` and against a
transformers loop, on the same model and the same images, in one process.

    python benchmarks/batch.py --size shapes --runs 3                          # the built-in vlmo/shapes (seconds)
    python benchmarks/batch.py --size paligemma-3b --images 16 --hf-images 2 --runs 1   # random 3B weights (minutes)

Every mode captions the same `--images` scenes (`vlmo.demo.shapes`, sizes 160–400 px, so every image is resized),
greedy, at most `--max-new-tokens` tokens, after the model is loaded (load time is not counted):

- `batch-N`: what `vlmo batch --task caption --batch-size N --out x.jsonl` runs (`vlmo.batch.write_results`: the
  background image loader, padded batches, each batch appended and fsynced to a JSON Lines file);
- `loop`: `for image in images: vlm.caption(image)`, the loop a user writes by hand;
- `hf-loop`: the same loop over transformers' `PaliGemmaForConditionalGeneration.generate` (float32, one image at a
  time, `PaliGemmaProcessor`), on `--hf-images` of the images (a per-image rate does not need all of them).

vlmo runs in its CPU default mode (`quantize="auto"`: int8 on a CPU with fbgemm). With random weights (the 3B
sizes, `checkpoints.py`) answers rarely end early, so nearly every answer is `--max-new-tokens` long; the shapes
model's answers are its real captions (5–15 tokens). Rounds alternate the modes; the table shows medians, and the
ratio of each mode's images/s to the loop's measured in the same round. Results: benchmarks/results/batch-<size>.json.
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
            modes = ["loop", *(f"batch-{n}" for n in sizes)] + (["hf-loop"] if hf else [])
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                vlm.image_cache.clear()
                load1 = os.getloadavg()[0]  # other work on the machine shows here (runs are only as quiet as it)
                if mode == "loop":
                    seconds, count = time_loop(vlm, paths, args.max_new_tokens), len(paths)
                elif mode == "hf-loop":
                    assert hf is not None
                    seconds, count = hf.time(paths[:hf_images], args.max_new_tokens), hf_images
                else:
                    n = int(mode.split("-")[1])
                    seconds, count = time_batch(vlm, Path(tmp), n, args.max_new_tokens), len(paths)
                rows.append({"round": round_, "mode": mode, "images": count, "seconds": seconds, "load1_before": load1})
                print(f"round {round_} {mode}: {count / seconds:.3f} images/s", file=sys.stderr)
    rates = {
        m: [r["images"] / r["seconds"] for r in rows if r["mode"] == m] for m in dict.fromkeys(r["mode"] for r in rows)
    }
    loop_by_round = {r["round"]: r["images"] / r["seconds"] for r in rows if r["mode"] == "loop"}
    ratios = {
        m: statistics.median(r["images"] / r["seconds"] / loop_by_round[r["round"]] for r in rows if r["mode"] == m)
        for m in rates
    }
    summary = {m: {"images_s": statistics.median(v), "x_loop": ratios[m]} for m, v in rates.items()}
    env = {**environment(threads), "lscpu": lscpu()}
    out = args.out or HERE / "results" / f"batch-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("size", "images", "hf_images", "max_new_tokens", "runs")}
    out.write_text(json.dumps({**settings, "environment": env, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"| mode | images/s | × loop |  ({args.size}, {args.images} images, ≤ {args.max_new_tokens} new tokens, "
          f"medians of {args.runs})")  # fmt: skip
    print("|---|---|---|")
    for mode, m in summary.items():
        print(f"| {mode} | {m['images_s']:.3f} | {m['x_loop']:.2f} |")


if __name__ == "__main__":
    main()
