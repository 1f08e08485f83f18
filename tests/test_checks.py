"""The shared option checks (`vlmo.errors`) and progress bars (`vlmo.progress`) that every face uses.

A check names the option as a `{name}` field: Python spelling from the library (`batch_size`), flags from the CLI
(`--batch-size`, through `vlmo.cli.errors.cli_option`). A bar shows on a terminal only, unless told otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmo.cli.commands import app
from vlmo.cli.errors import cli_option
from vlmo.errors import InputError, OptionError, check_count, check_file, check_number
from vlmo.progress import ProgressBars, progress_bar, wanted

# -- checks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, 1.5, "4", None, [1]])
def test_check_count_refuses_what_is_not_a_whole_number_of_at_least_the_minimum(value: object) -> None:
    with pytest.raises(OptionError) as caught:
        check_count(value, "batch_size")
    assert str(caught.value) == f"batch_size must be a whole number ≥ 1, got {value!r}"
    assert caught.value.spelled(cli_option) == f"--batch-size must be a whole number ≥ 1, got {value!r}"
    assert isinstance(caught.value, InputError) and isinstance(caught.value, ValueError)


def test_check_count_returns_the_value_and_takes_bounds() -> None:
    assert check_count(1, "max_queue") == 1 and check_count(10**30, "max_queue") == 10**30
    assert check_count(0, "save_every", minimum=0) == 0
    with pytest.raises(OptionError, match="^save_every must be a whole number ≥ 0, got -1$"):
        check_count(-1, "save_every", minimum=0)
    assert check_count(65535, "port", maximum=65535) == 65535
    with pytest.raises(OptionError, match="^port must be a whole number from 1 to 65535, got 70000$"):
        check_count(70000, "port", maximum=65535)


def test_the_cli_spells_max_new_tokens_as_its_flag() -> None:
    with pytest.raises(OptionError) as caught:
        check_count(0, "max_new_tokens")
    assert caught.value.spelled(cli_option) == "--max-tokens must be a whole number ≥ 1, got 0"


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf"), True, "2", None, 10**400])
def test_check_number_refuses_what_is_not_a_finite_number_in_range(value: object) -> None:
    with pytest.raises(OptionError) as caught:
        check_number(value, "max_image_mb", above=0, below=1e6)
    message = str(caught.value)
    assert message.startswith("max_image_mb must be a number > 0 and < 1000000, got ")
    assert caught.value.spelled(cli_option).startswith("--max-image-mb must be a number > 0 and < 1000000, got ")
    assert len(message) < 120  # a huge value is cut short


def test_check_number_returns_a_float_and_takes_inclusive_bounds() -> None:
    assert check_number(3, "lr", above=0) == 3.0 and isinstance(check_number(3, "lr", above=0), float)
    assert check_number(0, "shutdown_timeout", minimum=0) == 0.0
    with pytest.raises(OptionError, match="^lora_dropout must be a number ≥ 0 and < 1, got 1$"):
        check_number(1, "lora_dropout", minimum=0, below=1)
    with pytest.raises(OptionError, match="^lr must be a number > 0.5, got 0.5$"):
        check_number(0.5, "lr", above=0.5)
    with pytest.raises(OptionError, match="^weight must be a finite number, got nan$"):
        check_number(float("nan"), "weight")


def test_a_refused_value_with_braces_is_shown_as_given() -> None:
    """Messages are templates (`str.format`): a value or path with braces must not break them."""
    with pytest.raises(OptionError) as caught:
        check_count("{limit}", "limit")
    assert str(caught.value) == "limit must be a whole number ≥ 1, got '{limit}'"
    with pytest.raises(OptionError) as caught:
        check_file("/no/{such}/file.npz", "mask_decoder")
    assert str(caught.value) == "no such file for mask_decoder: /no/{such}/file.npz"
    assert caught.value.spelled(cli_option) == "no such file for --mask-decoder: /no/{such}/file.npz"


def test_check_file(tmp_path: Path) -> None:
    present = tmp_path / "vae.npz"
    present.write_bytes(b"x")
    check_file(present, "mask_decoder")
    check_file(None, "mask_decoder")
    with pytest.raises(OptionError, match="^no such file for mask_decoder: "):
        check_file(tmp_path, "mask_decoder")  # a folder is not a file


# -- where options enter ---------------------------------------------------------------------------------------


def test_library_entry_points_name_options_in_python_spelling(tmp_path: Path) -> None:
    from vlmo.batch.ray_data import RayOptions
    from vlmo.batch.runner import BatchJob, check_counts
    from vlmo.finetune.config import FinetuneConfig

    with pytest.raises(OptionError, match="^batch_size must be a whole number ≥ 1, got 0$"):
        check_counts(0, None)
    with pytest.raises(OptionError, match="^limit must be a whole number ≥ 1, got 2.5$"):
        check_counts(8, 2.5)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="^max_new_tokens must be a whole number ≥ 1, got 0$"):
        BatchJob(task="caption", max_new_tokens=0)
    with pytest.raises(OptionError, match="^grad_accum must be a whole number ≥ 1, got 0$"):
        FinetuneConfig(model="m", out=str(tmp_path), grad_accum=0)
    with pytest.raises(OptionError, match="^num_workers must be a whole number ≥ 1, got 0$"):
        RayOptions(num_workers=0)
    with pytest.raises(OptionError, match="^num_gpus_per_worker must be a number ≥ 0, got -1$"):
        RayOptions(num_gpus_per_worker=-1)


QUESTIONS = ["--questions", "q.json", "--annotations", "a.json", "--images", "imgs"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "a.png", "why?", "--max-tokens", "0"], "--max-tokens must be a whole number ≥ 1, got 0"),
        (["eval", "vqav2", *QUESTIONS, "--batch-size", "0"], "--batch-size must be a whole number ≥ 1, got 0"),
        (["eval", "vqav2", *QUESTIONS, "--limit", "-2"], "--limit must be a whole number ≥ 1, got -2"),
        (
            ["finetune", "--data", "d.jsonl", "--out", "run", "--steps", "0"],
            "--steps must be a whole number ≥ 1, got 0",
        ),
        (
            ["finetune", "--data", "d.jsonl", "--out", "run", "--warmup-steps", "-1"],
            "--warmup-steps must be a whole number ≥ 0, got -1",
        ),
    ],
)
def test_a_bad_count_on_the_command_line_is_a_usage_error_naming_the_flag(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "--model", "never-loaded"], prog_name="vlmo")
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == "" and result.stderr.splitlines() == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# -- progress bars -----------------------------------------------------------------------------------------------


def test_bars_are_hidden_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert wanted(None) is False and wanted(True) is True and wanted(False) is False
    with progress_bar(3, "counting") as bar:
        bar.advance()
        bar.set_postfix("fast")
        bar.update(completed=3)
    with ProgressBars(unit="bytes") as bars:
        tqdm_class = bars.tqdm_class("model.safetensors")
        download = tqdm_class(total=1000, unit="B")
        download.update(1000)
        download.close()
    assert capsys.readouterr() == ("", "")


def test_bars_show_on_a_terminal_and_when_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with progress_bar(3, "asked", enabled=True) as bar:
        bar.advance(2)
        bar.set_postfix("0.50 images/s")
        bar.advance(1)
    out, err = capsys.readouterr()
    assert out == "" and "asked" in err and "3/3" in err and "0.50 images/s" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert wanted(None) is True
    with progress_bar(4, "on a terminal") as bar:
        bar.advance(4)
    out, err = capsys.readouterr()
    assert out == "" and "on a terminal" in err


def test_download_bars_draw_what_huggingface_hubs_tqdm_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """huggingface_hub makes one instance per file from `tqdm_class`, with tqdm's arguments."""
    with ProgressBars(unit="bytes", enabled=True) as bars:
        tqdm_class = bars.tqdm_class("model.safetensors")
        download = tqdm_class(total=200_000, initial=50_000, unit="B", unit_scale=True, name="huggingface_hub.x")
        download.update(150_000)
        download.close()
        assert download.n == 200_000
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "200.0 kB" in err


def test_importing_the_progress_helper_draws_in_nothing_heavy() -> None:
    code = (
        "import sys, json, vlmo.progress; print(json.dumps([m for m in ('rich', 'tqdm', 'torch') if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []
