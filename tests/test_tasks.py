"""Task methods (ask, caption, ocr, detect) end to end on the taught tiny model, saving weights back, and answers
rebuilt from their JSON as a client reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from PIL import Image

from conftest import BLUE, RED, TAUGHT_DETECTION
from vlmo import VLMo, tasks
from vlmo.demo.standins import blob_mask_decoder
from vlmo.detection import Detection, parse_detections
from vlmo.errors import InputError
from vlmo.segmentation import Segmentation, parse_segmentations


@pytest.fixture(scope="module")
def vlm(taught_checkpoint: Path) -> VLMo:
    return VLMo.from_pretrained(taught_checkpoint, device="cpu")


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_saved_weights_reload_to_the_same_model(vlm: VLMo, taught_checkpoint: Path) -> None:
    again = VLMo.from_pretrained(taught_checkpoint, device="cpu")
    for (name, a), b in zip(vlm.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_ask_caption_ocr(vlm: VLMo) -> None:
    assert vlm.ask(solid(RED), "what color is it?") == "red"
    assert vlm.ask([solid(RED), solid(BLUE)], "what color is it?") == ["red", "blue"]
    assert vlm.ask(solid(BLUE), ["what color is it?", "  what   color is it? "]) == ["blue", "blue"]
    assert vlm.caption(solid(RED)) == "a red square"
    assert vlm.ocr(solid(RED)) == "STOP"
    with pytest.raises(InputError, match="detail"):
        vlm.caption(solid(RED), detail="huge")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        vlm.ask(solid(RED), "   ")


def test_detect_returns_boxes_in_original_pixels(vlm: VLMo) -> None:
    # The squash to the model's square input is undone: bins are fractions of the original width/height.
    found = vlm.detect(solid(RED, (1023, 2046)), "cat ; dog")
    assert [d.label for d in found] == ["cat", "dog"]
    assert found[0] == Detection("cat", (200.0, 200.0, 700.0, 1200.0), (100, 200, 600, 700))
    assert vlm.detect(solid(RED), ["cat", "dog"]) == vlm.detect(solid(RED), "cat;dog")
    batch = vlm.detect([solid(RED), solid(RED, (50, 50))], "cat ; dog")
    assert len(batch) == 2 and all(len(b) == 2 for b in batch)


def test_detect_drops_an_object_cut_off_by_max_tokens(vlm: VLMo) -> None:
    # Stop one token before the end: the second object loses (part of) its label and must not be reported.
    n = len(vlm.text.tokenizer.encode(TAUGHT_DETECTION, add_special_tokens=False).ids)
    full = vlm.generate(solid(RED), "detect cat ; dog", max_new_tokens=n - 1)
    assert full.count("<loc") == 8 and not full.endswith("dog")
    found = vlm.detect(solid(RED), "cat ; dog", max_new_tokens=n - 1)
    assert [d.label for d in found] == ["cat"]


def test_detect_rejects_empty_labels(vlm: VLMo) -> None:
    with pytest.raises(InputError):
        vlm.detect(solid(RED), "cat ; ")


def test_segment_returns_masks_of_the_original_size(vlm: VLMo, filled_mask_decoder: Path) -> None:
    (seg,) = vlm.segment(solid(RED, (1023, 2046)), "cat", mask_decoder=filled_mask_decoder)
    assert seg.label == "cat" and seg.box == (200.0, 200.0, 700.0, 1200.0)
    assert seg.seg_codes == tuple(range(16))
    assert seg.mask.shape == (2046, 1023) and seg.mask.dtype == torch.bool
    inside = torch.zeros(2046, 1023, dtype=torch.bool)
    inside[200:1200, 200:700] = True  # the decoder fills its box: the mask is exactly the box's pixels
    assert torch.equal(seg.mask, inside)
    batch = vlm.segment([solid(RED), solid(RED, (30, 90))], ["cat"], mask_decoder=filled_mask_decoder)
    assert [b[0].mask.shape for b in batch] == [(64, 96), (90, 30)]
    assert vlm.segment(solid(RED), "cat", mask_decoder=filled_mask_decoder, max_new_tokens=10) == []


@pytest.mark.parametrize("model", [123, None, b"google/paligemma-3b-mix-224"])
def test_from_pretrained_wants_a_name_or_a_path(model: object) -> None:
    with pytest.raises(InputError, match=r"^model must be a hub id or a local directory .*got (int|NoneType|bytes)"):
        VLMo.from_pretrained(model)  # type: ignore[arg-type]


@pytest.mark.parametrize("question", [None, 42, ""])
def test_ask_wants_text(vlm: VLMo, question: object) -> None:
    with pytest.raises(InputError) as info:
        vlm.ask(solid(RED), question)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "task", "prompt"),
    [
        ("What is in this picture?", "ask", "answer en What is in this picture?"),  # free text is a question
        ("  how   many cats? ", "ask", "answer en how many cats?"),
        ("Describe the dog", "ask", "answer en Describe the dog"),  # task words are lowercase
        ("caption en", "caption", "caption en"),  # a task prefix is a prompt as it is
        ("describe fr", "caption", "describe fr"),
        ("cap en", "caption", "cap en"),
        ("ocr", "ocr", "ocr"),
        ("answer fr où est le chat ?", "ask", "answer fr où est le chat ?"),
        ("question en red", "generate", "question en red"),
        ("detect cat;dog", "detect", "detect cat ; dog"),  # normalised as tasks.detect does, with its length
        ("segment  red car ", "segment", "segment red car"),
        ("detection of cats", "ask", "answer en detection of cats"),  # the whole first word must match
    ],
)
def test_chat_text_becomes_a_prompt_by_one_rule(text: str, task: str, prompt: str) -> None:
    from vlmo import tasks

    assert tasks.from_chat_text(text) == tasks.Prompt(task, prompt)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "   ", "detect", "detect cat ; ", "segment <loc0001>", None])
def test_chat_text_that_is_no_prompt_is_an_input_error(text: object) -> None:
    from vlmo import tasks

    with pytest.raises(InputError):
        tasks.from_chat_text(text)  # type: ignore[arg-type]


# -- the one dispatch: tasks.prompt ------------------------------------------------------------------------------


def test_prompt_dispatches_every_task_as_its_own_function_does() -> None:
    assert tasks.prompt("ask", question="what is this?", lang="fr") == tasks.ask("what is this?", "fr")
    assert tasks.prompt("caption", detail="long", lang="de") == tasks.caption("long", "de")
    assert tasks.prompt("ocr") == tasks.ocr()
    assert tasks.prompt("detect", labels="cat ; dog") == tasks.detect("cat ; dog")
    assert tasks.prompt("segment", labels=["cat"]) == tasks.segment(["cat"])
    assert tasks.prompt("generate", text="detect cat") == tasks.raw("detect cat")
    assert set(tasks.DEFAULT_MAX_NEW_TOKENS) == {"ask", "caption", "ocr", "detect", "segment", "generate"}


@pytest.mark.parametrize(
    ("task", "given", "fragment"),
    [
        ("draw", {}, "unknown task 'draw'"),
        ("ask", {}, "the ask task needs a question"),
        ("detect", {}, "the detect task needs labels"),
        ("generate", {}, "the generate task needs a text"),
        ("caption", {"question": "why?"}, "the caption task takes no question"),
        ("ask", {"question": "why?", "labels": "cat"}, "the ask task takes no labels"),
        ("caption", {"detail": "medium"}, "unknown caption detail"),
    ],
)
def test_prompt_refuses_what_a_task_cannot_use(task: str, given: dict[str, str], fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        tasks.prompt(task, **given)  # type: ignore[arg-type]


def test_an_answer_is_its_payload_rows_and_picture() -> None:
    box = Detection("cat", (1.0, 2.0, 30.0, 40.0), (2, 1, 40, 30))
    found = tasks.Answer(tasks.detect("cat"), "<loc…> cat", (64, 48), "stop", [box])
    assert found.payload() == tasks.located_payload("detect", (64, 48), [box])
    assert found.rows() == [["cat", 1.0, 2.0, 30.0, 40.0]]
    image = Image.new("RGB", (64, 48))
    drawn = found.draw(image)
    assert drawn.size == image.size and drawn.tobytes() != image.tobytes()  # the box is drawn, on a copy
    text = tasks.Answer(tasks.caption(), "a cat", (64, 48), "length")
    assert text.payload() == {"task": "caption", "text": "a cat"} and text.rows() == []
    assert text.draw(image).tobytes() == image.tobytes()


def through_json(payload: dict[str, object]) -> dict[str, object]:
    """`payload` as a client reads it back from the server's answer."""
    return cast("dict[str, object]", json.loads(json.dumps(payload)))


