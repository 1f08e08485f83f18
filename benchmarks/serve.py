"""`vlmo serve` under load: N concurrent clients against one server, for N in 1, 2, 4, 8, 16.

    python benchmarks/serve.py --size shapes                                   # the built-in demo model, seconds
    python benchmarks/serve.py --size paligemma-3b --clients 1,8 --requests 2 --max-tokens 16   # minutes on a CPU

The server is a real `vlmo serve` subprocess with its defaults (CPU, int8 weights on a CPU, batches of
`--max-batch-size` 8) on a free loopback port; `--size paligemma-3b` serves the random-weight checkpoint at
PaliGemma-3B shapes (`checkpoints.py`, written once into `--cache`). Each client is a thread that sends
`--requests` streamed chat requests one after another (`stream_options.include_usage`), so N clients keep about N
requests in flight. Every request carries its own image (a 640×480 noise picture, seeded by the request), so the
vision tower runs for each; `--same-image` sends one image to all, which the server encodes once per batch.

After a warm-up (two requests at once), per concurrency level: requests/s and output tokens/s over the level's wall
time (first request sent to last answer read), and the median and 95th percentile of the request latency (sent →
last byte) and of the time to first token (sent → first content chunk). `--runs` repeats every level; the table
shows medians over runs. Results go to benchmarks/results/serve-<size>.json (written atomically, `vlmo.fileio.atomic`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPTS = {
    "shapes": "caption en",
    "default": "answer en what is written on the sign next to the red car in this picture?",
}


def noise_image_uri(seed: int) -> str:
    """A 640×480 noise PNG (seeded) as a data URI: every request preprocesses a real resize, like a photo."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (480, 640, 3), generator=g, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (640, 480), bytes(pixels.flatten().tolist())).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def shapes_image_uri(seed: int) -> str:
    from vlmo.demo.shapes import make_scene, render

    buffer = io.BytesIO()
    render(make_scene("bench", seed)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batch: int, log: Path, setup: str = "plain") -> tuple[subprocess.Popen[bytes], str]:
    """`setup`: plain (`vlmo serve`, PyTorch's default threads), plain-1t (one thread), ray-N (`vlmo serve --ray`
    with N replicas of one thread each)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "vlmo", "serve", "--model", model, "--port", str(port),
               "--max-batch-size", str(batch), "--max-queue", "1024"]  # fmt: skip
    env = dict(os.environ)
    if setup == "plain-1t":
        env["OMP_NUM_THREADS"] = "1"
    elif setup.startswith("ray-"):
        command += ["--ray", "--replicas", setup.removeprefix("ray-"), "--replica-threads", "1"]
    elif setup != "plain":
        raise SystemExit(f"unknown server setup {setup!r}: plain, plain-1t or ray-N")
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vlmo serve exited with {process.returncode}; see {log}")
        try:
            ready = "Ctrl-C" in log.read_text(errors="replace")  # every replica loaded (--ray)
            if ready and httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"vlmo serve did not start within 600 s; see {log}")


def one_request(url: str, image: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """A streamed chat request: its latency, time to first token and output tokens."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": prompt}]}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    done = time.perf_counter()
    return {"sent": sent, "latency": done - sent, "ttft": (first or done) - sent, "tokens": tokens, "done": done}


