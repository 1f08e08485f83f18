"""Resolve a model name to a local checkpoint directory, downloading from the Hugging Face Hub when needed.

`resolve_model("google/paligemma2-3b-pt-224")` returns the cached snapshot directory that holds
`config.json`, the safetensors weights (`model.safetensors`, or `model.safetensors.index.json` and its
shards) and `tokenizer.json`, plus `preprocessor_config.json` and `generation_config.json` when the repo has
them. Nothing else is fetched, never `*.bin`, `*.pth` or `*.npz` weights. A local directory is used as is.
Built-in names (`BUILT_IN_MODELS`, e.g. `vlmo/shapes`, the demo model shipped inside the package) resolve to their
package directory before any hub logic, so they never touch the network or the cache.

Files go to the standard Hugging Face cache, and huggingface_hub reads its own environment (HF_HOME,
HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT); this module sets none of it. A model that is already
cached resolves with no network access at all. Failures become `VlmoError`s whose one-line message ends
with what to do next.

Every hub request vlmo makes (here, in `weights.adapters` and in `weights.vqvae`) runs inside `hub_requests()`:
it has a timeout (`hub_timeouts()`: HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT), so a hub that never answers
ends in the one-line "could not reach" error, and huggingface_hub's warnings on the way there are not shown.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

import httpx2  # huggingface_hub >= 2 talks HTTP through httpx2, whose transport errors reach us unwrapped
from huggingface_hub import HfApi, constants, file_download, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import (
    CacheNotFound,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, validate_repo_id

from vlmo.errors import CheckpointError, OptionError, VlmoError
from vlmo.fileio.jsonfile import read_json
from vlmo.progress import ProgressBars, wanted
from vlmo.weights.files import (
    CONFIG_FILE,
    INDEX_FILE,
    OPTIONAL_FILES,
    SINGLE_FILE,
    TOKENIZER_FILE,
    check_shard_name,
)

__all__ = [
    "BUILT_IN_MODELS",
    "DiskFullError",
    "DownloadError",
    "GatedModelError",
    "HubTimeouts",
    "ModelNotFoundError",
    "OfflineError",
    "cache_location",
    "cached_models",
    "hub_requests",
    "hub_timeouts",
    "resolve_model",
]

logger = logging.getLogger(__name__)

# Named in the "safetensors only" error, so the user sees why a repo that does have weights is refused.
_OTHER_WEIGHTS = (".bin", ".pth", ".pt", ".npz", ".ckpt", ".msgpack", ".h5", ".gguf")

PathArg = str | os.PathLike[str]


def _demo_dir() -> Path:
    from vlmo.demo import MODEL_DIR

    return MODEL_DIR


# Models shipped inside the package: name → function giving its directory. They win over hub ids and over a local
# directory of the same relative name.
BUILT_IN_MODELS: dict[str, Callable[[], Path]] = {"vlmo/shapes": _demo_dir}


class GatedModelError(VlmoError):
    """The repo is gated (or private) and this user or token may not read it yet: HTTP 401/403."""


class ModelNotFoundError(VlmoError):
    """No local directory, hub repo or revision by that name."""


class OfflineError(VlmoError):
    """Offline mode is on (HF_HUB_OFFLINE) and the model is not completely in the cache."""


class DiskFullError(VlmoError):
    """The disk that holds the cache ran out of space (ENOSPC)."""


class DownloadError(VlmoError):
    """The hub was unreachable, answered with a server error, or the connection dropped mid-file."""


def resolve_model(
    name_or_path: PathArg,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: PathArg | None = None,
    progress: bool | None = None,
) -> Path:
    """The local directory with the checkpoint that `name_or_path` names, downloaded from the hub if needed.

    Args:
        name_or_path: a built-in name (`BUILT_IN_MODELS`: `vlmo/shapes`), an existing directory (used as is;
            it must hold `config.json`), or a hub id `owner/name`. A path-like string that does not exist
            (`./x`, `/x`, `~/x`, `a/b/c`) is an error, never a hub id.
        revision: branch, tag or commit of the hub repo (default: its default branch); unused for a directory.
        token: hub token; `None` lets huggingface_hub use HF_TOKEN or the `hf auth login` token,
            `False` sends none.
        cache_dir: hub cache to use instead of HF_HUB_CACHE.
        progress: rich progress bars on stderr; `None` shows them only when stderr is a terminal.

    Raises:
        ModelNotFoundError, GatedModelError, OfflineError, DiskFullError, DownloadError, CheckpointError.
    """
    name = os.fspath(name_or_path)
    is_path = isinstance(name_or_path, os.PathLike) or looks_like_path(name)
    if not is_path and name in BUILT_IN_MODELS:
        return _built_in(name, revision)
    if is_path or (name and Path(name).is_dir()):
        return _local_checkpoint(Path(name).expanduser())
    repo_id = check_repo_id(name)
    hint = _built_in_hint()
    with hub_errors(repo_id, revision, cache_dir, hint=hint):
        cached = _cached_snapshot(repo_id, revision, cache_dir)
        if cached is not None:
            return cached
        if constants.is_offline_mode():
            raise OfflineError(_offline_message(repo_id, revision, cache_dir, hint=hint))
        return _download(repo_id, revision, token, cache_dir, want_progress(progress))


def cache_location() -> Path:
    """The hub cache in use: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    return Path(constants.HF_HUB_CACHE)