def seg_tokens(codes: list[int]) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


# Two labels (two colours), inverted bins (swapped into order) and bins whose pixels are not round numbers.
LOCATED = (
    "<loc0100><loc0200><loc0600><loc0700>{codes} cat ; "
    "<loc0900><loc0811><loc0333><loc0123>{codes} red car ; "
    "<loc0000><loc0000><loc1023><loc1023>{codes} cat"
)


def test_a_detect_answer_is_rebuilt_from_its_json() -> None:
    prompt, size = tasks.detect("cat ; red car"), (97, 61)
    text = LOCATED.format(codes="")
    answer = tasks.Answer(prompt, text, size, "length", parse_detections(text, size))
    again = tasks.Answer.from_payload(prompt, through_json(answer.payload()), text, "length")
    assert again == answer  # Detections compare by value: the same boxes, to the last bit
    assert again.payload() == answer.payload() and again.rows() == answer.rows()
    image = Image.new("RGB", size, (40, 90, 160))
    assert again.draw(image).tobytes() == answer.draw(image).tobytes()


def test_a_segment_answer_is_rebuilt_from_its_json() -> None:
    prompt, size = tasks.segment("cat ; red car"), (97, 61)
    blob = [0, 64, 64, 0, 64, 127, 127, 64, 0, 127, 100, 0, 0, 0, 64, 0]  # a shape no box alone would give
    found = parse_segmentations(LOCATED.format(codes=seg_tokens(blob)), size, blob_mask_decoder())
    assert len(found) == 3 and all(s.mask.any() and not s.mask.all() for s in found[:2])
    answer = tasks.Answer(prompt, "", size, "stop", found)
    payload = through_json(answer.payload())
    again = tasks.Answer.from_payload(prompt, payload)
    assert again.payload() == payload == answer.payload() and again.rows() == answer.rows()
    assert all(
        torch.equal(a.mask, b.mask) for a, b in zip(cast("list[Segmentation]", again.objects), found, strict=True)
    )
    image = Image.new("RGB", size, (40, 90, 160))
    assert again.draw(image).tobytes() == answer.draw(image).tobytes()
    rows = through_json({**answer.payload(), "segmentations": [s.to_dict(rle=False) for s in found]})
    assert tasks.Answer.from_payload(prompt, rows).payload() == payload  # rows of 0/1 are read too


