"""COCO-style detection annotations → PaliGemma `detect` fine-tuning examples (JSONL-ready dicts).

    examples = coco_to_detect_examples("annotations/instances_val2017.json", "val2017/", max_objects=20)
    write_jsonl(examples, "coco_detect_val.jsonl")
    # {"image": "/data/val2017/000000000139.jpg", "prefix": "detect person ; tv ; chair",
    #  "suffix": "<loc0304><loc0000><loc0717><loc0096> person ; <loc…>×4 tv ; <loc…>×4 chair ; <loc…>×4 chair"}

Target layout (decisions, since big_vision's public code pins no object order for detection):
- The prompt names each label once, in the category order of the file (or the order of `labels`).
- Objects are grouped by label in prompt order; within a label they are in reading order of their pixel boxes
  (top edge, then left edge, then bottom, then right; ties keep the file order).
- A target must list every instance of every label it names, or it would teach the model to miss objects. So
  `max_objects` drops whole labels (a seeded random choice per image), never single objects.
- Crowd regions (`iscrowd: 1`) are not objects and are skipped (the count is logged at INFO level); a label whose
  only instances in an image are crowd regions is not offered as absent there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from vlmo.detection import detect_prompt, encode_boxes
from vlmo.errors import InputError, check_count
from vlmo.fileio.jsonfile import read_json

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Object:
    label: str
    box: tuple[float, float, float, float]  # corners (x_min, y_min, x_max, y_max) in pixels


def coco_to_detect_examples(
    instances_json: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    max_objects: int | None = None,
    include_empty: bool = False,
    seed: int = 0,
) -> list[dict[str, str]]:
    """One `{"image", "prefix", "suffix"}` dict per image of a COCO `instances_*.json`, in the file's image order.

    instances_json: `{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"image_id",
    "category_id", "bbox": [x, y, w, h] in pixels, "iscrowd"}], "categories": [{"id", "name"}]}`.
    image_dir: the folder the `file_name`s are relative to; the dicts hold absolute image paths.
    labels: category names to train on. None: every category, and each prompt names only those present in its
    image. Given: every prompt names all of them, present or absent, so the model also learns to answer nothing
    for absent labels; objects of other categories are ignored.
    max_objects: at most this many objects per target; images with more keep a random subset of their labels
    (seeded by `seed` and the image id) whose objects fit, and the prompt names only the labels kept (plus the
    absent ones). A label with more instances than `max_objects` is never kept.
    include_empty: also emit images with nothing to find (empty suffix); needs `labels`, to have a prompt.

    The suffix is `vlmo.detection.encode_boxes` of the corner boxes, e.g. `<loc0102><loc0102><loc0307><loc0307>
    cat ; <loc…>×4 dog` (y_min, x_min, y_max, x_max bins; boxes clipped to the image).
    Raises InputError on an unreadable file, missing or malformed fields, annotations that name unknown images or
    categories, inverted boxes, unknown or repeated `labels`, and image files missing from `image_dir`.
    """
    if max_objects is not None:
        check_count(max_objects, "max_objects")
    if include_empty and labels is None:
        raise InputError("include_empty=True needs labels: an empty target must say which labels are absent")
    doc = _read_instances(instances_json)
    names = _categories(doc, instances_json)
    wanted = _wanted_labels(labels, names)
    images = _images(doc, instances_json)
    objects, crowd_labels, crowd_count = _annotations(doc, instances_json, images, names, set(wanted))
    folder = Path(image_dir).expanduser().resolve()
    if not folder.is_dir():
        raise InputError(f"image folder {image_dir} does not exist; pass the folder the file_names are relative to")

    examples: list[dict[str, str]] = []
    missing: list[str] = []
    trimmed = 0
    for image_id, (file_name, width, height) in images.items():
        found = objects.get(image_id, [])
        found_labels = {o.label for o in found}
        present = [label for label in wanted if label in found_labels]
        unseen = found_labels | crowd_labels[image_id]
        absent = set() if labels is None else {label for label in wanted if label not in unseen}
        if max_objects is not None and len(found) > max_objects:
            trimmed += 1
            present = _labels_that_fit(present, found, max_objects, random.Random(f"{seed}:{image_id}"))
        keep = set(present)
        prompt_labels = [label for label in wanted if label in keep or label in absent]
        if not prompt_labels or (not keep and not include_empty):
            continue
        path = folder / file_name
        if not path.is_file():
            missing.append(file_name)
            continue
        chosen = [o for o in found if o.label in keep]
        rank = {label: i for i, label in enumerate(prompt_labels)}
        chosen.sort(key=lambda o: (rank[o.label], o.box[1], o.box[0], o.box[3], o.box[2]))
        suffix = encode_boxes([o.box for o in chosen], [o.label for o in chosen], (width, height))
        examples.append({"image": str(path), "prefix": detect_prompt(prompt_labels), "suffix": suffix})
    if missing:
        shown = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
        raise InputError(f"{len(missing)} image file(s) are missing from {folder}: {shown}; check image_dir")
    if crowd_count:
        _log.info("skipped %d crowd annotation(s) (iscrowd=1) in %s", crowd_count, instances_json)
    if trimmed:
        _log.info("%d image(s) had more than %d objects; some of their labels were left out", trimmed, max_objects)
    return examples


def write_jsonl(examples: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept), creating the folder; returns the path.

    The format `vlmo.data.examples.JsonlDataset` reads (`{"image", "prefix", "suffix"}` per line).
    """
    from vlmo.fileio.atomic import write_output

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for i, example in enumerate(examples):
                if not isinstance(example, Mapping):
                    raise InputError(f"example {i} is a {type(example).__name__}, not a dict; pass dicts")
                f.write(json.dumps(dict(example), ensure_ascii=False) + "\n")

    # whole or not at all: a bad example or a full disk leaves an existing file as it was
    return write_output(path, write, make_parents=True)


