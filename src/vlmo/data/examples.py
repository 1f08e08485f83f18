"""Training examples: one image, a prefix (the prompt) and a suffix (the target), from JSONL or VQAv2 files.

A dataset here is anything with `len()` and `get(index, epoch) -> Example`: the epoch lets a dataset vary what it
returns per pass (VQAv2 samples one of the ten human answers each time, as big_vision does; a synthetic dataset
such as `vlmo.demo.shapes.ShapesDataset` draws a fresh scene) while staying reproducible, which exact resumption of
a training run needs. `vlmo.finetune.train.finetune(cfg, dataset=...)` trains on any such object.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vlmo.data.vqav2 import VQAExample
from vlmo.errors import InputError
from vlmo.fileio.jsonfile import json_line
from vlmo.images import ImageInput


@dataclass(frozen=True)
class Example:
    image: ImageInput  # a path (files), or an image made in memory (generated data)
    prefix: str
    suffix: str


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int, epoch: int) -> Example: ...


class JsonlDataset:
    """Lines of `{"image": path, "prefix": str, "suffix": str}`; relative image paths are relative to the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no such training file: {path}")
        self.examples: list[Example] = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self.examples.append(_parse_line(line, path, number))
        if not self.examples:
            raise InputError(f"{path} has no examples; write one JSON object per line")

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, index: int, epoch: int) -> Example:
        return self.examples[index]


def _parse_line(line: str, path: Path, number: int) -> Example:
    where = f"{path}:{number}"
    row = json_line(line, where, "image, prefix and suffix")
    missing = [k for k in ("image", "prefix", "suffix") if not isinstance(row.get(k), str)]
    if missing:
        raise InputError(f"{where} lacks string field(s) {', '.join(missing)}")
    image = Path(row["image"]).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise InputError(f"{where}: no image file at {image}")
    return Example(image, row["prefix"], row["suffix"])


class VQAv2Dataset:
    """VQAv2 questions as `answer {lang} {question}` → one of the ten human answers, sampled anew each epoch.

    Which answer an (epoch, index) pair gets depends only on the seed, so a resumed run sees the same data.
    """

    def __init__(self, examples: Sequence[VQAExample], seed: int = 0, lang: str = "en") -> None:
        self.examples = [e for e in examples if e.answers]
        if not self.examples:
            raise InputError("no VQAv2 questions with answers to train on")
        self.seed, self.lang = seed, lang

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, index: int, epoch: int) -> Example:
        ex = self.examples[index]
        answer = random.Random(f"{self.seed}:{epoch}:{index}").choice(list(ex.answers))
        return Example(Path(ex.image), f"answer {self.lang} {ex.question}", answer)