def cached_models(cache_dir: PathArg | None = None) -> list[tuple[str, int]]:
    """`(repo id, bytes on disk)` of each model repo in the hub cache, sorted by id; [] without a cache."""
    try:
        info = scan_cache_dir(_cache_path(cache_dir))
    except CacheNotFound:
        return []
    return sorted((repo.repo_id, repo.size_on_disk) for repo in info.repos if repo.repo_type == "model")


# Names.


def looks_like_path(name: str) -> bool:
    """`./x`, `../x`, `/x`, `~/x`, `C:\\x` and `a/b/c` are paths; `owner/name` may be a hub id."""
    return (
        name.startswith((".", "~", "/", os.sep))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or bool(PurePath(name).drive)
    )


def check_repo_id(name: str) -> str:
    not_found = ModelNotFoundError(
        f"{name!r} is neither an existing directory nor a hub id of the form owner/name "
        "(e.g. google/paligemma2-3b-pt-224): check the spelling"
    )
    if name.count("/") != 1:
        raise not_found
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise not_found from None
    return name


def _built_in(name: str, revision: str | None) -> Path:
    if revision is not None:
        raise OptionError(f"{name} is built into vlmo and has no revisions: drop {{revision}}", revision=None)
    path = BUILT_IN_MODELS[name]()
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"the built-in model {name} is missing from {path}: reinstall vlmo")
    return path


def _local_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise ModelNotFoundError(f"no such directory: {path} (a hub id looks like owner/name)")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file: pass the checkpoint directory that holds {CONFIG_FILE}")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: pass a PaliGemma checkpoint directory or a hub id")
    return path


# Cache and download.


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: PathArg | None) -> Path | None:
    """The cached snapshot of this revision if it holds a complete checkpoint; makes no network call."""
    try:
        config = hf_hub_download(
            repo_id, CONFIG_FILE, revision=revision, cache_dir=_hub_cache_dir(cache_dir), local_files_only=True
        )
    except LocalEntryNotFoundError:
        return None
    snapshot = Path(config).parent
    return snapshot if _incomplete(snapshot, repo_id) is None else None


def _incomplete(snapshot: Path, repo_id: str) -> str | None:
    """What a snapshot lacks for vlmo to run it; None when config, weights and tokenizer are all there."""
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (snapshot / name).is_file():
            return f"no {name}"
    if (snapshot / SINGLE_FILE).is_file():
        return None
    if not (snapshot / INDEX_FILE).is_file():
        return f"no {SINGLE_FILE} or {INDEX_FILE}"
    missing = [s for s in _shard_names(snapshot / INDEX_FILE, repo_id) if not (snapshot / s).is_file()]
    return f"shard {missing[0]} missing" if missing else None


def _shard_names(index: Path, repo_id: str) -> list[str]:
    """The shard files the index lists, each a plain file name inside the snapshot (`check_shard_name`): a
    `../x` or `/x` is refused before anything is looked up or downloaded under that name."""
    fix = f"if the repo's copy is fine, run `hf cache rm model/{repo_id}`, then the same command again"
    weight_map = read_json(index, hint=fix).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no readable 'weight_map': {fix}")
    return sorted({check_shard_name(name, f"{INDEX_FILE} of {repo_id}") for name in weight_map.values()})


