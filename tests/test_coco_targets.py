"""COCO instances → `detect` fine-tuning targets: exact strings for a hand-computed case, round trips, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmo.data.coco import coco_to_detect_examples, write_jsonl
from vlmo.detection import parse_detections
from vlmo.errors import InputError

SIZES = {1: (640, 480), 2: (100, 100), 3: (50, 50)}


def instances() -> dict[str, Any]:
    """Image 1 (640×480): two cats and a dog. Image 2: only a crowd of people. Image 3: nothing."""
    return {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in SIZES.items()],
        "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 17, "bbox": [64, 48, 128, 96], "iscrowd": 0},
            {"id": 101, "image_id": 1, "category_id": 18, "bbox": [320, 240, 320, 240], "iscrowd": 0},
            {"id": 102, "image_id": 1, "category_id": 17, "bbox": [0, 0, 32, 32], "iscrowd": 0},
            {"id": 103, "image_id": 2, "category_id": 1, "bbox": [10, 10, 50, 50], "iscrowd": 1},
        ],
    }


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for i, size in SIZES.items():
        Image.new("RGB", size, (128, 128, 128)).save(images / f"{i:012d}.jpg")
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(instances()))
    return path, images


def test_hand_computed_target(coco: tuple[Path, Path]) -> None:
    path, images = coco
    examples = coco_to_detect_examples(path, images)
    # Image 2 holds only a crowd region and image 3 nothing: without labels there is nothing to ask about.
    assert len(examples) == 1
    # Bins are round(coord / size × 1023), in (y_min, x_min, y_max, x_max) order:
    #   small cat [0, 0, 32, 32]     → corners (0, 0, 32, 32):      y 0, 68.2 → 0, 68;   x 0, 51.15 → 0, 51
    #   cat [64, 48, 128, 96]        → corners (64, 48, 192, 144):  y 102.3, 306.9 → 102, 307; x the same
    #   dog [320, 240, 320, 240]     → corners (320, 240, 640, 480): 511.5 → 512 (half to even), 1023
    # Cats before the dog (category order of the file), the top-most cat first.
    assert examples[0] == {
        "image": str((images / "000000000001.jpg").resolve()),
        "prefix": "detect cat ; dog",
        "suffix": "<loc0000><loc0000><loc0068><loc0051> cat ; "
        "<loc0102><loc0102><loc0307><loc0307> cat ; "
        "<loc0512><loc0512><loc1023><loc1023> dog",
    }


def test_round_trip_within_one_bin(coco: tuple[Path, Path]) -> None:
    path, images = coco
    (example,) = coco_to_detect_examples(path, images)
    width, height = SIZES[1]
    found = parse_detections(example["suffix"], (width, height))
    expected = [("cat", (0, 0, 32, 32)), ("cat", (64, 48, 192, 144)), ("dog", (320, 240, 640, 480))]
    assert [d.label for d in found] == [label for label, _ in expected]
    for det, (_, box) in zip(found, expected, strict=True):
        for got, want, extent in zip(det.box, box, (width, height, width, height), strict=True):
            assert abs(got - want) <= extent / 1023


def test_labels_absent_and_empty_targets(coco: tuple[Path, Path]) -> None:
    path, images = coco
    examples = coco_to_detect_examples(path, images, labels=["person", "cat"])
    # The prompt names every label in the given order; the dog is not asked about; the absent person is named.
    assert [(e["prefix"], e["suffix"].count("cat")) for e in examples] == [("detect person ; cat", 2)]

    with_empty = coco_to_detect_examples(path, images, labels=["person", "cat"], include_empty=True)
    assert [(Path(e["image"]).name, e["prefix"], e["suffix"]) for e in with_empty[1:]] == [
        # Image 2's people are a crowd region: not objects, but not absent either, so "person" is not asked.
        ("000000000002.jpg", "detect cat", ""),
        ("000000000003.jpg", "detect person ; cat", ""),
    ]


def test_crowd_regions_are_skipped_with_a_note(coco: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    path, images = coco
    with caplog.at_level(logging.INFO, logger="vlmo.data.coco"):
        examples = coco_to_detect_examples(path, images, labels=["person"], include_empty=True)
    assert "skipped 1 crowd annotation" in caplog.text
    assert all("person" not in e["suffix"] for e in examples)


def test_max_objects_drops_whole_labels(coco: tuple[Path, Path]) -> None:
    path, images = coco
    # Image 1 has 2 cats + 1 dog. With room for 2, a seeded choice keeps either both cats or the dog — never
    # one cat of two, which would teach the model to miss the other.
    seen = set()
    for seed in range(8):
        (example,) = coco_to_detect_examples(path, images, max_objects=2, seed=seed)
        labels = tuple(d.label for d in parse_detections(example["suffix"], SIZES[1]))
        assert (example["prefix"], labels) in {("detect cat", ("cat", "cat")), ("detect dog", ("dog",))}
        assert coco_to_detect_examples(path, images, max_objects=2, seed=seed) == [example]  # reproducible
        seen.add(example["prefix"])
    assert seen == {"detect cat", "detect dog"}
    # With room for one object only the dog fits.
    assert coco_to_detect_examples(path, images, max_objects=1)[0]["prefix"] == "detect dog"


def test_write_jsonl_reads_back(coco: tuple[Path, Path], tmp_path: Path) -> None:
    from vlmo.data.examples import JsonlDataset

    path, images = coco
    examples = coco_to_detect_examples(path, images, labels=["cat", "dog"], include_empty=True)
    out = write_jsonl(examples, tmp_path / "out" / "train.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == examples
    data = JsonlDataset(out)
    assert len(data) == 3 and data.get(0, 0).prefix == "detect cat ; dog"


def _rewrite(path: Path, change: Any) -> Path:
    doc = instances()
    change(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("annotations"), 'no "annotations" list'),
        (lambda d: d["annotations"][0].update(image_id=9), "image_id 9 is not in the images list"),
        (lambda d: d["annotations"][0].update(category_id=5), "category_id 5 is not in the categories list"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, -5, 10]), "negative width or height"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, 5]), r"must be \[x, y, width, height\]"),
        (lambda d: d["images"][0].update(width=0), "width and height must be positive"),
        (lambda d: d["images"][0].pop("file_name"), '"file_name" must be a non-empty string'),
        (lambda d: d["categories"][0].update(name="cat; dog"), "contain ';'"),
    ],
)
def test_bad_files(coco: tuple[Path, Path], change: Any, message: str) -> None:
    path, images = coco
    with pytest.raises(InputError, match=message):
        coco_to_detect_examples(_rewrite(path, change), images)


def test_bad_arguments(coco: tuple[Path, Path], tmp_path: Path) -> None:
    path, images = coco
    with pytest.raises(InputError, match="does not exist"):
        coco_to_detect_examples(tmp_path / "missing.json", images)
    (tmp_path / "broken.json").write_text("[1, 2")
    with pytest.raises(InputError, match="not valid JSON"):
        coco_to_detect_examples(tmp_path / "broken.json", images)
    with pytest.raises(InputError, match="unknown label.*'horse'.*cat, dog, person"):
        coco_to_detect_examples(path, images, labels=["cat", "horse"])
    with pytest.raises(InputError, match="more than once"):
        coco_to_detect_examples(path, images, labels=["cat", "cat"])
    with pytest.raises(InputError, match="not a single string"):
        coco_to_detect_examples(path, images, labels="cat")
    with pytest.raises(InputError, match="include_empty=True needs labels"):
        coco_to_detect_examples(path, images, include_empty=True)
    with pytest.raises(InputError, match="max_objects"):
        coco_to_detect_examples(path, images, max_objects=0)
    with pytest.raises(InputError, match="image folder"):
        coco_to_detect_examples(path, tmp_path / "nowhere")
    (images / "000000000001.jpg").unlink()
    with pytest.raises(InputError, match=r"1 image file\(s\) are missing .*000000000001\.jpg"):
        coco_to_detect_examples(path, images)
