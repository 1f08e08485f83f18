"""How far each vlmo mode is from float32 on the same checkpoint and inputs: logit error and top-1 agreement.

    python benchmarks/accuracy.py --model ~/.cache/vlmo-bench/paligemma-3b        # a benchmark checkpoint
    python benchmarks/accuracy.py --model google/paligemma-3b-mix-224               # real weights, if you have them

For each of 4 images (noise, a gradient, two solid-colour scenes) and a prompt, the float32 model gives the reference
logits at every text position of the prompt and a 24-token greedy continuation. Each other mode (int8, bfloat16) is
then loaded alone (one model in memory at a time) and scored: relative L2 error of those logits, the largest
absolute error as a fraction of the reference's standard deviation, how often its top-1 token equals float32's, and
how many greedy tokens agree before the first difference. Output: a table on stdout and JSON with `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from vlmo import VLMo, tasks
from vlmo.engine.scheduler import Collector, Scheduler

PROMPTS = ("caption en", "answer en what color is the large shape on the left?", "detect circle ; square", "ocr")


def images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    noise = Image.frombytes("RGB", (320, 240), bytes(torch.randint(0, 256, (240 * 320 * 3,), generator=g).tolist()))
    ramp = Image.linear_gradient("L").resize((300, 300)).convert("RGB")
    scenes = []
    for bg, fg in (((235, 230, 220), (200, 40, 40)), ((210, 225, 240), (40, 70, 220))):
        im = Image.new("RGB", (400, 300), bg)
        draw = ImageDraw.Draw(im)
        draw.ellipse((30, 60, 170, 200), fill=fg)
        draw.rectangle((230, 90, 350, 210), fill=(230, 205, 40))
        scenes.append(im)
    return [noise, ramp, *scenes]


@torch.inference_mode()
def outputs(vlm: VLMo, new_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Per (image, prompt): float32 logits at the prompt's text positions [T, V] and greedy ids [new_tokens]."""
    out = []
    for image, prompt in zip(images(), PROMPTS, strict=True):
        batch = vlm.text.encode([prompt])
        features = vlm.encode_images([image])
        cache = vlm.model.new_cache(1, batch.input_ids.shape[1] + 1)
        logits, _ = vlm.model.prefill(batch.input_ids, features, batch.attention_mask, cache, all_logits=True)
        text = (batch.input_ids != vlm.model.cfg.image_token_id)[0]
        scheduler, sink = Scheduler(vlm, max_batch_size=1, ignore_eos=True), Collector()
        scheduler.step([scheduler.request(image, tasks.raw(prompt), {"max_new_tokens": new_tokens}, sink)])
        while scheduler.running:
            scheduler.step()
        out.append({"logits": logits[0, text].float(), "greedy": torch.tensor(sink.finished().token_ids)})
    return out


def compare(ref: list[dict[str, torch.Tensor]], got: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    a = torch.cat([r["logits"] for r in ref])
    b = torch.cat([g["logits"] for g in got])
    agree = []
    for r, g in zip(ref, got, strict=True):
        same = (r["greedy"] == g["greedy"]).long()
        agree.append(int(same.cumprod(0).sum()))
    return {
        "relative_l2": ((a - b).norm() / a.norm()).item(),
        "max_abs_over_std": ((a - b).abs().max() / a.std()).item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "greedy_tokens_agreeing": sum(agree) / len(agree),
        "greedy_of": len(ref[0]["greedy"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--modes", default="int8,bfloat16", help="compared with float32 (default int8,bfloat16)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ref_model = VLMo.from_pretrained(args.model, device="cpu", dtype="float32", progress=False)
    ref = outputs(ref_model, args.new_tokens)
    del ref_model
    gc.collect()
    report: dict[str, Any] = {"model": args.model, "torch": torch.__version__, "modes": {}}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        options = {"quantize": "int8"} if mode == "int8" else {"dtype": mode, "quantize": "none"}
        vlm = VLMo.from_pretrained(args.model, device="cpu", progress=False, **options)
        report["modes"][mode] = compare(ref, outputs(vlm, args.new_tokens))
        del vlm
        gc.collect()
        print(f"{mode}: {report['modes'][mode]}", file=sys.stderr, flush=True)
    print("| mode vs float32 | relative L2 of logits | max abs error / logit std | top-1 agreement "
          "| greedy tokens agreeing |")  # fmt: skip
    print("|---|---|---|---|---|")
    for mode, m in report["modes"].items():
        print(f"| {mode} | {m['relative_l2']:.4f} | {m['max_abs_over_std']:.3f} | {m['top1_agreement']:.1%} "
              f"| {m['greedy_tokens_agreeing']:.1f} of {m['greedy_of']} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
