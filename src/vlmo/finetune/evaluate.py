"""VQAv2 evaluation: the official accuracy metric, a batched evaluation loop and its report.

    from vlmo import VLMo
    from vlmo.data.vqav2 import load_vqav2
    from vlmo.finetune.evaluate import evaluate_vqa
    examples = load_vqav2("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                          "val2014/")
    report = evaluate_vqa(VLMo.from_pretrained("google/paligemma-3b-ft-vqav2-224"), examples[:1000])
    print(report.format_table())
    report.write("vqav2_report.json")    # + vqav2_report_results.json in the official results format

The metric follows the official evaluation script (GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/
vqaEval.py`, master since 2021); its normalisation rules live in `vlmo.finetune.vqa_normalize`. The official files are
read by `vlmo.data.vqav2`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from vlmo.data.vqav2 import VQAExample
from vlmo.errors import InputError, check_count
from vlmo.finetune.vqa_normalize import clean_whitespace, normalize_words, strip_punctuation
from vlmo.progress import progress_bar

if TYPE_CHECKING:
    from vlmo.api import VLMo

AccuracyMode = Literal["official", "normalize_all"]
_MODES: tuple[str, ...] = get_args(AccuracyMode)
# VQAv2's three answer types, in the order papers report them; any others follow alphabetically.
ANSWER_TYPES = ("yes/no", "number", "other")
# A question's answer counts fully once this many humans gave it (the "min(#humans/3, 1)" of the VQA paper).
_HUMANS_FOR_FULL_CREDIT = 3


# ------------------------------------------------------------------------------------------------------------
# The metric


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: AccuracyMode = "official") -> float:
    """The official VQA accuracy of one predicted answer against the human answers, in [0, 1].

    For each human answer left out in turn, the prediction scores `min(#matches among the others / 3, 1)`; the
    scores are averaged. With the usual 10 answers, k of them matching gives 0, 0.3, 0.6, 0.9 and 1.0 for
    k = 0, 1, 2, 3 and ≥ 4. Other numbers of answers use the same leave-one-out rule (so with 3 answers the
    most a prediction can score is 2/3), except a single answer, which leaves nothing to compare with once left
    out: there the score is exact match (1 or 0) after normalisation.

    Normalisation (rules in `vlmo.finetune.vqa_normalize`): every answer gets newlines/tabs → spaces and is stripped.
    mode "official": as the official script does it, punctuation, lower-casing, number words, articles and
    contractions are processed — for the prediction and the human answers alike — only when the human answers
    disagree (more than one distinct stripped answer). When all humans wrote the same string, the prediction
    must equal it exactly: "Yes" scores 0 against ten "yes". VQAv2's own answers are mostly normalised already,
    which is why this rarely matters there.
    mode "normalize_all": everything is always normalised ("Yes" matches ten "yes").

    Raises InputError (a ValueError) on no answers, non-string inputs, or an unknown mode.
    """
    if mode not in _MODES:
        raise InputError(f"unknown VQA accuracy mode {mode!r}; use one of {', '.join(_MODES)}")
    if not isinstance(prediction, str):
        raise InputError(f"the prediction must be a string, got {type(prediction).__name__}")
    if isinstance(answers, str):
        raise InputError("answers must be a list of strings (the human answers), not a single string")
    humans = list(answers)
    if not humans:
        raise InputError("no ground-truth answers to score against; VQA accuracy needs at least one human answer")
    if not all(isinstance(a, str) for a in humans):
        raise InputError("every ground-truth answer must be a string")

    pred = clean_whitespace(prediction)
    humans = [clean_whitespace(a) for a in humans]
    if mode == "normalize_all" or len(set(humans)) > 1:
        pred = normalize_words(strip_punctuation(pred))
        humans = [normalize_words(strip_punctuation(a)) for a in humans]

    if len(humans) == 1:
        return float(pred == humans[0])
    matches = sum(a == pred for a in humans)
    # Leaving out a matching answer leaves matches − 1 others; leaving out any other leaves all of them. Summing
    # integers and dividing once gives 0.3 exactly where adding ten thirds would not.
    credit = sum(min(matches - (a == pred), _HUMANS_FOR_FULL_CREDIT) for a in humans)
    return credit / (_HUMANS_FOR_FULL_CREDIT * len(humans))


# ------------------------------------------------------------------------------------------------------------
# The evaluation


def results_path_for(path: str | os.PathLike[str]) -> Path:
    """Where `VQAReport.write(path)` puts the results file by default: `<stem>_results.json` beside `path`."""
    report_file = Path(path)
    return report_file.with_name(f"{report_file.stem}_results.json")


@dataclass(frozen=True)
class VQAPrediction:
    """The model's answer to one question (stripped, as generated) and its VQA accuracy in [0, 1]."""

    question_id: int
    question: str
    answer: str
    accuracy: float
    answer_type: str
    question_type: str


@dataclass(frozen=True)
class GroupScore:
    """Mean accuracy in [0, 1] over `count` questions."""

    accuracy: float
    count: int


