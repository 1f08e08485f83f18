"""What a CLI user feels: wall-clock from process start to the printed 8-token answer, for `vlmo ask` and for an
equivalent transformers script, each a fresh process, on the same random-weight checkpoint (`checkpoints.py`).

    python benchmarks/cold_start.py --size tiny --runs 1               # seconds; checks the harness
    python benchmarks/cold_start.py --size paligemma-3b --runs 3       # float32 checkpoint (PaliGemma 1 on the hub)
    python benchmarks/cold_start.py --size paligemma2-3b --runs 3      # bfloat16 checkpoint (PaliGemma 2)

Modes, alternated round by round (medians over `--runs`):
- vlmo-first: `vlmo ask` with an empty prepared-weights cache (`VLMO_CACHE` pointed at a fresh folder), so it
  prepares the int8 weights and writes the cache entry: the very first command on a machine;
- vlmo-second: the same command again, with the entry the first one wrote: every later command;
- vlmo-nocache: `vlmo ask --no-cache`, what every command cost before the cache;
- hf-float32: a transformers script (`PaliGemmaForConditionalGeneration` + `PaliGemmaProcessor`, float32, greedy,
  8 new tokens) that prints its answer.
Peak RSS is each process's own (`/usr/bin/time -f %M`). Page cache: the checkpoint is read once before the first
round, so every mode reads from memory, as a second command on a machine does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUESTION = "what is written on the sign next to the red car in this picture?"
MODES = ("vlmo-first", "vlmo-second", "vlmo-nocache", "hf-float32")
HF_SCRIPT = """
import sys
import torch, transformers
from PIL import Image
model_dir, image, question = sys.argv[1:4]
model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
proc = transformers.PaliGemmaProcessor(
    image_processor=transformers.models.siglip.SiglipImageProcessorPil.from_pretrained(model_dir),
    tokenizer=transformers.GemmaTokenizer(tokenizer_file=model_dir + "/tokenizer.json"),
)
inputs = proc(images=Image.open(image).convert("RGB"), text="answer en " + question, return_tensors="pt")
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
print(proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def command(mode: str, model_dir: Path, image: Path) -> list[str]:
    if mode == "hf-float32":
        return [sys.executable, "-c", HF_SCRIPT, str(model_dir), str(image), QUESTION]
    vlmo = str(Path(sys.executable).parent / "vlmo")
    extra = ["--no-cache"] if mode == "vlmo-nocache" else []
    return [vlmo, "ask", str(image), QUESTION, "--model", str(model_dir), "--max-tokens", "8", *extra]


def run(mode: str, model_dir: Path, image: Path, cache: Path) -> dict[str, Any]:
    """One fresh process; wall time from just before it starts to its exit (the answer is its last output)."""
    env = {**os.environ, "VLMO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        started = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *command(mode, model_dir, image)],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        peak_kb = int(Path(rss.name).read_text().split()[-1])
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"mode": mode, "wall_s": wall, "peak_rss_gb": peak_kb * 1024 / 1e9, "answer": done.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="tiny | paligemma-3b | paligemma2-3b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache" / "vlmo-bench")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/cold-start-<size>.json)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from bench import test_image
    from checkpoints import write_checkpoint

    model_dir = write_checkpoint(args.size, args.checkpoints / args.size)
    for file in sorted(model_dir.glob("*.safetensors")):  # into the page cache, for every mode alike
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vlmo-cold-") as tmp:
        image = Path(tmp) / "photo.png"
        test_image().save(image)
        for round_ in range(args.runs):
            cache = Path(tmp) / f"cache-{round_}"  # empty for vlmo-first, then warm for vlmo-second
            for mode in modes:
                row = run(mode, model_dir, image, cache if mode != "vlmo-nocache" else Path(tmp) / "unused")
                row["round"] = round_
                rows.append(row)
                print(f"round {round_} {mode}: {row['wall_s']:.2f} s, {row['peak_rss_gb']:.2f} GB", file=sys.stderr)
    medians = {
        mode: {key: statistics.median(r[key] for r in rows if r["mode"] == mode) for key in ("wall_s", "peak_rss_gb")}
        for mode in modes
    }
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version}
    out = args.out or HERE / "results" / f"cold-start-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "machine": machine, "medians": medians, "rows": rows}, indent=1))
    hf = medians.get("hf-float32", {}).get("wall_s")
    print(f"| mode | process start → 8-token answer, s | × transformers float32 | peak RSS GB |  ({args.size})")
    print("|---|---|---|---|")
    for mode, m in medians.items():
        ratio = f"{m['wall_s'] / hf:.2f} ×" if hf else "—"
        print(f"| {mode} | {m['wall_s']:.2f} | {ratio} | {m['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
