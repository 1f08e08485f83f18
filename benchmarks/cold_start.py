"""What a CLI user feels: wall-clock from process start to the printed 8-token answer, for `vlmo ask` and for an
equivalent transformers script, each a fresh process, on the same random-weight checkpoint (`checkpoints.py`).

    python benchmarks/cold_start.py --size tiny --runs 1               # seconds; checks the harness
    python benchmarks/cold_start.py --size paligemma-3b --runs 3       # float32 checkpoint (PaliGemma 1 on the hub)
    python benchmarks/cold_start.py --size paligemma2-3b --runs 3      # bfloat16 checkpoint (PaliGemma 2)

Modes, alternated round by round (medians over `--runs`):
- vlmo-first: `vlmo ask --keep-alive 0` with an empty prepared-weights cache (`VLMO_CACHE` pointed at a fresh
  folder), so it prepares the int8 weights and writes the cache entry: the very first command on a machine;
- vlmo-second: the same command again, with the entry the first one wrote: every later command without a resident
  model (`--keep-alive 0`);
- vlmo-nocache: `vlmo ask --keep-alive 0 --no-cache`, what every command cost before the cache;
- baseline-first / baseline-second: vlmo-first and vlmo-second run by another vlmo source tree (`--baseline-src`,
  e.g. a `git worktree` of the commit before the resident model), on PYTHONPATH: "today" in the same run;
- resident-first: `vlmo ask` with nothing resident and an empty cache: loads and keeps a resident model;
- resident-new-image: the next `vlmo ask`, about a new image, answered by the resident model;
- resident-same-image: a follow-up question about that image (its encoding is cached in the resident model);
- hf-float32: a transformers script (`PaliGemmaForConditionalGeneration` + `PaliGemmaProcessor`, float32, greedy,
  8 new tokens) that prints its answer.
Peak RSS is each process's own (`/usr/bin/time -f %M`); for the resident modes, the resident process's peak (VmHWM,
from `vlmo ps --json`, read before `vlmo stop` ends each round) is reported as `resident_peak_rss_gb`, and the
client's overhead (wall time minus the resident's own seconds for the request, from its log) as
`client_overhead_s`. Page cache: the checkpoint is read once before the first round, so every mode reads from
memory, as a second command on a machine does.
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
MODES = ("vlmo-first", "vlmo-second", "resident-first", "resident-new-image", "resident-same-image", "hf-float32")
FOLLOW_UP = "what color is the car on the left side of the road?"
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
    vlmo = [sys.executable, "-m", "vlmo"]  # the vlmo on PYTHONPATH for the baseline modes
    question = FOLLOW_UP if mode == "resident-same-image" else QUESTION
    extra = [] if mode.startswith("resident") else ["--keep-alive", "0"]
    extra += ["--no-cache"] if mode == "vlmo-nocache" else []
    if mode.startswith("baseline"):
        extra = []  # the vlmo before the resident model has no --keep-alive
    return [*vlmo, "ask", str(image), question, "--model", str(model_dir), "--max-tokens", "8", *extra]


def run(mode: str, model_dir: Path, image: Path, cache: Path, env: dict[str, str]) -> dict[str, Any]:
    """One fresh process; wall time from just before it starts to its exit (the answer is its last output)."""
    env = {**env, "VLMO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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


def _cpu() -> str:
    """The CPU's model name and the vector extensions that decide int8 speed (lscpu's words)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_int8")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def resident_seconds(runtime: Path) -> float:
    """The resident model's own time for its last request (its log line ends in the seconds it took)."""
    lines = [line for line in (runtime / "vlmo" / "resident.log").read_text().splitlines() if line.startswith("POST ")]
    return float(lines[-1].rsplit(" ", 1)[1].rstrip("s"))