# ------------------------------------------------------------------------------------------------------------
# Reading and checking the instances file


def _read_instances(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path)
    doc = read_json(file, what="COCO annotations file", hint="pass an instances_*.json file", error=InputError)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list) or not all(isinstance(r, dict) for r in doc[key]):
            raise InputError(f'{file} has no "{key}" list of objects; is it a COCO instances_*.json file?')
    return doc


def _categories(doc: dict[str, Any], path: str | os.PathLike[str]) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, cat in enumerate(doc["categories"]):
        where = f"{path}: categories[{i}]"
        cat_id = _int(cat, "id", where)
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f'{where}: "name" must be a non-empty string, got {name!r}')
        if cat_id in names:
            raise InputError(f"{where}: category id {cat_id} is defined twice")
        names[cat_id] = " ".join(name.split())
    if not names:
        raise InputError(f"{path} defines no categories")
    return names


def _wanted_labels(labels: Sequence[str] | None, names: dict[int, str]) -> list[str]:
    """The labels in prompt order: `labels` as given, or every category name in the file's order."""
    known = list(dict.fromkeys(names.values()))
    if labels is None:
        return _check_names(known)
    if isinstance(labels, str):
        raise InputError('labels must be a list of category names, e.g. ["cat", "dog"], not a single string')
    chosen = [" ".join(label.split()) if isinstance(label, str) else label for label in labels]
    if not chosen:
        raise InputError("labels is empty; pass category names, or None for all categories")
    unknown = [label for label in chosen if label not in known]
    if unknown:
        raise InputError(
            f"unknown label(s) {', '.join(map(repr, unknown))}; the file's categories are "
            f"{', '.join(known[:10])}{', …' if len(known) > 10 else ''}"
        )
    repeated = sorted({label for label in chosen if chosen.count(label) > 1})
    if repeated:
        raise InputError(f"label(s) {', '.join(map(repr, repeated))} given more than once; name each once")
    return _check_names(chosen)


def _check_names(labels: list[str]) -> list[str]:
    bad = [label for label in labels if any(c in label for c in ";<>")]
    if bad:
        raise InputError(
            f"category name(s) {', '.join(map(repr, bad))} contain ';', '<' or '>', which detection text cannot "
            "hold; leave them out with labels=[...]"
        )
    return labels


def _images(doc: dict[str, Any], path: str | os.PathLike[str]) -> dict[int, tuple[str, int, int]]:
    images: dict[int, tuple[str, int, int]] = {}
    for i, img in enumerate(doc["images"]):
        where = f"{path}: images[{i}]"
        image_id = _int(img, "id", where)
        width, height = _int(img, "width", where), _int(img, "height", where)
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise InputError(f'{where}: "file_name" must be a non-empty string, got {file_name!r}')
        if width < 1 or height < 1:
            raise InputError(f"{where}: width and height must be positive, got {width}×{height}")
        if image_id in images:
            raise InputError(f"{where}: image id {image_id} is listed twice")
        images[image_id] = (file_name, width, height)
    return images


def _annotations(
    doc: dict[str, Any],
    path: str | os.PathLike[str],
    images: dict[int, tuple[str, int, int]],
    names: dict[int, str],
    wanted: set[str],
) -> tuple[dict[int, list[_Object]], dict[int, set[str]], int]:
    """Per image: its wanted objects in file order; per image: the labels of its crowd regions; crowd count."""
    objects: dict[int, list[_Object]] = {}
    crowd_labels: dict[int, set[str]] = {image_id: set() for image_id in images}
    crowd_count = 0
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, cat_id = _int(ann, "image_id", where), _int(ann, "category_id", where)
        if image_id not in images:
            raise InputError(f"{where}: image_id {image_id} is not in the images list")
        if cat_id not in names:
            raise InputError(f"{where}: category_id {cat_id} is not in the categories list")
        label = names[cat_id]
        if ann.get("iscrowd", 0):
            crowd_count += 1
            crowd_labels[image_id].add(label)
            continue
        box = _corners(ann.get("bbox"), where)
        if label in wanted:
            objects.setdefault(image_id, []).append(_Object(label, box))
    return objects, crowd_labels, crowd_count


def _corners(bbox: object, where: str) -> tuple[float, float, float, float]:
    """COCO's [x, y, width, height] → (x_min, y_min, x_max, y_max)."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise InputError(f'{where}: "bbox" must be [x, y, width, height], got {bbox!r}')
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise InputError(f'{where}: "bbox" must hold 4 finite numbers, got {bbox!r}')
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise InputError(f'{where}: "bbox" has a negative width or height: {bbox!r}')
    return (x, y, x + w, y + h)


def _labels_that_fit(present: list[str], found: list[_Object], budget: int, rng: random.Random) -> list[str]:
    """A random subset of `present` whose objects number at most `budget`, in `present`'s order."""
    counts = {label: sum(o.label == label for o in found) for label in present}
    order = list(present)
    rng.shuffle(order)
    kept: set[str] = set()
    for label in order:
        if counts[label] <= budget:
            kept.add(label)
            budget -= counts[label]
    return [label for label in present if label in kept]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if not _is_int(value):
        raise InputError(f'{where}: "{key}" must be an integer, got {value!r}')
    return value
