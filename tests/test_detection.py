"""Detection text ↔ boxes: parsing, encoding, round trips, prompts and drawing (vlmo.detection)."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmo.detection import (
    Detection,
    ParsedObject,
    bins_to_box,
    box_to_bins,
    detect_prompt,
    draw_detections,
    encode_boxes,
    format_objects,
    label_colours,
    parse_detections,
    parse_objects,
)
from vlmo.errors import InputError

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEGS = "".join(f"<seg{c:03d}>" for c in range(0, 128, 8))  # 16 codes: 0, 8, …, 120


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


# ------------------------------------------------------------------------------------------------------------
# Strategies

sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
words = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=6)
labels = st.lists(words, min_size=0, max_size=3).map(" ".join)  # "" and multi-word labels like "red car"
bin_values = st.integers(0, 1023)


@st.composite
def ordered_bins(draw: st.DrawFn) -> tuple[int, int, int, int]:
    y0, y1 = sorted((draw(bin_values), draw(bin_values)))
    x0, x1 = sorted((draw(bin_values), draw(bin_values)))
    return (y0, x0, y1, x1)


@st.composite
def size_and_boxes(draw: st.DrawFn) -> tuple[tuple[int, int], list[tuple[float, float, float, float]]]:
    width, height = draw(sizes)
    boxes = []
    for _ in range(draw(st.integers(0, 4))):
        x0, x1 = sorted(draw(st.floats(0, width, allow_nan=False)) for _ in range(2))
        y0, y1 = sorted(draw(st.floats(0, height, allow_nan=False)) for _ in range(2))
        boxes.append((x0, y0, x1, y1))
    return (width, height), boxes


parsed_objects = st.builds(
    ParsedObject,
    bins=st.tuples(bin_values, bin_values, bin_values, bin_values),  # unordered on purpose: the model may emit it
    seg_codes=st.none() | st.tuples(*[st.integers(0, 127)] * 16),
    label=labels,
)

fragments = st.one_of(
    st.integers(0, 9999).map(lambda i: f"<loc{i:04d}>"),
    st.integers(0, 999).map(lambda i: f"<seg{i:03d}>"),
    st.sampled_from(
        [
            " ; ",
            ";",
            " ;",
            "; ",
            " ",
            "\n",
            "<eos>",
            "<pad>",
            "<loc",
            "<loc12>",
            "<seg05",
            "<",
            ">",
            "cat",
            "red car",
            "٣",
            "<loc٠٠١٢>",
            "<image>",
            "detect cat",
        ]
    ),  # fmt: skip
    st.text(max_size=4),
)


def assert_well_formed(objects: list[ParsedObject]) -> None:
    for obj in objects:
        assert len(obj.bins) == 4 and all(isinstance(b, int) and 0 <= b <= 1023 for b in obj.bins)
        assert obj.seg_codes is None or (len(obj.seg_codes) == 16 and all(0 <= c <= 127 for c in obj.seg_codes))
        assert obj.label == obj.label.strip() and not set(";<>") & set(obj.label)


# ------------------------------------------------------------------------------------------------------------
# Properties


@PROPERTY
@given(size_and_boxes(), st.data())
def test_boxes_text_parse_round_trip_within_one_bin(case, data) -> None:
    (width, height), boxes = case
    names = [data.draw(labels) for _ in boxes]
    text = encode_boxes(boxes, names, (width, height))
    detections = parse_detections(text, (width, height))
    assert [d.label for d in detections] == names
    tol_x, tol_y = width / 1024, height / 1024
    for det, box in zip(detections, boxes, strict=True):
        for got, want, tol in zip(det.box, box, (tol_x, tol_y, tol_x, tol_y), strict=True):
            assert abs(got - want) < tol


@PROPERTY
@given(ordered_bins(), sizes)
def test_bins_box_bins_is_exact(bins, size) -> None:
    box = bins_to_box(bins, size)
    assert box_to_bins(box, size) == bins
    x0, y0, x1, y1 = box
    assert 0 <= x0 <= x1 <= size[0] and 0 <= y0 <= y1 <= size[1]


@PROPERTY
@given(st.lists(parsed_objects, max_size=4))
def test_format_then_parse_objects_round_trips(objects) -> None:
    assert parse_objects(format_objects(objects)) == objects


@PROPERTY
@given(st.text() | st.lists(fragments, max_size=40).map("".join), sizes)
def test_parse_never_raises_and_returns_valid_objects(text, size) -> None:
    objects = parse_objects(text)
    assert_well_formed(objects)
    detections = parse_detections(text, size)
    assert len(detections) == len(objects)
    for det in detections:
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 <= x1 <= size[0] and 0 <= y0 <= y1 <= size[1]


@settings(max_examples=40, deadline=None)
@given(st.lists(parsed_objects, min_size=1, max_size=4))
def test_truncated_output_keeps_only_complete_objects(objects) -> None:
    text = format_objects(objects)
    ends = []  # where each object's text (tokens + label) ends
    for i in range(len(objects)):
        ends.append(len(format_objects(objects[: i + 1])))
    for cut in range(len(text) + 1):
        got = parse_objects(text[:cut])
        assert_well_formed(got)
        complete = sum(end <= cut for end in ends)
        assert complete <= len(got) <= len(objects)
        assert got[:complete] == objects[:complete]  # objects before the cut are intact
        if len(got) > complete:  # the one being cut: its tokens are whole, only its label may be short
            assert len(got) == complete + 1
            last, full = got[-1], objects[complete]
            assert last.bins == full.bins
            assert last.seg_codes in (None, full.seg_codes)
            assert full.label.startswith(last.label)


# ------------------------------------------------------------------------------------------------------------
# Parsing examples


def test_coordinates_map_to_non_square_original() -> None:
    # 640×480 image: x = bin / 1023 × 640, y = bin / 1023 × 480, worked out by hand.
    (det,) = parse_detections(loc(100, 200, 900, 1023) + " cat", (640, 480))
    assert det.label == "cat"
    assert det.bins == (100, 200, 900, 1023)
    assert det.box == pytest.approx((125.1222, 46.9208, 640.0, 422.2874), abs=1e-4)
    # Tall 100×1000 image: the lower-right quarter.
    (det,) = parse_detections(loc(512, 512, 1023, 1023) + " dog", (100, 1000))
    assert det.box == pytest.approx((50.0489, 500.4888, 100.0, 1000.0), abs=1e-4)


def test_encode_known_example() -> None:
    # 2000×1000: 500 / 2000 × 1023 = 255.75 → 256; 750 / 1000 × 1023 = 767.25 → 767.
    text = encode_boxes([(500, 250, 1500, 750)], ["cat"], (2000, 1000))
    assert text == "<loc0256><loc0256><loc0767><loc0767> cat"
    assert box_to_bins((500, 250, 1500, 750), (2000, 1000)) == (256, 256, 767, 767)


def test_multiple_objects_and_labels_with_spaces() -> None:
    text = loc(10, 20, 30, 40) + " red car ; " + loc(1, 2, 3, 4) + " dog ; " + loc(0, 0, 1023, 1023) + " cat"
    dets = parse_detections(text, (1023, 1023))
    assert [d.label for d in dets] == ["red car", "dog", "cat"]
    assert dets[0].box == pytest.approx((20, 10, 40, 30))
    assert dets[2].box == pytest.approx((0, 0, 1023, 1023))


def test_seg_tokens_ignored_by_detections_but_returned_by_parse_objects() -> None:
    text = loc(10, 20, 30, 40) + SEGS + " cat ; " + loc(1, 2, 3, 4) + " dog"
    objects = parse_objects(text)
    assert objects[0] == ParsedObject((10, 20, 30, 40), tuple(range(0, 128, 8)), "cat")
    assert objects[1] == ParsedObject((1, 2, 3, 4), None, "dog")
    assert [d.label for d in parse_detections(text, (100, 100))] == ["cat", "dog"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("no objects here", []),
        (loc(1, 2, 3), []),  # fewer than 4 loc tokens
        (loc(1, 2, 3) + " cat", []),
        (loc(1, 2, 3, 1024) + " cat", []),  # bin out of range
        (loc(1, 2, 3, 4) + " cat<eos>", [((1, 2, 3, 4), "cat")]),
        (loc(1, 2, 3, 4) + " cat<eos><pad><pad>", [((1, 2, 3, 4), "cat")]),
        (loc(1, 2, 3, 4), [((1, 2, 3, 4), "")]),  # missing label kept as ""
        (loc(1, 2, 3, 4) + "cat;" + loc(5, 6, 7, 8) + "dog", [((1, 2, 3, 4), "cat"), ((5, 6, 7, 8), "dog")]),
        (loc(1, 2, 3, 4) + " cat  ;\n " + loc(5, 6, 7, 8) + " dog ;", [((1, 2, 3, 4), "cat"), ((5, 6, 7, 8), "dog")]),  # noqa: E501
        ("<loc0001> <loc0002> <loc0003> <loc0004> cat", [((1, 2, 3, 4), "cat")]),
        ("junk " + loc(1, 2, 3, 4) + " cat ; junk ; " + loc(9, 9, 9, 9) + " x", [((1, 2, 3, 4), "cat"), ((9, 9, 9, 9), "x")]),  # noqa: E501
        (loc(1, 2, 3, 4) + "<seg001><seg002> cat", []),  # truncated / garbled seg block
        (loc(1, 2, 3, 4) + SEGS + "<seg001> cat", []),  # 17 seg tokens
        (loc(1, 2, 3, 4) + SEGS.replace("<seg120>", "<seg200>") + " cat", []),  # seg code out of range
        ("<loc1><loc2><loc3><loc4> cat", []),  # wrong digit count
        ("<loc٠٠٠١><loc0002><loc0003><loc0004> cat", []),  # non-ASCII digits
        (loc(1, 2, 3, 4) + " cat ; " + loc(5, 6), [((1, 2, 3, 4), "cat")]),  # truncated trailing object
    ],
)  # fmt: skip
def test_tolerant_parsing(text: str, expected: list[tuple[tuple[int, ...], str]]) -> None:
    assert [(o.bins, o.label) for o in parse_objects(text)] == expected


def test_inverted_box_is_swapped_and_raw_bins_kept() -> None:
    (det,) = parse_detections(loc(900, 800, 100, 200) + " cat", (1023, 1023))
    assert det.bins == (900, 800, 100, 200)
    assert det.box == pytest.approx((200, 100, 800, 900))


def test_non_string_text_gives_no_objects() -> None:
    assert parse_objects(None) == []  # type: ignore[arg-type]


def test_detection_to_dict_is_json() -> None:
    (det,) = parse_detections(loc(0, 0, 1023, 1023) + " red car", (10, 20))
    data = json.loads(json.dumps(det.to_dict()))
    assert data == {"label": "red car", "box": [0.0, 0.0, 10.0, 20.0], "bins": [0, 0, 1023, 1023]}
    assert isinstance(det, Detection)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.5, 10), (10,), "ab", None])
def test_parse_detections_rejects_bad_image_size(size) -> None:
    with pytest.raises(InputError):
        parse_detections("", size)


# ------------------------------------------------------------------------------------------------------------
# Encoding


def test_encode_clips_boxes_outside_the_image() -> None:
    assert box_to_bins((-10, -5, 5000, 5000), (100, 50)) == (0, 0, 1023, 1023)
    assert encode_boxes([(-10, -5, 5000, 5000)], ["cat"], (100, 50)) == loc(0, 0, 1023, 1023) + " cat"


def test_encode_format_matches_model_output() -> None:
    text = encode_boxes([(0, 0, 100, 100), (10, 10, 20, 20)], ["  red   car ", ""], (100, 100))
    assert text == loc(0, 0, 1023, 1023) + " red car ; " + loc(102, 102, 205, 205)
    assert encode_boxes([], [], (10, 10)) == ""


def test_encode_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        encode_boxes([(0, 0, 1, 1), (0, 0, 1, 1)], ["cat"], (10, 10))
    with pytest.raises(InputError, match="sequence of strings"):
        encode_boxes([(0, 0, 1, 1)], "c", (10, 10))


@pytest.mark.parametrize("label", ["cat ; dog", "<loc0001>", "a>b"])
def test_encode_rejects_labels_the_parser_could_not_read(label: str) -> None:
    with pytest.raises(InputError, match="contains"):
        encode_boxes([(0, 0, 1, 1)], [label], (10, 10))


@pytest.mark.parametrize("box", [(5, 5, 1, 1), (0, 0, float("nan"), 1), (0, 0, 1), ("a", 0, 1, 1)])
def test_encode_rejects_bad_boxes(box) -> None:
    with pytest.raises(InputError, match="box 0"):
        encode_boxes([box], ["cat"], (10, 10))


@pytest.mark.parametrize("bins", [(0, 0, 0, 1024), (0, 0, 0), (-1, 0, 0, 0), (0.5, 0, 1, 1), (True, 0, 1, 1)])
def test_bins_to_box_rejects_bad_bins(bins) -> None:
    with pytest.raises(InputError):
        bins_to_box(bins, (10, 10))


def test_format_objects_rejects_bad_seg_codes() -> None:
    with pytest.raises(InputError, match="seg_codes"):
        format_objects([ParsedObject((0, 0, 1, 1), (1, 2, 3), "cat")])
    with pytest.raises(InputError, match="seg_codes"):
        format_objects([ParsedObject((0, 0, 1, 1), (128,) * 16, "cat")])


# ------------------------------------------------------------------------------------------------------------
# Prompt


def test_detect_prompt() -> None:
    assert detect_prompt("cat") == "detect cat"
    assert detect_prompt([" cat ", "red  car"]) == "detect cat ; red car"
    assert detect_prompt(("a",)) == "detect a"


@pytest.mark.parametrize("labels", ["", "   ", [], ["cat", ""], "cat ; dog", ["cat;dog"], ["<loc0001>"], [3]])
def test_detect_prompt_rejects_bad_labels(labels) -> None:
    with pytest.raises(InputError):
        detect_prompt(labels)


# ------------------------------------------------------------------------------------------------------------
# Drawing


def test_draw_returns_new_image_and_leaves_input_unchanged() -> None:
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    before = image.tobytes()
    det = Detection("cat", (20.0, 40.0, 120.0, 90.0), box_to_bins((20, 40, 120, 90), (200, 100)))
    out = draw_detections(image, [det])
    assert out is not image and out.size == image.size and out.mode == "RGB"
    assert image.tobytes() == before
    assert out.getpixel((20, 65)) != (128, 128, 128)  # left edge of the box
    assert out.getpixel((119, 65)) != (128, 128, 128)  # right edge
    assert out.getpixel((70, 65)) == (128, 128, 128)  # inside, away from the label
    assert out.getpixel((190, 5)) == (128, 128, 128)  # outside
    assert any(out.getpixel((x, 35)) != (128, 128, 128) for x in range(20, 40))  # label above the box


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_draw_accepts_modes_and_returns_rgb(mode: str) -> None:
    image = Image.new(mode, (64, 48))
    dets = parse_detections(loc(0, 0, 1023, 1023) + " a ; " + loc(100, 100, 500, 500), image.size)
    out = draw_detections(image, dets, width=3)
    assert out.mode == "RGB" and out.size == (64, 48)
    blank = draw_detections(image, [])
    assert out.getpixel((1, 30)) != blank.getpixel((1, 30))  # the left box edge is drawn
    assert out.getpixel((40, 40)) == blank.getpixel((40, 40))


def test_draw_with_no_detections_is_a_copy() -> None:
    image = Image.new("RGBA", (5, 5), (255, 0, 0, 255))
    out = draw_detections(image, [])
    assert out is not image and out.mode == "RGB" and out.getpixel((2, 2)) == (255, 0, 0)


def test_draw_handles_tiny_and_edge_boxes() -> None:
    image = Image.new("RGB", (3, 2))
    dets = [
        Detection("x", (0.0, 0.0, 3.0, 2.0), (0, 0, 1023, 1023)),
        Detection("", (3.0, 2.0, 3.0, 2.0), (0,) * 4),
    ]
    assert draw_detections(image, dets).size == (3, 2)


def test_label_colours_are_distinct_and_stable() -> None:
    colours = label_colours(["cat", "dog", "cat", "red car"] + [f"l{i}" for i in range(30)])
    assert list(colours)[:3] == ["cat", "dog", "red car"]
    assert len(set(colours.values())) == len(colours)
    assert label_colours(["cat", "dog"]) == {k: colours[k] for k in ("cat", "dog")}