def _files_to_fetch(where: str, repo_files: set[str]) -> list[str]:
    """The repo files vlmo needs, small ones first; the shards follow once the index has been read."""
    if CONFIG_FILE not in repo_files:
        raise CheckpointError(f"{where} has no {CONFIG_FILE}: check that it is a PaliGemma checkpoint")
    if SINGLE_FILE in repo_files:  # preferred when a repo has both layouts, as the loader does
        weights = SINGLE_FILE
    elif INDEX_FILE in repo_files:
        weights = INDEX_FILE
    else:
        others = sorted(f for f in repo_files if f.endswith(_OTHER_WEIGHTS))
        found = f" (it has {', '.join(others[:3])})" if others else ""
        raise CheckpointError(
            f"{where} has no safetensors weights{found}; vlmo only loads safetensors: pick a repo with "
            f"{SINGLE_FILE}, or convert the weights with transformers' save_pretrained()"
        )
    if TOKENIZER_FILE not in repo_files:
        raise CheckpointError(f"{where} has no {TOKENIZER_FILE}, which vlmo needs: is it a PaliGemma checkpoint?")
    return [CONFIG_FILE, TOKENIZER_FILE, *(f for f in OPTIONAL_FILES if f in repo_files), weights]


def _download(
    repo_id: str, revision: str | None, token: str | bool | None, cache_dir: PathArg | None, show: bool
) -> Path:
    # One listing call picks the files, so a .bin-only repo fails before anything is downloaded. Each file
    # then goes through hf_hub_download: resumed after a dropped connection, moved into the cache only when
    # complete, and found offline next time.
    where = repo_label(repo_id, revision)
    with hub_requests() as timeouts:
        info = HfApi().model_info(repo_id, revision=revision, token=token, timeout=timeouts.metadata)
        repo_files = {s.rfilename for s in info.siblings or []}
        names = _files_to_fetch(where, repo_files)
        logger.info("downloading %s to %s", where, _cache_path(cache_dir))
        with ProgressBars(unit="bytes", enabled=show) as bars:

            def fetch(name: str) -> Path:
                path = hf_hub_download(
                    repo_id,
                    name,
                    revision=revision,
                    token=token,
                    cache_dir=_hub_cache_dir(cache_dir),
                    tqdm_class=bars.tqdm_class(name),
                    etag_timeout=timeouts.metadata,
                )
                return Path(path)

            paths = [fetch(name) for name in names]
            if names[-1] == INDEX_FILE:
                shards = _shard_names(paths[-1], repo_id)
                absent = [s for s in shards if s not in repo_files]
                if absent:
                    raise CheckpointError(f"{where}: {INDEX_FILE} lists {absent[0]}, which is not in the repo")
                paths += [fetch(shard) for shard in shards]
    snapshot = paths[0].parent
    problem = _incomplete(snapshot, repo_id)
    if problem is not None:  # e.g. the branch moved between two files, which then sit in two snapshots
        raise DownloadError(f"the download of {where} is incomplete ({problem}): run the same command again")
    return snapshot


def repo_label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id} (revision {revision!r})" if revision else repo_id


