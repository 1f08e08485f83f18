"""Held-out evaluation of a shapes model: exact match per question type, caption exact match, detection precision,
recall (at IoU ≥ 0.5) and mean IoU of the matched boxes for prompts naming one, two or three kinds, the same for
`segment` prompts with the mean IoU of the matched objects' masks (decoded by the model's own mask decoder), and
the CPU latency of `ask`.

    python -m vlmo.demo.evaluate [--model vlmo/shapes] [--images 500] [--random-sizes 200]

Scenes come from the seed "heldout" (`make_scene("heldout", i)`), which training never uses (it draws from
"train:{seed}:{epoch}:{index}"). Every question `task_examples` defines for a scene is asked, in one batch per image.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlmo.demo.shapes import (
    Scene,
    detect_kinds,
    kind_prompts,
    make_scene,
    random_size,
    render,
    shape_mask,
    task_examples,
)
from vlmo.detection import parse_detections

HELDOUT_SEED = "heldout"
IOU_THRESHOLD = 0.5
PROMPT_KINDS = {1: "one_kind", 2: "two_kinds", 3: "three_kinds"}  # detection results by how many kinds are named
# Scenes by how much the processor's squash to a square distorts them: width / height within 0.7–1.4, or beyond.
ASPECTS = ("near_square", "stretched")
SEGMENT_TOKENS = 80  # 3 objects × (4 loc + 16 seg + label) and the separators, with room to spare


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x_min, y_min, x_max, y_max) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Matches(NamedTuple):
    hits: int  # true positives
    predicted: int
    objects: int
    ious: tuple[float, ...]  # the IoU of each hit with its object
    mask_ious: tuple[float, ...] = ()  # `segment`: the IoU of each hit's mask with its object's


def aspect_class(scene: Scene) -> str:
    """`ASPECTS`' name for the scene's width / height."""
    return ASPECTS[0] if 0.7 <= scene.width / scene.height <= 1.4 else ASPECTS[1]


def match_detections(answer: str, scene: Scene, kinds: list[str]) -> Matches:
    """Score a `detect` answer: a prediction is right when its label names the kind of a not-yet-matched object
    whose box it overlaps with IoU ≥ 0.5 (greedy, best overlap first)."""
    predicted = parse_detections(answer, (scene.width, scene.height))
    objects = [s for s in scene.shapes if s.kind in kinds]
    pairs = _pairs(predicted, objects)
    return Matches(len(pairs), len(predicted), len(objects), tuple(overlap for overlap, _, _ in pairs))


def match_segments(answer: str, scene: Scene, kinds: list[str], decoder: Any) -> Matches:
    """Score a `segment` answer as `match_detections` scores boxes, plus the mask IoU of each matched pair (the
    predicted mask in image pixels against the shape's own pixels, `shape_mask`)."""
    from vlmo.segmentation import parse_segmentations

    predicted = parse_segmentations(answer, (scene.width, scene.height), decoder)
    objects = [s for s in scene.shapes if s.kind in kinds]
    pairs = _pairs(predicted, objects)
    masks = []
    for _, i, j in pairs:
        truth, mask = shape_mask(scene, objects[j]), predicted[i].mask
        masks.append(float((truth & mask).sum() / (truth | mask).sum()))
    ious = tuple(overlap for overlap, _, _ in pairs)
    return Matches(len(pairs), len(predicted), len(objects), ious, tuple(masks))


def _pairs(predicted: Any, objects: list[Any]) -> list[tuple[float, int, int]]:
    """(IoU, prediction, object) of the matches: greedy, best overlap first, same label, IoU ≥ 0.5."""
    pairs = sorted(
        (
            (iou(p.box, o.box), i, j)
            for i, p in enumerate(predicted)
            for j, o in enumerate(objects)
            if p.label == o.kind
        ),
        reverse=True,
    )
    used_p: set[int] = set()
    used_o: set[int] = set()
    matched = []
    for overlap, i, j in pairs:
        if overlap >= IOU_THRESHOLD and i not in used_p and j not in used_o:
            used_p.add(i)
            used_o.add(j)
            matched.append((overlap, i, j))
    return matched


def evaluate_scenes(vlm: Any, scenes: list[Scene], segment: bool = True) -> dict[str, Any]:
    """Ask every question about each scene, and (`segment`) every `segment` prompt; return accuracies, detection
    and segmentation counts (see module docstring)."""
    right: dict[str, int] = defaultdict(int)
    asked: dict[str, int] = defaultdict(int)
    det: dict[str, list[Matches]] = {name: [] for name in PROMPT_KINDS.values()}
    seg: dict[str, list[Matches]] = {name: [] for name in PROMPT_KINDS.values()}
    by_aspect: dict[str, list[Matches]] = {name: [] for name in ASPECTS}  # boxes of every detect prompt
    failures: list[dict[str, str]] = []
    decoder = vlm.mask_decoder() if segment else None
    for scene in scenes:
        examples = task_examples(scene)
        image = render(scene)
        answers = vlm.generate(image, [e.prefix for e in examples], max_new_tokens=48)
        if decoder is not None:
            prompts = kind_prompts()
            segments = vlm.generate(image, ["segment " + " ; ".join(k) for k in prompts], max_new_tokens=SEGMENT_TOKENS)
            for named, answer in zip(prompts, segments, strict=True):
                seg[PROMPT_KINDS[len(named)]].append(match_segments(answer, scene, list(named), decoder))
        for ex, answer in zip(examples, answers, strict=True):
            key = f"{ex.kind}_{ex.suffix}" if ex.kind == "exists" else ex.kind
            asked[key] += 1
            if answer == ex.suffix:
                right[key] += 1
            elif len(failures) < 20 and ex.kind != "detect":
                failures.append({"prompt": ex.prefix, "expected": ex.suffix, "answer": answer})
            if ex.kind == "detect":
                kinds = detect_kinds(ex)
                det[PROMPT_KINDS[len(kinds)]].append(match_detections(answer, scene, kinds))
                by_aspect[aspect_class(scene)].append(det[PROMPT_KINDS[len(kinds)]][-1])
    for kind in ("exists_yes", "exists_no"):
        right["exists"] += right[kind]
        asked["exists"] += asked[kind]
    exact = {k: right[k] / asked[k] for k in sorted(asked) if asked[k]}
    det["all"] = [m for name in PROMPT_KINDS.values() for m in det[name]]
    detection = {name: _detection_summary(matches) for name, matches in det.items()}
    report = {"images": len(scenes), "exact_match": exact, "asked": dict(asked), "detection": detection}
    report["detection_by_aspect"] = {name: _detection_summary(m) for name, m in by_aspect.items() if m}
    if decoder is not None:
        seg["all"] = [m for name in PROMPT_KINDS.values() for m in seg[name]]
        report["segmentation"] = {name: _segmentation_summary(matches) for name, matches in seg.items()}
    return {**report, "failures": failures}


def _segmentation_summary(matches: list[Matches]) -> dict[str, float | int]:
    """`_detection_summary` of the boxes, the mean mask IoU of the matched objects, and over every object (a missed
    object counts 0)."""
    masks = [v for m in matches for v in m.mask_ious]
    objects = sum(m.objects for m in matches)
    return {
        **_detection_summary(matches),
        "mean_mask_iou": sum(masks) / len(masks) if masks else 0.0,
        "mean_mask_iou_all_objects": sum(masks) / objects if objects else 1.0,
    }


def _detection_summary(matches: list[Matches]) -> dict[str, float | int]:
    hits, predicted, objects = (
        sum(m.hits for m in matches),
        sum(m.predicted for m in matches),
        sum(m.objects for m in matches),
    )
    ious = [v for m in matches for v in m.ious]
    return {
        "precision": hits / predicted if predicted else 1.0,
        "recall": hits / objects if objects else 1.0,
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        "true_positives": hits,
        "predictions": predicted,
        "objects": objects,
    }


def ask_latency(vlm: Any, repeats: int = 20) -> dict[str, float]:
    """Seconds per `vlm.ask(image, question)` on one 224×224 PNG file (decode, preprocess, generate)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.png"
        render(make_scene(HELDOUT_SEED, 0)).save(path)
        vlm.ask(path, "how many shapes are there?")  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            vlm.ask(path, "what color is the circle?")
            times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "max_s": max(times)}


def other_size_scene(index: int) -> Scene:
    """Held-out scene `index` at a random size other than the default: each side 160–400 px (`random_size` with no
    224×224 share, which `make_scene(size=None)` would give half the scenes)."""
    size = random_size(random.Random(f"{HELDOUT_SEED}:size:{index}"), square=0.0)
    return make_scene(HELDOUT_SEED, index, size=size)


def evaluate_model(
    model: str | Path, images: int = 500, random_sizes: int = 200, threads: int | None = 2, segment: bool = True
) -> dict[str, Any]:
    """The held-out report: `images` scenes at 224×224, `random_sizes` scenes of other sizes, and `ask` latency;
    `segment`: with the segmentation prompts (a model trained without them answers them with nonsense)."""
    from vlmo import VLMo

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    vlm = VLMo.from_pretrained(model, device="cpu")
    load_seconds = time.perf_counter() - started
    report: dict[str, Any] = {"seed": HELDOUT_SEED, "load_seconds": round(load_seconds, 3)}
    report["square_224"] = evaluate_scenes(vlm, [make_scene(HELDOUT_SEED, i) for i in range(images)], segment)
    if random_sizes:
        scenes = [other_size_scene(images + i) for i in range(random_sizes)]
        report["random_sizes"] = evaluate_scenes(vlm, scenes, segment)
    report["ask_latency"] = ask_latency(vlm)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmo.demo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlmo/shapes", help="model name or directory")
    parser.add_argument("--images", type=int, default=500, help="held-out 224×224 scenes")
    parser.add_argument("--random-sizes", type=int, default=200, help="held-out scenes of other sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-segment", action="store_true", help="skip the segment prompts")
    args = parser.parse_args(argv)
    report = evaluate_model(args.model, args.images, args.random_sizes, args.threads, not args.no_segment)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
