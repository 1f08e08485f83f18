"""The layout's promises that code can break silently: the library core imports no face, and a client imports no torch.

`import vlmo` and `import vlmo.api` (what `from vlmo import VLMo` runs) must not pull in the CLI, the server, the
batch runner, the app or their frameworks: a library user pays for none of them, and a core module that reaches up
into a face would be an import loop waiting to happen. The other way round, what a thin client needs (reading an
image, checking options, rebuilding an answer from the server's JSON) must not pull in torch, whose import alone
costs more than the client's whole start-up budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# What a thin client (the CLI in front of a server) does before and after it talks to the server: read and check the
# image, check the sampling options, rebuild a detect answer from the server's JSON. None of it may cost torch's import.
CLIENT_MODULES = "import vlmo.images, vlmo.generation, vlmo.tasks, vlmo.detection, vlmo.errors, vlmo.cli.options"
CLIENT_WORK = """
from PIL import Image
from vlmo.generation import SamplingConfig
from vlmo.images import load_image
from vlmo.tasks import Answer, detect
Image.new("RGB", (8, 6), (200, 30, 30)).save(PNG)
assert load_image(PNG).size == (8, 6)
SamplingConfig.from_options({"do_sample": True, "temperature": 0.7}, 64)
found = {"label": "a", "box": [0.5, 1.0, 4.0, 6.0], "bins": [1, 2, 3, 4]}
payload = {"task": "detect", "size": [8, 6], "detections": [found]}
assert Answer.from_payload(detect("a"), payload).payload() == payload
"""


def test_a_client_reads_images_checks_options_and_rebuilds_answers_without_torch(tmp_path: Path) -> None:
    probe = (
        f"import sys\n{CLIENT_MODULES}\nprint('imported', 'torch' in sys.modules)\n"
        f"PNG = {str(tmp_path / 'red.png')!r}\n{CLIENT_WORK}\nprint('worked', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["imported False", "worked False"], out.stdout
