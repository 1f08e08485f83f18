"""The CLI's options, each declared once, and how a command receives them.

Options shared by several commands (which model to load, how to sample) are declared here as groups of
`inspect.Parameter`s. `@shared_options(MODEL, SAMPLING)` appends a group to a command's signature, so Typer sees
ordinary options, and hands the command one `Run` built from them instead of a dozen arguments. `config_options`
derives a command's options from a config dataclass's fields (`vlmo finetune` from `FinetuneConfig`), so a field is
declared once, with its type, default and help, next to the code that uses it.

This module imports no torch: `vlmo -h` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_type_hints

import typer
from rich.console import Console

from vlmo.errors import OptionError, check_count
from vlmo.progress import wanted

if TYPE_CHECKING:
    from vlmo.api import VLMo
    from vlmo.generation import GenerateOptions

DEFAULT_MODEL = "google/paligemma-3b-mix-224"
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

# -- options used by one command or several, as annotations -----------------------------------------------------

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="VLMO_MODEL",
        help="Hub id, local checkpoint directory, or vlmo/shapes (built in).",
        show_envvar=True,
    ),
]
Revision = Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")]
Device = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Stream = Annotated[
    bool | None, typer.Option("--stream/--no-stream", help="Print tokens as they come (default: on a terminal).")
]
Images = Annotated[
    list[str], typer.Argument(metavar="IMAGE", help="Image file(s); several run as one batch.", show_default=False)
]
Lang = Annotated[str, typer.Option(help="Language code of the answer (en, fr, de, …).")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite --out if it exists.")]
MaskDecoder = Annotated[
    Path | None,
    typer.Option(
        help="Local vae-oid.npz (or converted .safetensors) for segment; default: the model's own (vlmo/shapes has "
        "one), else vae-oid, downloaded once."
    ),
]


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# -- groups of options shared by several commands ----------------------------------------------------------------------

MODEL = (
    _option("model", Model, DEFAULT_MODEL),
    _option("revision", Revision, None),
    _option(
        "adapter",
        Annotated[
            str | None,
            typer.Option(help="A LoRA adapter (PEFT format): local directory or hub id, applied to --model."),
        ],
        None,
    ),
    _option("device", Device, "auto"),
    _option(
        "dtype",
        Annotated[
            str,
            typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA, float16 on MPS), float32, bfloat16 or float16."),
        ],
        "auto",
    ),
    _option(
        "quantize",
        Annotated[
            str,
            typer.Option(
                help="auto (int8 on CPU with --dtype auto, else none), int8 (CPU: int8 weights, a quarter of the "
                "memory) or none."
            ),
        ],
        "auto",
    ),
    _option(
        "cache",
        Annotated[bool, typer.Option("--cache/--no-cache", help="Use the prepared-weights cache (default).")],
        True,
    ),
)
MAX_TOKENS = (
    _option(
        "max_tokens",
        Annotated[
            int | None,
            typer.Option("--max-tokens", help="Most tokens to generate (default 64; 128 for detect, 256 for segment)."),
        ],
        None,
    ),
)
SAMPLING = (
    *MAX_TOKENS,
    _option(
        "sample",
        Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of always taking the top token.")],
        False,
    ),
    _option("temperature", Annotated[float, typer.Option(help="Sampling temperature (> 0).")], 1.0),
    _option(
        "top_p",
        Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep tokens up to this probability mass.")],
        1.0,
    ),
    _option("top_k", Annotated[int, typer.Option("--top-k", help="Keep only the k most likely tokens (0: all).")], 0),
    _option("seed", Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")], None),
    _option(
        "stop",
        Annotated[
            list[str] | None,
            typer.Option("--stop", help="End the answer where this text first appears (repeatable; not shown)."),
        ],
        None,
    ),
)


# ask, caption, ocr, detect, segment: where the model runs (a resident process, a server, or in this process).
RESIDENT = (
    _option(
        "keep_alive",
        Annotated[
            str | None,
            typer.Option(
                "--keep-alive",
                envvar="VLMO_KEEP_ALIVE",
                show_envvar=True,
                metavar="DURATION",
                help="Keep the model loaded in a background process this long after the command (30s, 5m, 1h; "
                "default 5m), so the next command answers in seconds; 0: load it in this process (docs/resident.md).",
            ),
        ],
        None,
    ),
    _option(
        "server",
        Annotated[
            str | None,
            typer.Option(
                envvar="VLMO_SERVER",
                show_envvar=True,
                metavar="URL",
                help="Ask a running `vlmo serve` at this URL instead, e.g. http://gpu-box:8000.",
            ),
        ],
        None,
    ),
    _option(
        "api_key",
        Annotated[
            str | None,
            typer.Option(
                envvar="VLMO_API_KEY",
                show_envvar=True,
                help="The API key of --server (prefer the variable: arguments show in ps).",
            ),
        ],
        None,
    ),
)

# detect and segment: what to find in which image, and where the results go.
LOCATE = (
    _option("image", Annotated[str, typer.Argument(metavar="IMAGE", help="Image file.")], inspect.Parameter.empty),
    _option(
        "labels",
        Annotated[str, typer.Argument(metavar="LABELS", help='What to find, separated by ";", e.g. "cat ; dog".')],
        inspect.Parameter.empty,
    ),
    _option(
        "out",
        Annotated[Path | None, typer.Option("--out", "-o", help="Save a copy of the image with the results drawn.")],
        None,
    ),
    _option("force", Force, False),
    _option("json_out", JsonOut, False),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the shared options say: which model to load and how, and the generation options for the API."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    adapter: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"
    cache: bool = True
    max_tokens: int | None = None
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | None = None
    keep_alive: str | None = None
    server: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        from vlmo.generation import SamplingConfig

        # Checked before anything loads: --max-tokens as every count, the sampling options by `SamplingConfig`.
        if self.max_tokens is not None:
            check_count(self.max_tokens, "max_tokens")
        sampling = self.options
        sampling.pop("max_new_tokens", None)
        SamplingConfig.from_options(sampling, 64)
        if self.server is not None:
            self._check_server()
        else:
            self.keep_alive_seconds  # noqa: B018 - checks the duration

    def _check_server(self) -> None:
        """With --server the server's model answers: options that would load another one are an error."""
        from vlmo.cli.remote.client import Server

        Server.at_url(self.server or "")
        loading = {"revision": None, "adapter": None, "device": "auto", "dtype": "auto", "quantize": "auto"}
        given = [name for name, default in loading.items() if getattr(self, name) != default]
        if given:
            flags = ", ".join("--" + name for name in given)
            raise OptionError(f"{flags} cannot be used with {{server}}: the server loads its own model", server=None)

    @property
    def keep_alive_seconds(self) -> float:
        """--keep-alive (or VLMO_KEEP_ALIVE) in seconds; 0: no resident model."""
        from vlmo.cli.remote.runtime import parse_duration

        return parse_duration(self.keep_alive)

    @property
    def load_options(self) -> dict[str, object]:
        """What says which model loads, and how (a resident model's identity starts from these)."""
        fields = ("model", "revision", "adapter", "device", "dtype", "quantize", "cache")
        return {name: getattr(self, name) for name in fields}

    @property
    def options(self) -> GenerateOptions:
        """The `VLMo.generate` keyword options; no max_new_tokens without --max-tokens (each task has its own)."""
        options: GenerateOptions = {
            "do_sample": self.sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }
        if self.stop:
            options["stop"] = tuple(self.stop)
        if self.max_tokens is not None:
            options["max_new_tokens"] = self.max_tokens
        return options

    def load(self) -> VLMo:
        """Load the model (a spinner on a terminal)."""
        from vlmo.api import VLMo

        with status(f"Loading {self.model}"):
            return VLMo.from_pretrained(
                self.model,
                device=self.device,
                dtype=self.dtype,  # type: ignore[arg-type]  # checked by the loader
                revision=self.revision,
                adapter=self.adapter,
                quantize=self.quantize,
                cache=self.cache,
            )


