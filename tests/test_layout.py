"""The layout's one promise that code can break silently: the library core imports no face.

`import vlmo` and `import vlmo.api` (what `from vlmo import VLMo` runs) must not pull in the CLI, the server, the
batch runner, the app or their frameworks: a library user pays for none of them, and a core module that reaches up
into a face would be an import loop waiting to happen.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FACES = ("vlmo.cli", "vlmo.serve", "vlmo.batch", "vlmo.app")
FRAMEWORKS = ("fastapi", "starlette", "uvicorn", "ray", "gradio", "typer", "pyarrow")
CORE = ("import vlmo", "import vlmo.api", "from vlmo import VLMo; VLMo")
DOCUMENTED = (
    "from vlmo import VLMo; from vlmo.batch import BatchJob, run, write_results, open_results; "
    "from vlmo.cli import main; from vlmo.finetune import FinetuneConfig; "
    "from vlmo.engine import Engine, Job, Finished"
)


@pytest.fixture(scope="module")
def imported() -> tuple[dict[str, list[str]], str]:
    """`sys.modules` after each of CORE's statements, then DOCUMENTED's, run in that order in one fresh interpreter
    (each statement imports at least what the ones before it do, so each set is what it alone would import); and
    the interpreter's stderr. A statement that fails has no entry, nor have those after it."""
    steps = [*CORE, DOCUMENTED]
    probe = "import sys, json\n" + "".join(
        f"{code}\nprint('modules', json.dumps(sorted(sys.modules)))\n" for code in steps
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    found = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("modules ")]
    return dict(zip(steps, found, strict=False)), out.stderr


def test_the_core_imports_no_face_and_no_framework(imported: tuple[dict[str, list[str]], str]) -> None:
    after, stderr = imported
    for code in CORE:
        assert code in after, stderr
        modules = after[code]
        faces = [m for m in modules if m.startswith(FACES)]
        frameworks = [m for m in modules if m.split(".")[0] in FRAMEWORKS]
        assert not faces, f"{code!r} imports {faces}"
        assert not frameworks, f"{code!r} imports {frameworks}"


def test_documented_import_paths_still_work(imported: tuple[dict[str, list[str]], str]) -> None:
    """The paths users may rely on (README, docs), re-exported by the face packages."""
    after, stderr = imported
    assert DOCUMENTED in after, stderr
    assert "vlmo.batch.runner" in after[DOCUMENTED] and "vlmo.cli.commands" in after[DOCUMENTED]
