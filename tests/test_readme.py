"""The README's CLI reference is generated from the app; this fails when someone changes one without the other."""

from __future__ import annotations

from pathlib import Path

from vlmo.cli import reference as cli_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cli_reference_in_readme_is_current() -> None:
    assert cli_reference.main(["--check", str(README)]) == 0, "run: python -m vlmo.cli.reference --write README.md"


def test_reference_lists_every_command_and_option() -> None:
    text = cli_reference.render()
    for command in ("ask", "caption", "ocr", "generate", "detect", "download", "info"):
        assert f"### `vlmo {command}`" in text
    assert "`--max-tokens`" in text and "(env `VLMO_MODEL`)" in text


def test_stale_block_is_detected(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n\n{cli_reference.BEGIN}\nold\n{cli_reference.END}\n", encoding="utf-8")
    assert cli_reference.main(["--check", str(stale)]) == 1
    assert cli_reference.main(["--write", str(stale)]) == 0
    assert cli_reference.main(["--check", str(stale)]) == 0