def test_a_text_answer_is_rebuilt_from_its_json() -> None:
    payload = {"task": "caption", "text": "a cat"}
    again = tasks.Answer.from_payload(tasks.caption(), payload, finish_reason="length")
    assert again.payload() == payload and again.text == "a cat" and again.finish_reason == "length"
    assert again.rows() == []


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"task": "segment", "size": [4, 2], "segmentations": []}, "not a detect answer"),
        ({"task": "detect", "size": [4, 0], "detections": []}, "size must be"),
        ({"task": "detect", "size": [4, 2]}, "detections must be a list"),
        (
            {"task": "detect", "size": [4, 2], "detections": [{"label": "a", "box": [3, 0, 1, 1], "bins": [0] * 4}]},
            "min",
        ),
        (
            {"task": "detect", "size": [4, 2], "detections": [{"label": "a", "box": [0] * 4, "bins": [0, 0, 1024, 0]}]},
            "bins",
        ),
    ],
)
def test_a_payload_that_no_answer_gave_is_an_input_error(payload: dict[str, object], fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        tasks.Answer.from_payload(tasks.detect("a"), payload)


def test_a_segment_payload_whose_masks_do_not_fit_its_image_is_an_input_error() -> None:
    (seg,) = parse_segmentations(
        f"<loc0000><loc0000><loc1023><loc1023>{seg_tokens([64] * 16)} a", (4, 2), blob_mask_decoder()
    )
    payload = tasks.located_payload("segment", (4, 2), [seg])
    with pytest.raises(InputError, match="does not fit"):
        tasks.Answer.from_payload(tasks.segment("a"), {**payload, "size": [2, 4]})
    with pytest.raises(InputError, match="masks must be"):
        tasks.Answer.from_payload(tasks.segment("a"), {**payload, "mask_encoding": "png"})