def _cache_path(cache_dir: PathArg | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_location()


def _hub_cache_dir(cache_dir: PathArg | None) -> Path | None:
    """`cache_dir` as `hf_hub_download` takes it (str or Path; it expands `~` itself); None: HF_HUB_CACHE."""
    return None if cache_dir is None else Path(cache_dir)


# Errors.


@contextmanager
def hub_errors(repo_id: str, revision: str | None, cache_dir: PathArg | None, *, hint: str = "") -> Iterator[None]:
    """Turn huggingface_hub, httpx2 and disk errors into vlmo errors. Subclasses must come first.

    `hint` ends the offline and could-not-reach messages (e.g. `_built_in_hint()`).
    """
    where = repo_label(repo_id, revision)
    page = f"{constants.ENDPOINT}/{repo_id}"
    try:
        yield
    except GatedRepoError as e:
        raise GatedModelError(_refused(repo_id, page, _status(e), gated=True)) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}: check it at {page}") from e
    except RepositoryNotFoundError as e:
        # The hub answers 401, not 404, when an anonymous user asks for a private repo: both end up here.
        raise ModelNotFoundError(
            f"{repo_id} was not found on {constants.ENDPOINT}: check the id and revision; "
            "a private repo needs `hf auth login` or HF_TOKEN"
        ) from e
    except HfHubHTTPError as e:
        status = _status(e)
        if status in (401, 403):
            raise GatedModelError(_refused(repo_id, page, status, gated=False)) from e
        if isinstance(e, EntryNotFoundError):
            raise ModelNotFoundError(f"a file of {where} vanished from the hub: run the command again") from e
        raise DownloadError(f"the hub answered HTTP {status} for {where}: wait, then run it again") from e
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        if constants.is_offline_mode():
            raise OfflineError(_offline_message(repo_id, revision, cache_dir, hint=hint)) from e
        # huggingface_hub wraps a failed metadata request (refused, timed out) in LocalEntryNotFoundError
        timed_out = isinstance(e.__cause__, httpx2.TimeoutException)
        raise DownloadError(_unreachable(where, timed_out=timed_out, hint=hint)) from e
    except httpx2.ConnectError as e:
        raise DownloadError(_unreachable(where, hint=hint)) from e
    except httpx2.TimeoutException as e:  # no answer (or no more bytes) within hub_timeouts(), retries included
        raise DownloadError(_unreachable(where, timed_out=True, hint=hint)) from e
    except httpx2.TransportError as e:
        raise DownloadError(
            f"the connection dropped while fetching {where} ({type(e).__name__}): "
            "run the same command again to resume; finished files are kept"
        ) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"no space left on the disk of the hub cache {_cache_path(cache_dir)}: free some space or "
                "set HF_HUB_CACHE to a folder on a bigger disk, then run the same command again"
            ) from e
        if "Consistency check failed" in str(e):  # huggingface_hub: a file of the wrong size arrived
            raise DownloadError(
                f"a file of {where} arrived incomplete: run the same command again; finished files are kept"
            ) from e
        raise


def _offline_message(repo_id: str, revision: str | None, cache_dir: PathArg | None, *, hint: str = "") -> str:
    return (
        f"{repo_label(repo_id, revision)} is not (completely) in the cache {_cache_path(cache_dir)} and "
        f"HF_HUB_OFFLINE is set: run `vlmo download {repo_id}` while online, or unset HF_HUB_OFFLINE{hint}"
    )


def _unreachable(where: str, *, timed_out: bool = False, hint: str = "") -> str:
    """The one message for a hub that cannot be reached: refused, no route, or no answer in time."""
    why = ""
    if timed_out:
        why = " (no answer in time; HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT set how long to wait)"
    return (
        f"could not reach {constants.ENDPOINT} for {where}, which is not cached{why}: "
        f"check your connection (or HF_ENDPOINT), then run the same command again{hint}"
    )


def _built_in_hint() -> str:
    """Ends the offline and could-not-reach messages of models: what works without the network."""
    return f"; the built-in model {' or '.join(sorted(BUILT_IN_MODELS))} works offline"


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return response.status_code if response is not None else None


def _refused(repo_id: str, page: str, status: int | None, *, gated: bool) -> str:
    what = "is gated" if gated else f"refused access (HTTP {status})"
    if status == 403:  # a token was sent, but its account has not accepted the licence or lacks read access
        return (
            f"{repo_id} {what} for this token: accept the licence at {page} with the same account, "
            "or use a token with read access (`hf auth login` or HF_TOKEN)"
        )
    return f"{repo_id} {what}: accept the licence at {page}, then run `hf auth login` or set HF_TOKEN"


# Network.

METADATA_TIMEOUT = 10.0  # seconds to wait for model info or a file's metadata (HF_HUB_ETAG_TIMEOUT)
DOWNLOAD_TIMEOUT = 20.0  # seconds of silence in the middle of a file download (HF_HUB_DOWNLOAD_TIMEOUT)


@dataclass(frozen=True)
class HubTimeouts:
    """How many seconds a hub request may go without an answer before it fails."""

    metadata: float  # model info, file metadata (the HEAD before each download)
    download: float  # between two reads of a file being downloaded


