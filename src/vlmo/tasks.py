"""PaliGemma's tasks, each in one place: its prompt, its default answer length and its output payload.

Every face builds its prompts and payloads here: the Python API (`VLMo.ask`, `VLMo.detect`, …), the CLI, the app,
the server and the batch runner. A task is therefore spelled the same everywhere: `prompt(task, …)` is the one
dispatch from what a user typed to a `Prompt`, `VLMo.run` answers any `Prompt` with an `Answer`, and
`Answer.payload()` is its JSON. Adding a task touches this module, `VLMo.run` and the faces' option lists.

    tasks.ask("what is this?")          # Prompt(task="ask", text="answer en what is this?", max_new_tokens=64)
    tasks.caption("long", lang="fr")    # Prompt(task="caption", text="describe fr", max_new_tokens=64)
    tasks.detect("cat ; dog")           # Prompt(task="detect", text="detect cat ; dog", max_new_tokens=128)

The prompt syntax is PaliGemma's own (docs/model-notes.md has the prompt layout around it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from vlmo.detection import Detection, detect_prompt
from vlmo.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

    from vlmo.segmentation import Segmentation

TaskName = Literal["ask", "caption", "ocr", "detect", "segment", "generate"]
CaptionDetail = Literal["short", "long", "raw"]
# The three caption prompts: COCO-like short captions, long descriptions, alt-text style (pretrained models only).
CAPTION_PREFIXES: dict[str, str] = {"short": "caption", "long": "describe", "raw": "cap"}
# How many tokens an answer may take unless the caller says: a located object costs 4 <loc> tokens plus its label
# (detect), and 16 <seg> tokens more (segment).
DEFAULT_MAX_NEW_TOKENS: dict[TaskName, int] = {
    "ask": 64,
    "caption": 64,
    "ocr": 64,
    "generate": 64,
    "detect": 128,
    "segment": 256,
}
# How `segment` payloads encode masks (see `vlmo.segmentation.Segmentation.to_dict`).
MASK_ENCODING = "coco_rle_uncompressed_column_major"


@dataclass(frozen=True)
class Prompt:
    """One task's prompt text (PaliGemma syntax) and how many new tokens its answer may take by default."""

    task: TaskName
    text: str

    @property
    def max_new_tokens(self) -> int:
        return DEFAULT_MAX_NEW_TOKENS[self.task]


def one_line(text: object, what: str) -> str:
    """`text` with its whitespace runs collapsed to single spaces; InputError if it is not text or is empty."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"the {what} is empty; pass some text")
    return " ".join(text.split())


def lang_code(lang: object) -> str:
    """A language code such as "en" or "fr" (one word); InputError otherwise."""
    code = lang.strip() if isinstance(lang, str) else ""
    if not code or len(code.split()) != 1:
        raise InputError(f"the answer language must be one code such as en or fr, got {lang!r}")
    return code


def ask(question: str, lang: str = "en") -> Prompt:
    """Answer a question about the image: `answer {lang} {question}`."""
    return Prompt("ask", f"answer {lang_code(lang)} {one_line(question, 'question')}")


def caption(detail: str = "short", lang: str = "en") -> Prompt:
    """Describe the image: "short" (`caption`), "long" (`describe`) or "raw" (`cap`)."""
    if detail not in CAPTION_PREFIXES:
        raise InputError(f"unknown caption detail {detail!r}; use short, long or raw")
    return Prompt("caption", f"{CAPTION_PREFIXES[detail]} {lang_code(lang)}")


def ocr() -> Prompt:
    """Read the text in the image."""
    return Prompt("ocr", "ocr")


def raw(prompt: str) -> Prompt:
    """A prompt typed by the user, used as it is (special tokens such as <loc0123> included)."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be text, got {type(prompt).__name__}")
    return Prompt("generate", prompt)


# The words that start a PaliGemma task prompt (the mix and pt checkpoints' prefixes), and the task each one is.
CHAT_TASK_WORDS: dict[str, TaskName] = {
    "answer": "ask",
    "question": "generate",  # `question en {answer}`: write a question that the answer answers
    "caption": "caption",
    "describe": "caption",
    "cap": "caption",
    "ocr": "ocr",
    "detect": "detect",
    "segment": "segment",
}


