"""`vlmo batch` and `vlmo.batch.run`: one task over a whole data set, a result row per input.

runner.py    the job (`BatchJob`), the row loop over the engine, `run` and `write_results`
inputs.py    what a job reads: a folder, a glob, a list of paths, JSONL/CSV/Parquet manifests → inputs with ids
results.py   a job's rows and its resumable .jsonl results file
parquet.py   Parquet manifests in, Parquet results out
ray_data.py  `vlmo batch --ray`: the same rows from Ray Data actors

from vlmo.batch import run
for row in run("vlmo/shapes", "photos/", task="caption"):
    print(row["id"], row["text"] if row["error"] is None else row["error"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmo.batch.runner import BatchJob, open_results, process, run, write_results


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlmo.batch import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'vlmo.batch' has no attribute {name!r}")


__all__ = ["BatchJob", "open_results", "process", "run", "write_results"]