def shared_options(*groups: Sequence[inspect.Parameter]) -> Callable[[F], F]:
    """Give a command the options of `groups`. Those that say how to load and run the model (the fields of `Run`)
    reach the command as one `run: Run` parameter; any others as keyword arguments (`**kwargs` takes them)."""
    extra = [p for group in groups for p in group]
    run_fields = {f.name for f in dataclasses.fields(Run)}
    names = [p.name for p in extra if p.name in run_fields]

    def wrap(command: F) -> F:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name != "run" and p.kind != inspect.Parameter.VAR_KEYWORD
        ]

        @functools.wraps(command)
        def with_run(**kwargs: Any) -> Any:
            run = Run(**{name: kwargs.pop(name) for name in names})
            return command(run=run, **kwargs)

        _set_signature(with_run, [*own, *extra])
        return with_run  # type: ignore[return-value]

    return wrap


def config_options(
    config: type, *, annotations: dict[str, Any], defaults: dict[str, Any], skip: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of the dataclass `config`; the command gets `config=` a dict of them.

    A field's help is its `metadata["help"]`; `annotations` replaces a field's type annotation (for options
    declared with other names or types on the command line) and `defaults` its default. Fields in `skip` are left
    to their defaults. A field without a default becomes a required option.
    """
    hints = get_type_hints(config)
    fields = [f for f in dataclasses.fields(config) if f.name not in skip]

    def annotation(field: dataclasses.Field[Any]) -> Any:
        if field.name in annotations:
            return annotations[field.name]
        return Annotated[hints[field.name], typer.Option(help=field.metadata.get("help", ""))]

    def default(field: dataclasses.Field[Any]) -> Any:
        if field.name in defaults:
            return defaults[field.name]
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return inspect.Parameter.empty

    options = [_option(f.name, annotation(f), default(f)) for f in fields]

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]

        @functools.wraps(command)
        def with_config(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields}
            return command(config=values, **kwargs)

        _set_signature(with_config, [*own, *options])
        return with_config

    return wrap


def _set_signature(function: Callable[..., Any], params: list[inspect.Parameter]) -> None:
    """What Typer reads: the signature and the evaluated annotations."""
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in params}
    del function.__wrapped__  # type: ignore[attr-defined]  # Typer must see this signature, not the original


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs, on a terminal only (as every bar: `vlmo.progress.wanted`)."""
    if wanted(None):
        with stderr.status(message):
            yield
    else:
        yield