def hub_timeouts() -> HubTimeouts:
    """The timeouts of every hub request vlmo makes, read from the environment at each call.

    huggingface_hub's own variables, so one setting serves both: HF_HUB_ETAG_TIMEOUT (default 10 s) and
    HF_HUB_DOWNLOAD_TIMEOUT (default 20 s), in seconds (huggingface_hub, which reads them too when imported, takes
    whole seconds only). A value that is not a positive number is a `VlmoError`, not silently ignored.
    """
    return HubTimeouts(
        metadata=_seconds("HF_HUB_ETAG_TIMEOUT", METADATA_TIMEOUT),
        download=_seconds("HF_HUB_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT),
    )


def _seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise VlmoError(f"{variable}={text!r} is not a number of seconds: set it to e.g. {default:g}, or unset it")
    return seconds


@contextmanager
def hub_requests() -> Iterator[HubTimeouts]:
    """The scope of every hub request vlmo makes; yields `hub_timeouts()` to pass where huggingface_hub takes a
    timeout (`HfApi.model_info(timeout=)`, `hf_hub_download(etag_timeout=)`).

    Inside it, huggingface_hub also gets them where it takes no argument: the read timeout of a file download,
    and the longer timeout (60 s) it gives the metadata request it retries when nothing is cached. And it is
    quiet: no "Not enough free disk space" warning, no "Trying to resume download..." or "Retrying in 1s" line
    per retry; a failure ends in vlmo's one-line error, a dropped download resumes silently, and vlmo's own
    progress bars still show. Nothing changes at import; the last caller to leave restores everything.
    """
    timeouts = hub_timeouts()
    with _HUB_SCOPE.entered(timeouts):
        yield timeouts


class _DropWarnings(logging.Filter):
    """On huggingface_hub's download and HTTP loggers: drops their WARNING lines (retries, resumes); errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING


# The loggers of huggingface_hub's retry messages (file_download: "Trying to resume download...", utils._http:
# "Retrying in 1s [Retry 1/5]"). A logger's filter sees only what is logged on that very logger, so they are
# named one by one rather than through their parent "huggingface_hub".
_QUIET_LOGGERS = ("huggingface_hub.file_download", "huggingface_hub.utils._http")
_FREE_SPACE_WARNING = r"Not enough free disk space"  # huggingface_hub's warnings.warn before a download


class _Scope:
    """The settings of `hub_requests()`, shared by nested and concurrent callers: the first to enter applies
    them, the last to leave restores what was there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._undo: list[Callable[[], None]] = []

    @contextmanager
    def entered(self, timeouts: HubTimeouts) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._apply(timeouts)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    while self._undo:
                        self._undo.pop()()

    def _apply(self, timeouts: HubTimeouts) -> None:
        # Module settings huggingface_hub reads at call time (from its environment at import, otherwise).
        settings = [
            (constants, "HF_HUB_ETAG_TIMEOUT", timeouts.metadata),
            (constants, "HF_HUB_DOWNLOAD_TIMEOUT", timeouts.download),
            (file_download, "_ETAG_RETRY_TIMEOUT", timeouts.metadata),
        ]
        for owner, name, value in settings:
            if hasattr(owner, name):  # a later huggingface_hub may drop one; the others still apply
                self._set(owner, name, value)
        caught = warnings.catch_warnings()
        caught.__enter__()
        self._undo.append(lambda: caught.__exit__(None, None, None))
        warnings.filterwarnings("ignore", message=_FREE_SPACE_WARNING, category=UserWarning)
        quiet = _DropWarnings()
        for name in _QUIET_LOGGERS:
            hub_logger = logging.getLogger(name)
            hub_logger.addFilter(quiet)
            self._undo.append(functools.partial(hub_logger.removeFilter, quiet))

    def _set(self, owner: object, name: str, value: object) -> None:
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old))


_HUB_SCOPE = _Scope()


# Progress.


def want_progress(progress: bool | None) -> bool:
    """Whether to draw download bars: `vlmo.progress.wanted`, and off by HF_HUB_DISABLE_PROGRESS_BARS unless asked."""
    if progress is None and are_progress_bars_disabled():
        return False
    return wanted(progress)
