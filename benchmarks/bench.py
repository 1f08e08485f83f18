"""vlmo against transformers on the same random-weight checkpoint, same machine, same run.

    python benchmarks/bench.py --size tiny                          # seconds; checks the harness
    python benchmarks/bench.py --size paligemma-3b --runs 3         # the numbers in docs/benchmarks.md
    python benchmarks/bench.py --size paligemma2-3b --modes vlmo-int8,hf-bfloat16
    python benchmarks/bench.py --size paligemma-3b --device cuda --checkpoint-dtype bfloat16 \
        --modes vlmo-bfloat16,hf-bfloat16                           # on a GPU (benchmarks/gpu.sh)

Each measurement is a fresh process (so peak RSS is the whole process's, load included) that loads the model,
then answers one request: a 640×480 image and a 12-token prompt, greedy, exactly `--new-tokens` tokens (no early
stop). It reports load time, peak RSS, time to first token (image preprocessing + vision tower + prefill + first
token), decode tokens/s after the first token, and the end-to-end time of an 8-token answer (from the raw image to
the 8th token). Modes run alternately (`--runs` rounds), and the table shows medians and ratios against
transformers' float32 and bfloat16 rows. The checkpoint is written once into `--cache` (`checkpoints.py`).

What a CLI user feels end to end (process start to the printed answer, first and second call with the prepared-
weights cache) is measured by `cold_start.py` beside this file.

Modes: vlmo-float32, vlmo-bfloat16, vlmo-int8 (`quantize="int8"`), vlmo-auto (vlmo's defaults), hf-float32,
hf-bfloat16 (transformers' PaliGemmaForConditionalGeneration + PaliGemmaProcessor, its default sdpa attention).

`--device cuda` runs the models on the GPU (vlmo-int8 is CPU-only). Times are taken after
`torch.cuda.synchronize()`, and each process answers the request twice: the first answer pays CUDA's one-time
start-up (kernel loading, cuBLAS handles) and is reported as `cold_ttft_s`/`cold_e2e8_s`; the other metrics are
the second answer's (the vision tower runs again: vlmo's image cache is cleared). Peak GPU memory is
`torch.cuda.max_memory_allocated()` (`peak_gpu_gb`). On the CPU each process answers once, as before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_MODES = "vlmo-auto,vlmo-float32,vlmo-bfloat16,vlmo-int8,hf-float32,hf-bfloat16"
PROMPT = "answer en what is written on the sign next to the red car in this picture?"
METRICS = ("load_s", "peak_rss_gb", "ttft_s", "decode_tok_s", "e2e8_s")
CUDA_METRICS = ("peak_gpu_gb", "cold_ttft_s", "cold_e2e8_s")


def test_image(seed: int = 0):  # noqa: ANN201 - PIL type
    """A 640×480 noise image (seeded): every request preprocesses a real resize, like a photo would."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (640, 480), bytes(pixels.flatten().tolist()))


