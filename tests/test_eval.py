"""VQA evaluation: the official accuracy and its normalisation, the VQAv2 file layout, and a real end-to-end run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import BLUE, RED
from vlmo.data.vqav2 import VQAExample, load_vqav2
from vlmo.errors import InputError
from vlmo.finetune.evaluate import VQAReport, evaluate_vqa, vqa_accuracy
from vlmo.finetune.vqa_normalize import normalize_answer

# ------------------------------------------------------------------------------------------------------------
# The metric


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_k_matches_among_ten(k: int, expected: float) -> None:
    # Leave-one-out over 10 answers: 10 − k subsets keep k matches, k subsets keep k − 1 (see vqa_accuracy).
    assert vqa_accuracy("cat", ["cat"] * k + ["dog"] * (10 - k)) == expected


@given(st.lists(st.sampled_from(["cat", "dog", "two", "2"]), min_size=10, max_size=10), st.sampled_from(["cat", "2"]))
def test_ten_answers_give_only_the_five_official_values(answers: list[str], prediction: str) -> None:
    for mode in ("official", "normalize_all"):
        assert vqa_accuracy(prediction, answers, mode) in {0.0, 0.3, 0.6, 0.9, 1.0}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Two.", "2"),  # period dropped, lower-cased, number word → digit
        ("the dog", "dog"),  # articles go
        ("a red car", "red car"),
        ("isnt", "isn't"),  # contractions get their apostrophe back
        ("youre", "you're"),
        ("1,000", "1000"),  # digit,digit: commas are deleted, not spaced
        ("dog.", "dog"),  # a trailing period goes ...
        ("2.5", "2.5"),  # ... a decimal point stays
        ("yes!", "yes"),
        ("Yes", "yes"),
        ("  no\n", "no"),
        ("red/white", "red white"),  # punctuation between words becomes a space
        ("none", "0"),
    ],
)
def test_normalisation_matches(prediction: str, answer: str) -> None:
    # normalize_all normalises everything always. Official normalises only when the humans disagree, so the
    # second list (nine agreeing answers and one odd one) makes it normalise too: 9 matches → 1.0.
    assert vqa_accuracy(prediction, [answer] * 10, "normalize_all") == 1.0
    assert vqa_accuracy(prediction, [answer] * 9 + ["something else"], "official") == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("isnt it, the 1,000?", "isn't it 1000"),  # one digit,digit run: every mark is deleted
        ("red,white", "red white"),  # no digit,digit and no space next to it: the comma becomes a space
        ("yes !", "yes"),  # next to a space: deleted
        ("3.5 m.", "3.5 m"),
        ("A\tcat", "cat"),
        ("dont", "don't"),
        ("it's", "it's"),  # apostrophes are not punctuation here
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_official_quirk_normalises_only_when_humans_disagree() -> None:
    # The official script (vqaEval.py since 2021) processes punctuation, case, number words, articles and
    # contractions — of the prediction and the human answers alike — only when the stripped human answers are not
    # all the same string. Ten humans wrote "Two": official compares "2" with "Two" unchanged and finds no match;
    # normalize_all turns both into "2".
    assert vqa_accuracy("2", ["Two"] * 10, "official") == 0.0
    assert vqa_accuracy("2", ["Two"] * 10, "normalize_all") == 1.0
    # The same holds for the prediction: "Yes" is not "yes" when all humans agree ...
    assert vqa_accuracy("Yes", ["yes"] * 10, "official") == 0.0
    # ... but one dissenting human switches normalisation on for everyone.
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"], "official") == 1.0
    # Newlines, tabs and outer spaces are always cleaned.
    assert vqa_accuracy(" yes\n", ["yes"] * 10, "official") == 1.0


def test_other_numbers_of_answers() -> None:
    assert vqa_accuracy("cat", ["cat"]) == 1.0  # one answer: exact match (leave-one-out would leave nothing)
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("Cat.", ["cat"], "normalize_all") == 1.0
    assert vqa_accuracy("Cat.", ["cat"], "official") == 0.0  # one answer "agrees with itself": no normalisation
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)  # each subset keeps one match
    assert vqa_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)  # the most 3 answers can give
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 16) == 1.0  # every subset of 19 keeps ≥ 3 matches
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 17) == pytest.approx((3 * 2 / 3 + 17) / 20)


def test_bad_metric_inputs() -> None:
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("cat", [])
    with pytest.raises(InputError, match="not a single string"):
        vqa_accuracy("cat", "cat")
    with pytest.raises(InputError, match="unknown VQA accuracy mode"):
        vqa_accuracy("cat", ["cat"], "strict")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="prediction must be a string"):
        vqa_accuracy(None, ["cat"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------
# The VQAv2 files

COLOURS = {1: RED, 2: BLUE, 3: (30, 200, 30)}


def write_vqav2(
    root: Path,
    qa: Sequence[tuple[int, int, str, list[str], str]],
    *,
    split: str = "val2014",
    subtype: str | None = "val2014",
    naming: str = "COCO_{split}_{id:012d}.jpg",
) -> tuple[Path, Path, Path]:
    """Solid 96×64 images and the two official JSON files for `qa`: (question_id, image_id, question, answers,
    answer_type)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for image_id in {q[1] for q in qa}:
        Image.new("RGB", (96, 64), COLOURS[image_id]).save(images / naming.format(split=split, id=image_id), quality=95)
    questions: dict[str, Any] = {
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _, _ in qa]
    }
    if subtype is not None:
        questions["data_subtype"] = subtype
    annotations = {
        "annotations": [
            {
                "question_id": qid,
                "image_id": i,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(ans)],
                "multiple_choice_answer": ans[0],
                "answer_type": atype,
                "question_type": "what color is",
            }
            for qid, i, _, ans, atype in qa
        ]
    }
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    return root / "questions.json", root / "annotations.json", images