def from_chat_text(text: str, lang: str = "en") -> Prompt:
    """A chat message's text (the server's `/v1/chat/completions`) as a prompt, by one rule:

    - text whose first word is exactly a task word (`CHAT_TASK_WORDS`, lowercase: `caption en`, `ocr`,
      `answer fr où est le chat ?`, `detect cat ; dog`) is a PaliGemma prompt and used as it is (`detect` and
      `segment` normalised and checked as `detect` / `segment` do, with their longer default lengths);
    - any other text is a question: `answer {lang} {text}` (`ask`), so "What is in this picture?" just works.

    PaliGemma has no chat template: it was trained on these prefixes only, so free text sent as it is would get
    an answer to a prompt it never saw. A question that starts with a task word ("describe the dog's collar")
    therefore goes to the model as that task's prompt; write it as `answer en describe the dog's collar` to ask it.
    """
    if not isinstance(text, str):
        raise InputError(f"the message text must be text, got {type(text).__name__}")
    stripped = text.strip()
    first, rest = (stripped.split(maxsplit=1) + ["", ""])[:2]
    task = CHAT_TASK_WORDS.get(first)
    if task is None:
        return ask(text, lang)
    if task == "detect":
        return detect(rest)
    if task == "segment":
        return segment(rest)
    return Prompt(task, stripped)


def split_labels(labels: str | Sequence[str]) -> list[str]:
    """ "cat ; dog" or ["cat", "dog"] → the list of labels (checked by `detect` / `segment`)."""
    if isinstance(labels, str):
        return labels.split(";")
    if not isinstance(labels, Sequence) or not all(isinstance(label, str) for label in labels):
        raise InputError(f'labels must be text such as "cat ; dog" or a list of texts, got {labels!r}')
    return list(labels)


def detect(labels: str | Sequence[str]) -> Prompt:
    """Find objects: `detect cat ; dog` (labels must be non-empty and free of '<' '>')."""
    return Prompt("detect", detect_prompt(split_labels(labels), "detect"))


def segment(labels: str | Sequence[str]) -> Prompt:
    """Segment objects: `segment cat ; dog`."""
    return Prompt("segment", detect_prompt(split_labels(labels), "segment"))


def prompt(
    task: str,
    *,
    question: str | None = None,
    labels: str | Sequence[str] | None = None,
    text: str | None = None,
    lang: str = "en",
    detail: str = "short",
) -> Prompt:
    """The one dispatch from a task and what the user gave to its `Prompt`: `question` for ask, `labels` for detect
    and segment, `text` (a raw PaliGemma prompt) for generate; `lang` for ask and caption, `detail` for caption.
    InputError for an unknown task or a missing value (a value a task does not use is an error too: it would be
    silently ignored otherwise)."""
    needs = TASK_INPUT.get(task, "")
    if task not in DEFAULT_MAX_NEW_TOKENS:
        raise InputError(f"unknown task {task!r}; use {', '.join(DEFAULT_MAX_NEW_TOKENS)}")
    given = {"question": question, "labels": labels, "text": text}
    for name, value in given.items():
        if value is not None and name != needs:
            raise InputError(f"the {task} task takes no {name}")
    if needs and given[needs] is None:
        raise InputError(f"the {task} task needs {'a ' if needs != 'labels' else ''}{needs}")
    if task == "ask":
        return ask(cast(str, question), lang)
    if task == "caption":
        return caption(detail, lang)
    if task == "ocr":
        return ocr()
    if task == "detect":
        return detect(cast("str | Sequence[str]", labels))
    if task == "segment":
        return segment(cast("str | Sequence[str]", labels))
    return raw(cast(str, text))


# What each task's prompt needs from the user, besides the image (`prompt`); tasks not listed need nothing.
TASK_INPUT: dict[str, str] = {"ask": "question", "detect": "labels", "segment": "labels", "generate": "text"}