def worker(mode: str, model_dir: str, new_tokens: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """One measurement in this process (see module docstring); returns the metrics and what the model holds."""
    import torch

    torch.set_num_threads(threads)
    engine, _, kind = mode.partition("-")
    image = test_image()
    cuda = device == "cuda"
    requests = 2 if cuda else 1  # on a GPU: a cold answer, then the measured one

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    answers: list[tuple[float, list[float]]] = []  # per answer: its start and each token's time
    if engine == "vlmo":
        from vlmo import VLMo, tasks
        from vlmo.engine.scheduler import Collector, Scheduler

        options: dict[str, Any] = {"quantize": "int8"} if kind == "int8" else {"dtype": kind}
        vlm = VLMo.from_pretrained(model_dir, device=device, progress=False, **options)
        sync()
        load = time.perf_counter() - started
        weights = _held_bytes(vlm.model)
        for _ in range(requests):
            vlm.image_cache.clear()
            times: list[float] = []
            t0 = time.perf_counter()
            # The engine's loop, every answer exactly `new_tokens` long (no <eos>), a time after every token.
            scheduler = Scheduler(vlm, max_batch_size=1, ignore_eos=True)
            request = scheduler.request(image, tasks.raw(PROMPT), {"max_new_tokens": new_tokens}, Collector())
            scheduler.step([request])
            sync()
            times.append(time.perf_counter())
            while scheduler.running:
                scheduler.step()
                sync()
                times.append(time.perf_counter())
            answers.append((t0, times))
        described = f"{vlm.dtype}".removeprefix("torch.") + (" + int8" if kind in ("int8", "auto") and
                                                              _quantized(vlm.model) else "")  # fmt: skip
    elif engine == "hf":
        import transformers

        dtype = getattr(torch, kind)
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
        if cuda:
            model.to(device)
        proc = transformers.PaliGemmaProcessor(
            image_processor=transformers.models.siglip.SiglipImageProcessorPil.from_pretrained(model_dir),
            tokenizer=transformers.GemmaTokenizer(tokenizer_file=str(Path(model_dir) / "tokenizer.json")),
        )
        sync()
        load = time.perf_counter() - started
        weights = sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())  # tied head once

        class Clock(transformers.LogitsProcessor):
            def __init__(self, times: list[float]) -> None:
                self.times = times

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                sync()
                self.times.append(time.perf_counter())
                return scores

        for _ in range(requests):
            times = []
            t0 = time.perf_counter()
            inputs = proc(images=image, text=PROMPT, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            if cuda:
                inputs = inputs.to(device)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               logits_processor=[Clock(times)], pad_token_id=0)  # fmt: skip
            answers.append((t0, times))
        described = kind
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    for _, times in answers:
        if len(times) != new_tokens:
            raise SystemExit(f"{mode}: produced {len(times)} tokens, expected {new_tokens}")
    t0, times = answers[-1]
    result = {
        "mode": mode,
        "holds": described,
        "load_s": load,
        "peak_rss_gb": peak_rss() / 1e9,
        "weights_gb": weights / 1e9,
        "ttft_s": times[0] - t0,
        "decode_tok_s": (new_tokens - 1) / (times[-1] - times[0]),
        "e2e8_s": times[min(7, new_tokens - 1)] - t0,
    }
    if cuda:
        cold_t0, cold = answers[0]
        result |= {
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
            "cold_ttft_s": cold[0] - cold_t0,
            "cold_e2e8_s": cold[min(7, new_tokens - 1)] - cold_t0,
        }
    return result


def peak_rss() -> int:
    """This process's peak resident set in bytes. Linux: VmHWM, which starts afresh at exec; `ru_maxrss` would
    carry over the parent's peak (e.g. the parent that just wrote the checkpoint)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _quantized(model: Any) -> bool:
    from vlmo.nn.quant import is_quantized

    return is_quantized(model)


def _held_bytes(model: Any) -> int:
    """Bytes of weights the model holds: parameters and buffers, fbgemm's packed int8 matrices, float16 weights."""
    from vlmo.nn.quant import Float16Linear, Int8Linear

    total = sum(t.nbytes for t in model.state_dict().values())
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + 8 * m.out_features
        elif isinstance(m, Float16Linear) and m is not model.text.lm_head:  # the tied head shares the embedding
            total += m.weight16.nbytes
    return total + (model.text.embed.weight16.nbytes if hasattr(model.text.embed, "weight16") else 0)


