"""The spatial questions of `benchmarks/connector.py`: right answers, the margin rules, balanced and disjoint sets."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from vlmo.demo.shapes import Scene, Shape, ShapeKind, make_scene

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "connector.py"
_spec = importlib.util.spec_from_file_location("connector_benchmark", _PATH)
assert _spec is not None and _spec.loader is not None
connector = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = connector  # dataclasses look their module up while the class is built
_spec.loader.exec_module(connector)


def shape(kind: ShapeKind, x0: int, y0: int, side: int = 40) -> Shape:
    return Shape(kind, "red", (220, 40, 40), (x0, y0, x0 + side, y0 + side))


def scene(*shapes: Shape, width: int = 200, height: int = 200) -> Scene:
    return Scene(width, height, (240, 240, 240), tuple(sorted(shapes, key=lambda s: s.centre_x)), 0.0, 0)


def test_side_answers_and_the_midline_margin() -> None:
    # 200 px wide: the midline is x = 100 and the margin 20 px, so a box centre must be at x ≤ 80 or x ≥ 120.
    s = scene(shape("circle", 10, 10), shape("square", 140, 100))  # centres x = 30 and 160
    assert connector.side_answer(s, "circle") == "left"
    assert connector.side_answer(s, "square") == "right"
    assert connector.side_answer(s, "triangle") is None  # not in the scene
    assert connector.side_answer(scene(shape("circle", 60, 10)), "circle") == "left"  # centre 80: exactly 10 %
    assert connector.side_answer(scene(shape("circle", 100, 10)), "circle") == "right"  # centre 120
    assert connector.side_answer(scene(shape("circle", 61, 10)), "circle") is None  # centre 81: too close
    assert connector.side_answer(scene(shape("circle", 99, 10)), "circle") is None
    two = scene(shape("circle", 10, 10), shape("circle", 140, 10))
    assert connector.side_answer(two, "circle") is None  # which circle? not asked


def test_vertical_answers_and_their_margin() -> None:
    # 200 px high: centres at least 20 px apart vertically; y grows downwards.
    s = scene(shape("square", 10, 10), shape("triangle", 120, 100))  # centres y = 30 and 120
    assert connector.vertical_answer(s, "square", "triangle") == "above"
    assert connector.vertical_answer(s, "triangle", "square") == "below"
    assert connector.vertical_answer(s, "square", "square") is None
    assert connector.vertical_answer(s, "square", "circle") is None  # no circle
    edge = scene(shape("square", 10, 10), shape("circle", 120, 30))  # centres 20 px apart: exactly 10 %
    assert connector.vertical_answer(edge, "circle", "square") == "below"
    close = scene(shape("square", 10, 10), shape("circle", 120, 29))
    assert connector.vertical_answer(close, "circle", "square") is None
    extra = scene(shape("square", 10, 10), shape("circle", 80, 100), shape("circle", 150, 150))
    assert connector.vertical_answer(extra, "square", "circle") is None  # two circles


def test_scene_questions_lists_every_allowed_question() -> None:
    s = scene(shape("circle", 10, 10), shape("triangle", 140, 120))
    assert set(connector.scene_questions(s)) == {
        ("answer en which side is the circle on?", "left"),
        ("answer en which side is the triangle on?", "right"),
        ("answer en is the circle above or below the triangle?", "above"),
        ("answer en is the triangle above or below the circle?", "below"),
    }


@pytest.fixture(scope="module")
def sets() -> tuple[list, list]:
    return connector.spatial_set(connector.TRAIN_STREAM, 400), connector.spatial_set(connector.HELDOUT_STREAM, 400)


def test_the_sets_are_balanced_and_every_answer_follows_the_rules(sets: tuple[list, list]) -> None:
    for questions in sets:
        assert len(questions) == 400
        assert Counter(q.answer for q in questions) == {"left": 100, "right": 100, "above": 100, "below": 100}
        assert len({q.index for q in questions}) == 400  # one question per scene
        for q in questions:
            assert q.scene == make_scene(q.stream, q.index, connector.SCENE_SIZE)
            assert (q.prefix, q.answer) in connector.scene_questions(q.scene)
    odd = connector.spatial_set("odd", 6)  # the remainder alternates the question types
    assert Counter(q.answer for q in odd) == {"left": 2, "above": 2, "right": 1, "below": 1}
    assert connector.spatial_set("odd", 6) == odd  # a pure function of its arguments


def test_training_and_heldout_sets_share_no_scene(sets: tuple[list, list]) -> None:
    train, heldout = sets
    assert {q.stream for q in train} == {"spatial-train"} and {q.stream for q in heldout} == {"spatial-heldout"}
    layouts = {q.scene.shapes for q in train}
    assert not any(q.scene.shapes in layouts for q in heldout)


def test_score_counts_blank_and_hallucinated_answers() -> None:
    s = scene(shape("circle", 10, 10), shape("triangle", 140, 120))
    side = connector.SpatialQuestion("t", 0, s, "answer en which side is the circle on?", "left")
    vertical = connector.SpatialQuestion("t", 1, s, "answer en is the circle above or below the triangle?", "above")
    questions = [side, side, side, vertical, vertical, vertical]
    result = connector.score(questions, [" left", "right", "  ", "left", "red", "above"])
    assert result["accuracy"] == pytest.approx(2 / 6)
    assert (result["blank"], result["hallucinated"], result["wrong_pair"]) == (1, 2, 1)
    assert result["side_accuracy"] == pytest.approx(1 / 3) and result["vertical_accuracy"] == pytest.approx(1 / 3)
