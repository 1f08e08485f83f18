"""The layout's one promise that code can break silently: the library core imports no face.

`import vlmo` and `import vlmo.api` (what `from vlmo import VLMo` runs) must not pull in the CLI, the server, the
batch runner, the app or their frameworks: a library user pays for none of them, and a core module that reaches up
into a face would be an import loop waiting to happen.
"""

from __future__ import annotations

import json
import subprocess
import sys

FACES = ("vlmo.cli", "vlmo.serve", "vlmo.batch", "vlmo.app")
FRAMEWORKS = ("fastapi", "starlette", "uvicorn", "ray", "gradio", "typer", "pyarrow")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys, json; {code}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.splitlines()[-1])


def test_the_core_imports_no_face_and_no_framework() -> None:
    for code in ("import vlmo", "import vlmo.api", "from vlmo import VLMo; VLMo"):
        modules = _imported_after(code)
        faces = [m for m in modules if m.startswith(FACES)]
        frameworks = [m for m in modules if m.split(".")[0] in FRAMEWORKS]
        assert not faces, f"{code!r} imports {faces}"
        assert not frameworks, f"{code!r} imports {frameworks}"


def test_documented_import_paths_still_work() -> None:
    """The paths users may rely on (README, docs), re-exported by the face packages."""
    modules = _imported_after(
        "from vlmo import VLMo; from vlmo.batch import BatchJob, run, write_results, open_results; "
        "from vlmo.cli import main; from vlmo.finetune import FinetuneConfig; "
        "from vlmo.engine import Engine, Job, Finished"
    )
    assert "vlmo.batch.runner" in modules and "vlmo.cli.commands" in modules
