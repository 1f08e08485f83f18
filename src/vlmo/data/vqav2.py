"""VQAv2 in its official file layout: questions, annotations and a folder of COCO images → `VQAExample`s.

    examples = load_vqav2("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                          "val2014/")

Evaluation (`vlmo.finetune.evaluate.evaluate_vqa`) and fine-tuning (`vlmo.data.examples.VQAv2Dataset`) both read
it from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmo.errors import InputError
from vlmo.fileio.jsonfile import read_json


@dataclass(frozen=True)
class VQAExample:
    """One VQAv2 question with its image and the human answers (usually ten, with repeats)."""

    question_id: int
    image_id: int
    image: Path
    question: str
    answers: tuple[str, ...]
    answer_type: str
    question_type: str


# data_subtype values whose images live under another name (test-dev questions are about test2015 images).
_IMAGE_SPLIT = {"test-dev2015": "test2015"}
_COCO_NAME = re.compile(r"COCO_([A-Za-z0-9-]+)_(\d{12})\.jpg")
_PLAIN_NAME = re.compile(r"\d{12}\.jpg")


def load_vqav2(
    questions_json: str | os.PathLike[str],
    annotations_json: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    split_hint: str | None = None,
) -> list[VQAExample]:
    """Read the official VQAv2 files: questions, annotations and a folder of COCO images, in the questions' order.

    questions_json: `{"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}, …]}`.
    annotations_json: `{"annotations": [{"question_id", "image_id", "answers": [{"answer", …}, …],
    "answer_type", "question_type", …}, …]}`.
    image_dir: images named `COCO_{split}_{image_id:012d}.jpg`. The split is `split_hint` when given (e.g.
    "val2014"); otherwise the files' `data_subtype` ("test-dev2015" means the `test2015` images), or the only
    `COCO_{split}_` prefix in the folder. COCO 2017 names (`{image_id:012d}.jpg`, same ids) work too.

    Raises InputError on missing or malformed files, questions without annotations (or the reverse), image ids
    that disagree between the two files, and missing images (naming the first few).
    """
    questions_doc = _read_json(questions_json, "questions file")
    annotations_doc = _read_json(annotations_json, "annotations file")
    questions = _records(questions_doc, "questions", questions_json)
    annotations = _records(annotations_doc, "annotations", annotations_json)

    by_id: dict[int, dict[str, Any]] = {}
    for i, record in enumerate(annotations):
        where = f"{annotations_json}: annotations[{i}]"
        qid = _int_field(record, "question_id", where)
        if qid in by_id:
            raise InputError(f"{where}: question_id {qid} is annotated twice; use the official annotations file")
        by_id[qid] = record

    rows: list[tuple[int, int, str, dict[str, Any]]] = []
    seen: set[int] = set()
    for i, q in enumerate(questions):
        where = f"{questions_json}: questions[{i}]"
        qid, image_id = _int_field(q, "question_id", where), _int_field(q, "image_id", where)
        question = _str_field(q, "question", where)
        if qid in seen:
            raise InputError(f"{where}: question_id {qid} appears twice in the questions file")
        seen.add(qid)
        ann = by_id.get(qid)
        if ann is None:
            raise InputError(
                f"question {qid} ({where}) has no annotation in {annotations_json}; pass the annotations file of "
                "the same split and version as the questions file"
            )
        ann_image = _int_field(ann, "image_id", f"{annotations_json}: annotation of question {qid}")
        if ann_image != image_id:
            raise InputError(
                f"question {qid} is about image {image_id} in {questions_json} but image {ann_image} in "
                f"{annotations_json}; the two files do not belong together"
            )
        rows.append((qid, image_id, question, ann))
    extra = sorted(set(by_id) - seen)
    if extra:
        raise InputError(
            f"{len(extra)} annotated question(s) are missing from {questions_json} (e.g. question_id {extra[0]}); "
            "pass the questions file of the same split and version as the annotations file"
        )

    raw_subtypes = [doc.get("data_subtype") for doc in (questions_doc, annotations_doc)]
    subtypes = [s for s in raw_subtypes if isinstance(s, str) and s]
    name_of = _image_naming(Path(image_dir), {r[1] for r in rows}, split_hint, subtypes)
    examples = []
    for qid, image_id, question, ann in rows:
        where = f"{annotations_json}: annotation of question {qid}"
        answers = ann.get("answers")
        if not isinstance(answers, list) or not all(
            isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers
        ):
            raise InputError(f'{where}: "answers" must be a list of {{"answer": str, …}} objects')
        examples.append(
            VQAExample(
                question_id=qid,
                image_id=image_id,
                image=Path(image_dir) / name_of(image_id),
                question=question,
                answers=tuple(a["answer"] for a in answers),
                answer_type=_str_field(ann, "answer_type", where),
                question_type=_str_field(ann, "question_type", where),
            )
        )
    return examples


def _image_naming(
    image_dir: Path, image_ids: set[int], split_hint: str | None, subtypes: list[str]
) -> Callable[[int], str]:
    """The file-name rule under which every image is present in `image_dir`, tried in a fixed order."""
    if not image_dir.is_dir():
        raise InputError(f"image folder {image_dir} does not exist; pass the folder holding COCO_*.jpg images")
    names = set(os.listdir(image_dir))
    in_folder = sorted({m[1] for n in names if (m := _COCO_NAME.fullmatch(n))})

    def coco(split: str) -> Callable[[int], str]:
        return lambda image_id: f"COCO_{split}_{image_id:012d}.jpg"

    def plain(image_id: int) -> str:
        return f"{image_id:012d}.jpg"

    if split_hint is not None:  # explicit: only this split's names
        hint = split_hint.removeprefix("COCO_").rstrip("_")
        candidates = [(f"COCO_{_IMAGE_SPLIT.get(hint, hint)}_*.jpg", coco(_IMAGE_SPLIT.get(hint, hint)))]
    else:  # the files' data_subtype first, then the prefixes present, then COCO 2017 names
        if not subtypes and len(in_folder) > 1:
            raise InputError(
                f"{image_dir} holds images of several splits ({', '.join(in_folder)}) and the questions file names "
                f"none; pass split_hint, e.g. split_hint={in_folder[0]!r}"
            )
        splits = dict.fromkeys([_IMAGE_SPLIT.get(s, s) for s in subtypes] + in_folder)
        candidates = [(f"COCO_{s}_*.jpg", coco(s)) for s in splits]
        if not in_folder and any(_PLAIN_NAME.fullmatch(n) for n in names):
            candidates.append(("{image_id:012d}.jpg", plain))
        if not candidates:
            raise InputError(
                f"cannot tell the image names: {image_dir} has no COCO_<split>_<id>.jpg files and the questions "
                "file has no data_subtype; pass split_hint, e.g. split_hint='val2014'"
            )
    ordered = sorted(image_ids)
    tried: list[tuple[str, list[str]]] = []
    for pattern, name_of in candidates:
        missing = [name_of(i) for i in ordered if name_of(i) not in names]
        if not missing:
            return name_of
        tried.append((pattern, missing))
    pattern, missing = min(tried, key=lambda t: len(t[1]))
    shown = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
    held = f" (it holds {', '.join(f'COCO_{s}_*' for s in in_folder)} images)" if in_folder else ""
    raise InputError(
        f"{len(missing)} of {len(ordered)} images ({pattern}) are missing from {image_dir}{held}: {shown}; "
        "pass the image folder of the questions' split, or split_hint"
    )


def _read_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    return read_json(
        path, what=f"VQAv2 {what}", hint="download it from https://visualqa.org/download.html", error=InputError
    )


def _records(doc: dict[str, Any], key: str, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    records = doc.get(key)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f'{path} has no "{key}" list of objects; is it the VQAv2 {key} file?')
    if not records:
        raise InputError(f'{path} has an empty "{key}" list')
    return records


def _int_field(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f'{where}: "{key}" must be an integer, got {value!r}')
    return value


def _str_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise InputError(f'{where}: "{key}" must be a string, got {value!r}')
    return value