def resident_memory(env: dict[str, str]) -> tuple[float, float]:
    """The resident process's peak RSS and its RSS now, GB (`vlmo ps --json`); then stop it."""
    listed = subprocess.run([sys.executable, "-m", "vlmo", "ps", "--json"], env=env, capture_output=True, text=True)
    (row,) = json.loads(listed.stdout)["resident"]
    subprocess.run([sys.executable, "-m", "vlmo", "stop"], env=env, capture_output=True, check=True)
    return row["peak_rss_bytes"] / 1e9, row["rss_bytes"] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="tiny | paligemma-3b | paligemma2-3b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache" / "vlmo-bench")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/cold-start-<size>.json)")
    parser.add_argument("--baseline-src", type=Path, help="another vlmo's src/ folder, for the baseline-* modes")
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
    last_resident = ([m for m in modes if m.startswith("resident")] or [None])[-1]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vlmo-cold-", dir="/tmp") as tmp:
        for round_ in range(args.runs):
            images = [Path(tmp) / f"photo-{round_}-{k}.png" for k in range(2)]  # new pictures every round
            for k, image in enumerate(images):
                test_image(seed=100 * round_ + k).save(image)
            runtime = Path(tmp) / f"run-{round_}"  # a fresh runtime folder: nothing resident
            runtime.mkdir(mode=0o700)
            env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
            baseline = {**env, "PYTHONPATH": str(args.baseline_src)} if args.baseline_src else env
            for mode in modes:
                # Two caches per round, each empty for its first mode and warm (written by it) for the modes after it:
                # one for the in-process modes (vlmo-*, baseline-*: one format), one for the resident model's.
                cache = Path(tmp) / f"cache-{round_}-{'resident' if mode.startswith('resident') else 'inproc'}"
                image = images[0] if mode in ("resident-first",) else images[1]
                if mode == "vlmo-nocache":
                    cache = Path(tmp) / "unused"
                row = run(mode, model_dir, image, cache, baseline if mode.startswith("baseline") else env)
                if mode in ("resident-new-image", "resident-same-image"):
                    row["client_overhead_s"] = row["wall_s"] - resident_seconds(runtime)
                if mode == last_resident:  # its peak, then stop it: the modes after it run without it
                    peak, now = resident_memory({**env, "VLMO_CACHE": str(cache)})
                    row["resident_peak_rss_gb"], row["resident_rss_gb"] = peak, now
                row["round"] = round_
                rows.append(row)
                print(f"round {round_} {mode}: {row['wall_s']:.2f} s, {row['peak_rss_gb']:.2f} GB", file=sys.stderr)
    keys = ("wall_s", "peak_rss_gb", "client_overhead_s", "resident_peak_rss_gb", "resident_rss_gb")
    medians = {
        mode: {
            key: statistics.median(r[key] for r in rows if r["mode"] == mode and key in r)
            for key in keys
            if any(key in r for r in rows if r["mode"] == mode)
        }
        for mode in modes
    }
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "python": sys.version}
    out = args.out or HERE / "results" / f"cold-start-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "machine": machine, "medians": medians, "rows": rows}, indent=1))
    hf = medians.get("hf-float32", {}).get("wall_s")
    print(f"| mode | process start → 8-token answer, s | × transformers float32 | peak RSS GB |  ({args.size})")
    print("|---|---|---|---|")
    for mode, m in medians.items():
        ratio = f"{m['wall_s'] / hf:.2f} ×" if hf else "—"
        print(f"| {mode} | {m['wall_s']:.2f} | {ratio} | {m['peak_rss_gb']:.2f} |")
    for mode, m in medians.items():
        if "client_overhead_s" in m:
            print(f"{mode}: client overhead {m['client_overhead_s']:.2f} s")
        if "resident_peak_rss_gb" in m:
            print(
                f"{mode}: resident process peak RSS {m['resident_peak_rss_gb']:.2f} GB, "
                f"{m['resident_rss_gb']:.2f} GB once answering"
            )


if __name__ == "__main__":
    main()