COLOUR_QA = [
    (10, 1, "what color is it?", ["red"] * 10, "other"),  # right: 1.0
    (20, 2, "what color is it?", ["blue"] * 2 + ["navy"] * 8, "other"),  # 2 of 10 humans agree: 0.6
    (30, 1, "what color is it?", ["yes"] * 10, "yes/no"),  # wrong: 0.0
]


def test_load_vqav2(tmp_path: Path) -> None:
    qa = [*COLOUR_QA, (40, 3, "is it green?", ["yes"] * 10, "yes/no")]
    questions, annotations, images = write_vqav2(tmp_path, qa)
    examples = load_vqav2(questions, annotations, images)
    assert [e.question_id for e in examples] == [10, 20, 30, 40]
    first = examples[0]
    assert first == VQAExample(
        question_id=10,
        image_id=1,
        image=images / "COCO_val2014_000000000001.jpg",
        question="what color is it?",
        answers=("red",) * 10,
        answer_type="other",
        question_type="what color is",
    )
    assert all(e.image.is_file() for e in examples)


def test_load_vqav2_finds_the_split(tmp_path: Path) -> None:
    # No data_subtype: the only COCO_<split>_ prefix in the folder decides.
    q, a, images = write_vqav2(tmp_path / "a", COLOUR_QA, split="train2014", subtype=None)
    assert load_vqav2(q, a, images)[0].image.name == "COCO_train2014_000000000001.jpg"
    # test-dev questions are about the test2015 images.
    q, a, images = write_vqav2(tmp_path / "b", COLOUR_QA, split="test2015", subtype="test-dev2015")
    assert load_vqav2(q, a, images)[0].image.name == "COCO_test2015_000000000001.jpg"
    # COCO 2017 names (the same ids, no prefix).
    q, a, images = write_vqav2(tmp_path / "c", COLOUR_QA, naming="{id:012d}.jpg")
    assert load_vqav2(q, a, images)[0].image.name == "000000000001.jpg"
    # Two splits side by side and nothing to choose by: ask for a hint, then follow it.
    q, a, images = write_vqav2(tmp_path / "d", COLOUR_QA, split="val2014", subtype=None)
    write_vqav2(tmp_path / "d", COLOUR_QA, split="train2014", subtype=None)
    with pytest.raises(InputError, match="several splits.*split_hint"):
        load_vqav2(q, a, images)
    assert load_vqav2(q, a, images, split_hint="train2014")[0].image.name == "COCO_train2014_000000000001.jpg"