@dataclass(frozen=True)
class Answer:
    """What `VLMo.run` returns for any task: the answer's text and, for detect / segment, its objects.

    text: the generated text (for a located task, the raw `<loc>` / `<seg>` answer); size: the image's (w, h) in
    pixels, in which the objects' boxes and masks are given; finish_reason: "stop" (`<eos>` or a stop string) or
    "length" (`max_new_tokens` reached; a located task's last object is then dropped, as it may be cut short).
    """

    prompt: Prompt
    text: str
    size: tuple[int, int]
    finish_reason: Literal["stop", "length"]
    objects: list[Detection] | list[Segmentation] | None = None

    @property
    def task(self) -> TaskName:
        return self.prompt.task

    def payload(self) -> dict[str, Any]:
        """The answer as JSON (the CLI's `--json`, the app's download, the server, `vlmo batch` rows): `text` for
        a text task, `located_payload` for detect / segment."""
        if self.task == "detect" or self.task == "segment":
            return located_payload(self.task, self.size, self.objects or [])
        return {"task": self.task, "text": self.text}

    @classmethod
    def from_payload(
        cls,
        prompt: Prompt,
        payload: dict[str, Any],
        text: str = "",
        finish_reason: Literal["stop", "length"] = "stop",
    ) -> Answer:
        """The answer that `payload()` gave `payload` (read back from JSON: a server's answer, a `vlmo batch` row),
        rebuilt without the model, so that a client can print, tabulate and draw it as the library does.

        Its `payload()` is `payload` again (less the fields a face adds around it, such as the server's `model` and
        `usage`), and its `rows()` and `draw(image)` are the original answer's. What the payload does not hold is
        given: `text`, a located task's raw `<loc>` answer (a text task's text is the payload's), and
        `finish_reason`. A text task's payload has no image size: its `size` is (0, 0). Segment answers import
        torch (their masks are tensors); the others do not. InputError, saying what is wrong, for a payload of
        another task or one that `payload()` cannot have written.
        """
        if not isinstance(payload, dict) or payload.get("task") != prompt.task:
            task = payload.get("task") if isinstance(payload, dict) else None
            raise InputError(f"the answer is not a {prompt.task} answer (its task is {task!r})")
        if prompt.task != "detect" and prompt.task != "segment":
            if not isinstance(payload.get("text"), str):
                raise InputError(f"a {prompt.task} answer needs its text, got {payload.get('text')!r}")
            return cls(prompt, payload["text"], (0, 0), finish_reason)
        size = _payload_size(payload.get("size"))
        objects: list[Detection] | list[Segmentation]
        if prompt.task == "detect":
            objects = [Detection.from_dict(found) for found in _payload_list(payload, "detections")]
        else:
            from vlmo.segmentation import Segmentation

            if payload.get("mask_encoding") != MASK_ENCODING:
                raise InputError(f"masks must be {MASK_ENCODING}, got {payload.get('mask_encoding')!r}")
            objects = [Segmentation.from_dict(found) for found in _payload_list(payload, "segmentations")]
            for found in objects:
                if tuple(found.mask.shape) != (size[1], size[0]):
                    shape = "×".join(str(n) for n in reversed(found.mask.shape))
                    raise InputError(f"a {shape} mask does not fit the answer's {size[0]}×{size[1]} image")
        return cls(prompt, text, size, finish_reason, objects)

    def rows(self) -> list[list[str | float | int]]:
        """One row per object, as the CLI prints and the app tabulates them: label, x_min, y_min, x_max, y_max (in
        pixels), and the mask's area in pixels for segment. No rows for a text task."""
        rows: list[list[str | float | int]] = []
        for found in self.objects or []:
            area = getattr(found, "mask", None)
            rows.append([found.label, *found.box, *([int(area.sum())] if area is not None else [])])
        return rows

    def draw(self, image: Image.Image) -> Image.Image:
        """A copy of `image` (the one answered about) with the answer's boxes (detect) or masks (segment) drawn."""
        if self.task == "segment":
            from vlmo.segmentation import draw_segmentations

            return draw_segmentations(image, cast("list[Segmentation]", self.objects or []))
        if self.task == "detect":
            from vlmo.detection import draw_detections

            return draw_detections(image, cast("list[Detection]", self.objects or []))
        return image.copy()


def _payload_size(size: object) -> tuple[int, int]:
    """A located payload's `size`, [w, h] in pixels, as (w, h); InputError unless it is two positive integers."""
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise InputError(f"the answer's size must be [width, height] in pixels, got {size!r}")
    return size[0], size[1]


def _payload_list(payload: dict[str, Any], key: str) -> list[Any]:
    """`payload[key]`, the list of a located answer's objects; InputError if it is not a list."""
    found = payload.get(key)
    if not isinstance(found, list):
        raise InputError(f"the answer's {key} must be a list, got {found!r}")
    return found


def located_payload(
    task: Literal["detect", "segment"], size: tuple[int, int], found: Sequence[Detection] | Sequence[Segmentation]
) -> dict[str, Any]:
    """What `detect` / `segment` results are as JSON (the CLI's `--json`, the app's download; faces add their own
    fields such as the model or the image name): the original image's `size` [w, h] and one dict per object."""
    if task == "detect":
        return {"task": task, "size": list(size), "detections": [d.to_dict() for d in found]}
    return {
        "task": task,
        "size": list(size),
        "segmentations": [s.to_dict() for s in found],
        "mask_encoding": MASK_ENCODING,
    }


__all__ = [
    "TASK_INPUT",
    "Answer",
    "CAPTION_PREFIXES",
    "CHAT_TASK_WORDS",
    "DEFAULT_MAX_NEW_TOKENS",
    "MASK_ENCODING",
    "CaptionDetail",
    "Prompt",
    "TaskName",
    "ask",
    "caption",
    "detect",
    "from_chat_text",
    "lang_code",
    "located_payload",
    "ocr",
    "one_line",
    "prompt",
    "raw",
    "segment",
    "split_labels",
]