@dataclass(frozen=True)
class VQAReport:
    """Per-question predictions and the scores over them. Accuracies are fractions in [0, 1]."""

    predictions: tuple[VQAPrediction, ...]
    mode: AccuracyMode

    @property
    def count(self) -> int:
        return len(self.predictions)

    @property
    def accuracy(self) -> float:
        """Mean accuracy over all questions (0.0 for an empty report)."""
        return _mean(p.accuracy for p in self.predictions)

    @property
    def per_answer_type(self) -> dict[str, GroupScore]:
        """Scores per answer type: yes/no, number, other first (those present), then any others alphabetically."""
        groups = _group(self.predictions, lambda p: p.answer_type)
        order = [t for t in ANSWER_TYPES if t in groups] + sorted(t for t in groups if t not in ANSWER_TYPES)
        return {t: groups[t] for t in order}

    @property
    def per_question_type(self) -> dict[str, GroupScore]:
        """Scores per question type ("what color is the", "how many", …), alphabetically."""
        groups = _group(self.predictions, lambda p: p.question_type)
        return {t: groups[t] for t in sorted(groups)}

    def results(self) -> list[dict[str, Any]]:
        """The official results format: `[{"question_id": int, "answer": str}, …]`, in question order."""
        return [{"question_id": p.question_id, "answer": p.answer} for p in self.predictions]

    def to_json(self) -> dict[str, Any]:
        """Scores and per-question predictions as a JSON-ready dict.

        `{"task": "vqav2", "mode", "count", "accuracy", "per_answer_type": {type: {"accuracy", "count"}},
        "per_question_type": {…}, "predictions": [{"question_id", "question", "answer", "accuracy",
        "answer_type", "question_type"}]}`.
        """

        def table(groups: dict[str, GroupScore]) -> dict[str, dict[str, float | int]]:
            return {name: {"accuracy": g.accuracy, "count": g.count} for name, g in groups.items()}

        return {
            "task": "vqav2",
            "mode": self.mode,
            "count": self.count,
            "accuracy": self.accuracy,
            "per_answer_type": table(self.per_answer_type),
            "per_question_type": table(self.per_question_type),
            "predictions": [
                {
                    "question_id": p.question_id,
                    "question": p.question,
                    "answer": p.answer,
                    "accuracy": p.accuracy,
                    "answer_type": p.answer_type,
                    "question_type": p.question_type,
                }
                for p in self.predictions
            ],
        }

    def write(
        self,
        path: str | os.PathLike[str],
        results_path: str | os.PathLike[str] | None = None,
        *,
        force: bool = True,
    ) -> tuple[Path, Path]:
        """Write `to_json()` to `path` and `results()` to `results_path` (default: `results_path_for(path)`),
        creating folders as needed. Returns both paths.

        Each file is written whole or not at all (`vlmo.fileio.atomic`). `force=False` replaces neither file: an
        existing one is an `OutputPathError`, and the report is removed again if the results file cannot be created.
        """
        from vlmo.fileio.atomic import write_output

        report_file = Path(path)
        results_file = Path(results_path) if results_path is not None else results_path_for(report_file)
        if results_file.resolve() == report_file.resolve():
            raise InputError(f"the report and the results file would both be {report_file}; pick another name")
        docs = [json.dumps(doc, indent=1, ensure_ascii=False) + "\n" for doc in (self.to_json(), self.results())]
        write_output(report_file, docs[0], force=force, make_parents=True)
        try:
            write_output(results_file, docs[1], force=force, make_parents=True)
        except BaseException:
            if not force:  # created by us a moment ago: leave no half pair behind
                report_file.unlink(missing_ok=True)
            raise
        return report_file, results_file

    def format_table(self) -> str:
        """A plain-text table for the terminal: questions and accuracy (percent, 2 decimals as the official
        script prints them) per answer type, then overall."""
        rows = [(name, g.count, g.accuracy) for name, g in self.per_answer_type.items()]
        rows.append(("overall", self.count, self.accuracy))
        width = max(len("answer type"), *(len(r[0]) for r in rows))
        lines = [f"{'answer type':<{width}}  {'questions':>9}  {'accuracy':>8}"]
        lines += [f"{name:<{width}}  {count:>9}  {100 * acc:>7.2f}%" for name, count, acc in rows]
        return "\n".join(lines)


def evaluate_vqa(
    vlm: VLMo,
    examples: Sequence[VQAExample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 10,
    mode: AccuracyMode = "official",
    lang: str = "en",
    progress: bool | None = None,
) -> VQAReport:
    """Ask `vlm` every question (`answer {lang} {question}`, greedy, batches of `batch_size`) and score the answers
    with `vqa_accuracy(…, mode)`.

    progress: a bar on stderr (`vlmo.progress`); None shows it only when stderr is a terminal.
    Raises InputError on no examples, batch_size < 1 or an unknown mode; image errors come from `vlm`.
    """
    if mode not in _MODES:
        raise InputError(f"unknown VQA accuracy mode {mode!r}; use one of {', '.join(_MODES)}")
    check_count(batch_size, "batch_size")
    items = list(examples)
    if not items:
        raise InputError("no VQA examples to evaluate; check the questions file or the selection")
    predictions: list[VQAPrediction] = []
    with progress_bar(len(items), "VQAv2", enabled=progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            answers = vlm.ask(
                [e.image for e in batch], [e.question for e in batch], lang=lang, max_new_tokens=max_new_tokens
            )
            assert isinstance(answers, list) and len(answers) == len(batch)
            for example, answer in zip(batch, answers, strict=True):
                answer = answer.strip()
                predictions.append(
                    VQAPrediction(
                        question_id=example.question_id,
                        question=example.question,
                        answer=answer,
                        accuracy=vqa_accuracy(answer, example.answers, mode),
                        answer_type=example.answer_type,
                        question_type=example.question_type,
                    )
                )
            bar.advance(len(batch))
    return VQAReport(tuple(predictions), mode)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


def _group(predictions: Sequence[VQAPrediction], key: Callable[[VQAPrediction], str]) -> dict[str, GroupScore]:
    buckets: dict[str, list[float]] = {}
    for p in predictions:
        buckets.setdefault(key(p), []).append(p.accuracy)
    return {name: GroupScore(_mean(accs), len(accs)) for name, accs in buckets.items()}
