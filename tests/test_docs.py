"""The docs build runs, and its picture shows what the parsing and drawing code produce."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from PIL import Image

from vlmo.demo.standins import blob_mask_decoder

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTES = DOCS / "model-notes.md"
# "model-notes §4.3, §5, §10", "docs/model-notes.md §2–§6": one citation, every § in the chain checked.
CITATION = re.compile(r"model-notes(?:\.md)? (§[\d.]+(?:(?:, | and | or |–)§[\d.]+)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")


def load_build():  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location("docs_build", DOCS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_format_picture_is_generated(tmp_path: Path) -> None:
    build = load_build()
    path = build.render_output_formats(tmp_path / "out.png")
    with Image.open(path) as picture:
        w, h = build.SIZE
        assert picture.size == (2 * w + 10, h)
        scene = build.scene()
        cx, cy = (build.CIRCLE[0] + build.CIRCLE[2]) // 2, (build.CIRCLE[1] + build.CIRCLE[3]) // 2
        assert picture.getpixel((cx, cy)) == scene.getpixel((cx, cy))  # left: boxes only, inside untouched
        assert picture.getpixel((w + 10 + cx, cy)) != scene.getpixel((cx, cy))  # right: the mask tints it
    assert (DOCS / "img" / "output-formats.png").is_file(), "run: python docs/build.py"


def test_blob_decoder_draws_its_code_grid() -> None:
    on, off = 64, 0
    grid = torch.tensor([[off] * 4 + [on] * 8 + [off] * 4])  # rows 1 and 2 inside
    mask = blob_mask_decoder()(grid)[0, 0] > 0
    rows = mask.any(dim=1).nonzero().flatten()
    assert (rows.min(), rows.max()) == (16, 47)  # grid rows 1–2 of 4 → mask rows 16–47 of 64
    assert mask[20:44, 8:56].all()


def _text_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*")) if p.suffix in {".py", ".md"} and p.is_file()]


def test_every_model_notes_citation_has_its_section() -> None:
    """`model-notes §N` in code, tests and docs names a heading of docs/model-notes.md (`## N …` / `### N.M …`)."""
    notes = NOTES.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?) ", notes, flags=re.MULTILINE))
    assert {"1.3", "4.2", "6.3", "9.2", "10.10"} <= headings
    cited: dict[str, set[str]] = {}
    for path in _text_files("src", "tests", "benchmarks", "docs"):
        for chain in CITATION.findall(path.read_text(encoding="utf-8")):
            for number in SECTION.findall(chain):
                cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
    assert len(cited) > 10, "the citation pattern finds nothing: was it changed?"
    # the page's own bare "§N" cross-references count too
    for number in SECTION.findall(notes):
        cited.setdefault(number, set()).add("docs/model-notes.md")
    missing = {number: sorted(files) for number, files in cited.items() if number not in headings}
    assert not missing, f"cited sections without a heading in docs/model-notes.md: {missing}"


def test_no_citations_of_documents_outside_the_repository() -> None:
    """Model facts are cited from docs/model-notes.md, never from a file a clone does not have."""
    stale = re.compile(r"SPEC-paligemma|\bspec §", flags=re.IGNORECASE)
    hits = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in _text_files("src", "docs")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if stale.search(line)
    ]
    assert not hits, f"cite docs/model-notes.md (model-notes §N) instead: {hits}"