def level(url: str, clients: int, requests: int, images: list[str], prompt: str, max_tokens: int) -> dict[str, Any]:
    """`clients` threads, each sending `requests` requests in a row; the level's metrics."""
    results: list[dict[str, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            try:
                result = one_request(url, images[(c * requests + r) % len(images)], prompt, max_tokens)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tok_per_s": tokens / wall,
        "output_tokens": tokens,
        "p50_latency_s": statistics.median(latencies),
        "p95_latency_s": _percentile(latencies, 95),
        "p50_ttft_s": statistics.median(ttfts),
        "p95_ttft_s": _percentile(ttfts, 95),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews the numbers
    }


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    rank = max(1, -(-len(values) * p // 100))
    return values[int(rank) - 1]


METRICS = ("requests_per_s", "output_tok_per_s", "p50_latency_s", "p95_latency_s", "p50_ttft_s", "p95_ttft_s")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for clients in sorted({r["clients"] for r in runs}):
        rows = [r for r in runs if r["clients"] == clients]
        out.append(
            {"clients": clients, "runs": len(rows), **{m: statistics.median(r[m] for r in rows) for m in METRICS}}
        )
    return out


def table(summary: list[dict[str, Any]]) -> str:
    one = summary[0] if summary and summary[0]["clients"] == 1 else None
    lines = [
        "| clients | requests/s | output tok/s | × 1 client | p50 latency s | × 1 client | p95 latency s "
        "| p50 TTFT s | p95 TTFT s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        speedup = f"{s['output_tok_per_s'] / one['output_tok_per_s']:.2f}" if one else "–"
        slower = f"{s['p50_latency_s'] / one['p50_latency_s']:.2f}" if one else "–"
        lines.append(
            f"| {s['clients']} | {s['requests_per_s']:.3g} | {s['output_tok_per_s']:.3g} | {speedup} "
            f"| {s['p50_latency_s']:.3g} | {slower} | {s['p95_latency_s']:.3g} | {s['p50_ttft_s']:.3g} "
            f"| {s['p95_ttft_s']:.3g} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch

    import vlmo

    cpu = "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "vlmo": vlmo.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="shapes", help="shapes (vlmo/shapes) | tiny | paligemma-3b | paligemma2-3b")
    parser.add_argument("--clients", default="1,2,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client per level (after a warm-up)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's --max-batch-size")
    parser.add_argument("--runs", type=int, default=1, help="measurements per level (medians)")
    parser.add_argument("--same-image", action="store_true", help="one image for every request")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlmo-bench")
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/serve-<size>.json)")
    parser.add_argument(
        "--servers",
        default="plain",
        help="server setups measured one after the other: plain, plain-1t (one thread), ray-N (`vlmo serve --ray`, "
        "N replicas of one thread); e.g. plain-1t,ray-1 for the proxy's added latency",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.size == "shapes":
        model = "vlmo/shapes"
    else:
        sys.path.insert(0, str(HERE))
        from checkpoints import write_checkpoint

        model = str(write_checkpoint(args.size, args.cache / args.size))
    prompt = PROMPTS.get(args.size, PROMPTS["default"])
    count = 1 if args.same_image else max(levels) * args.requests + 2
    make = shapes_image_uri if args.size == "shapes" else noise_image_uri
    images = [make(i) for i in range(count)]
    out = args.out or HERE / "results" / f"serve-{args.size}.json"
    setups = [name.strip() for name in args.servers.split(",") if name.strip()]
    by_setup: dict[str, list[dict[str, Any]]] = {}
    for setup in setups:
        log = Path(tempfile.gettempdir()) / f"vlmo-serve-bench-{args.size}-{setup}.log"  # the server's stderr
        process, url = start_server(model, args.max_batch_size, log, setup)
        runs: list[dict[str, Any]] = by_setup.setdefault(setup, [])
        try:
            level(url, 2, 1, images[-2:], prompt, args.max_tokens)  # warm-up: first calls, a batch of two
            for run in range(args.runs):
                for clients in levels:
                    result = level(url, clients, args.requests, images, prompt, args.max_tokens)
                    runs.append(result)
                    print(f"{setup} run {run + 1}/{args.runs} clients {clients}: " + ", ".join(f"{m} {result[m]:.3g}"
                          for m in METRICS), file=sys.stderr, flush=True)  # fmt: skip
        finally:
            process.terminate()
            process.wait(timeout=180)
    runs = by_setup[setups[0]]
    summary = summarize(runs)
    report = {
        "size": args.size,
        "model": model,
        "command": " ".join(sys.argv),
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "max_batch_size": args.max_batch_size,
        "same_image": args.same_image,
        "environment": environment(),
        "summary": summary,
        "runs": runs,
        "servers": {setup: {"summary": summarize(r), "runs": r} for setup, r in by_setup.items()},
    }
    from vlmo.fileio.atomic import write_output

    write_output(out, json.dumps(report, indent=2) + "\n", make_parents=True)
    for setup, setup_runs in by_setup.items():
        print(f"\n{setup}:\n{table(summarize(setup_runs))}")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