def _edit(path: Path, change: Any) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_load_vqav2_errors(tmp_path: Path) -> None:
    q, a, images = write_vqav2(tmp_path, COLOUR_QA)
    with pytest.raises(InputError, match="questions file .* does not exist"):
        load_vqav2(tmp_path / "nope.json", a, images)
    with pytest.raises(InputError, match="image folder .* does not exist"):
        load_vqav2(q, a, tmp_path / "no-images")
    with pytest.raises(
        InputError, match=r"2 of 2 images \(COCO_train2014_\*\.jpg\) are missing .*holds COCO_val2014_\*"
    ):
        load_vqav2(q, a, images, split_hint="train2014")
    (images / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(InputError, match=r"1 of 2 images .* missing .*COCO_val2014_000000000002\.jpg"):
        load_vqav2(q, a, images)

    q, a, images = write_vqav2(tmp_path / "fresh", COLOUR_QA)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_vqav2(q, bad, images)
    _edit(a, lambda d: d["annotations"].pop())
    with pytest.raises(InputError, match="question 30 .* has no annotation"):
        load_vqav2(q, a, images)
    q, a, images = write_vqav2(tmp_path / "extra", COLOUR_QA)
    _edit(q, lambda d: d["questions"].pop(0))
    with pytest.raises(InputError, match="1 annotated question.* missing .* question_id 10"):
        load_vqav2(q, a, images)
    q, a, images = write_vqav2(tmp_path / "mismatch", COLOUR_QA)
    _edit(a, lambda d: d["annotations"][1].update(image_id=1))
    with pytest.raises(InputError, match="question 20 is about image 2 .* but image 1"):
        load_vqav2(q, a, images)
    q, a, images = write_vqav2(tmp_path / "field", COLOUR_QA)
    _edit(q, lambda d: d["questions"][0].pop("question"))
    with pytest.raises(InputError, match=r'questions\[0\]: "question" must be a string'):
        load_vqav2(q, a, images)
    _edit(q, lambda d: d.pop("questions"))
    with pytest.raises(InputError, match='no "questions" list'):
        load_vqav2(q, a, images)


# ------------------------------------------------------------------------------------------------------------
# The evaluation


def test_evaluate_vqa_with_a_real_model(taught_checkpoint: Path, tmp_path: Path) -> None:
    from vlmo import VLMo

    q, a, images = write_vqav2(tmp_path / "data", COLOUR_QA)
    vlm = VLMo.from_pretrained(taught_checkpoint, device="cpu")
    report = evaluate_vqa(vlm, load_vqav2(q, a, images), batch_size=2, progress=False)  # batches of 2 and 1

    assert [(p.question_id, p.answer, p.accuracy) for p in report.predictions] == [
        (10, "red", 1.0),
        (20, "blue", 0.6),
        (30, "red", 0.0),
    ]
    assert report.count == 3
    assert report.accuracy == pytest.approx(1.6 / 3)
    assert {k: (v.accuracy, v.count) for k, v in report.per_answer_type.items()} == {
        "other": (pytest.approx(0.8), 2),
        "yes/no": (0.0, 1),
    }
    assert list(report.per_answer_type) == ["yes/no", "other"]  # the usual reporting order

    report_file, results_file = report.write(tmp_path / "out" / "report.json")
    assert results_file == tmp_path / "out" / "report_results.json"
    assert json.loads(results_file.read_text()) == [
        {"question_id": 10, "answer": "red"},
        {"question_id": 20, "answer": "blue"},
        {"question_id": 30, "answer": "red"},
    ]
    saved = json.loads(report_file.read_text())
    assert saved["task"] == "vqav2" and saved["mode"] == "official" and saved["count"] == 3
    assert saved["accuracy"] == pytest.approx(1.6 / 3)
    assert saved["per_answer_type"]["other"] == {"accuracy": pytest.approx(0.8), "count": 2}
    assert saved["per_question_type"] == {"what color is": {"accuracy": pytest.approx(1.6 / 3), "count": 3}}
    assert [p["accuracy"] for p in saved["predictions"]] == [1.0, 0.6, 0.0]

    table = report.format_table().splitlines()
    assert table[0].split() == ["answer", "type", "questions", "accuracy"]
    assert table[1].split() == ["yes/no", "1", "0.00%"]
    assert table[2].split() == ["other", "2", "80.00%"]
    assert table[3].split() == ["overall", "3", "53.33%"]


class FakeVLM:
    """Answers every question with a fixed text and records the batches it was given."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.calls: list[tuple[list[Any], list[str], dict[str, Any]]] = []

    def ask(self, images: list[Any], questions: list[str], **options: Any) -> list[str]:
        self.calls.append((images, questions, options))
        return [f" {self.answer}\n"] * len(questions)


def _examples(n: int) -> list[VQAExample]:
    return [VQAExample(i, i, Path(f"{i}.jpg"), f"question {i}?", ("yes",) * 10, "yes/no", "is it") for i in range(n)]


def test_evaluate_vqa_batches_options_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    vlm = FakeVLM("Yes")
    report = evaluate_vqa(vlm, _examples(5), batch_size=2, max_new_tokens=7, lang="de", progress=True)  # type: ignore[arg-type]
    assert [len(c[1]) for c in vlm.calls] == [2, 2, 1]
    assert vlm.calls[0][2] == {"lang": "de", "max_new_tokens": 7}
    assert vlm.calls[0][0] == [Path("0.jpg"), Path("1.jpg")]
    assert [p.answer for p in report.predictions] == ["Yes"] * 5  # stripped
    assert report.accuracy == 0.0  # official: ten agreeing "yes" are not normalised, so "Yes" misses
    captured = capsys.readouterr()
    assert captured.out == "" and "VQAv2" in captured.err  # progress goes to stderr only

    assert evaluate_vqa(FakeVLM("Yes"), _examples(2), mode="normalize_all", progress=False).accuracy == 1.0  # type: ignore[arg-type]


def test_evaluate_vqa_errors() -> None:
    with pytest.raises(InputError, match="no VQA examples"):
        evaluate_vqa(FakeVLM("x"), [], progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch_size"):
        evaluate_vqa(FakeVLM("x"), _examples(1), batch_size=0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown VQA accuracy mode"):
        evaluate_vqa(FakeVLM("x"), _examples(1), mode="loose")  # type: ignore[arg-type]


def test_empty_report_and_same_paths(tmp_path: Path) -> None:
    report = VQAReport((), "official")
    assert report.accuracy == 0.0 and report.per_answer_type == {} and report.results() == []
    with pytest.raises(InputError, match="both be"):
        report.write(tmp_path / "r.json", tmp_path / "r.json")