def run_one(mode: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", mode, "--model-dir", str(model_dir),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--device", args.device]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(results: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        if rows:
            keys = (*METRICS, "weights_gb", *(k for k in CUDA_METRICS if k in rows[0]))
            out[mode] = {k: statistics.median(r[k] for r in rows) for k in keys}
            out[mode]["holds"] = rows[0]["holds"]  # type: ignore[assignment]
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The markdown table of docs/benchmarks.md; with CUDA results, peak GPU memory and the cold first answer too."""
    gpu = any("peak_gpu_gb" in m for m in summary.values())
    extra = " peak GPU GB | cold TTFT s | cold 8-token answer s |" if gpu else ""
    lines = [
        "| mode | weights held | load s | peak RSS GB | TTFT s | decode tok/s | 8-token answer s "
        "| e2e ÷ hf fp32 | TTFT ÷ hf fp32 | decode × hf bf16 |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * 3 * gpu,
    ]
    f32, b16 = summary.get("hf-float32"), summary.get("hf-bfloat16")
    d = 3 if gpu else 2  # decimals of the answer times: a GPU answers in tens of milliseconds
    for mode, m in summary.items():
        e2e = f"{m['e2e8_s'] / f32['e2e8_s']:.2f}" if f32 else "–"
        ttft = f"{m['ttft_s'] / f32['ttft_s']:.2f}" if f32 else "–"
        dec = f"{m['decode_tok_s'] / b16['decode_tok_s']:.2f}" if b16 else "–"
        line = (
            f"| {mode} | {m['holds']}, {m['weights_gb']:.2f} GB | {m['load_s']:.2f} | {m['peak_rss_gb']:.2f} "
            f"| {m['ttft_s']:.{d}f} | {m['decode_tok_s']:.2f} | {m['e2e8_s']:.{d}f} | {e2e} | {ttft} | {dec} |"
        )
        if gpu:
            line += f" {m['peak_gpu_gb']:.2f} | {m['cold_ttft_s']:.3f} | {m['cold_e2e8_s']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def environment(threads: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": threads,
    }
    if device == "cuda":
        env |= {"device": "cuda", "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    import vlmo

    env["vlmo"] = vlmo.__version__
    return env


def check_cuda(modes: list[str]) -> None:
    """Exit with one line when `--device cuda` cannot run here or a mode cannot run on a GPU."""
    import torch

    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SystemExit(f"bench.py: --device cuda: {why} (torch {torch.__version__}); use --device cpu")
    cpu_only = [m for m in modes if m == "vlmo-int8"]
    if cpu_only:
        raise SystemExit(f"bench.py: --device cuda: {', '.join(cpu_only)} runs on the CPU only; drop it from --modes")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="tiny | paligemma-3b | paligemma2-3b")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated (default {DEFAULT_MODES})")
    parser.add_argument("--runs", type=int, default=3, help="rounds over all modes (medians)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per answer (≥ 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run (default cpu)")
    parser.add_argument("--checkpoint-dtype", choices=("float32", "bfloat16"),
                        help="dtype the checkpoint is written in (default: as on the hub for --size)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlmo-bench")
    parser.add_argument("--out", type=Path, help="JSON results file (default: benchmarks/results/<size>.json, "
                        "<size>-cuda.json with --device cuda)")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.new_tokens, args.threads, args.device)))
        return
    if args.new_tokens < 8:
        parser.error("--new-tokens must be at least 8 (the 8-token answer is one of the metrics)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.device == "cuda":
        check_cuda(modes)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: measuring vlmo only", file=sys.stderr)
        modes = [m for m in modes if not m.startswith("hf-")]
    sys.path.insert(0, str(HERE))
    from checkpoints import write_checkpoint

    name = args.size if args.checkpoint_dtype is None else f"{args.size}-{args.checkpoint_dtype}"
    print(f"checkpoint {name} in {args.cache / name} …", file=sys.stderr)
    model_dir = write_checkpoint(args.size, args.cache / name, dtype=args.checkpoint_dtype, device=args.device)
    out = args.out or HERE / "results" / (f"{args.size}-cuda.json" if args.device == "cuda" else f"{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for run in range(args.runs):
        for mode in modes:
            r = run_one(mode, model_dir, args)
            print(f"run {run + 1}/{args.runs} {mode}: " + ", ".join(f"{k} {r[k]:.3g}" for k in METRICS),
                  file=sys.stderr, flush=True)  # fmt: skip
            results.append(r)
        # Written after every round: a run cut short by a time limit still leaves its finished rounds.
        summary = summarize(results, modes)
        report = {"size": args.size, "command": " ".join(sys.argv), "new_tokens": args.new_tokens,
                  "environment": environment(args.threads, args.device), "summary": summary,
                  "runs": results}  # fmt: skip
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(summarize(results, modes)))
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
