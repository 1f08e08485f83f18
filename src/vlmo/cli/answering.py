"""Where a command's model runs: a resident process (the default), a server (`--server`), or this process.

    with answering(run) as model:              # run: the command's `options.Run`
        texts = model.texts(images, prompt, run.options)

All three answer through one small interface (`Answerer`) and give the same results: the resident process and a
server are `vlmo serve`'s app (`remote.client.RemoteModel`); this process is `VLMo` itself (`InProcess`). The
command's own code (what it checks, prints and draws) is the same whichever answers.

- `--server URL` (VLMO_SERVER): that server answers; nothing loads here.
- otherwise, with a keep-alive above 0 (`--keep-alive`, VLMO_KEEP_ALIVE, default 5 minutes): the resident model
  for these load options answers, started if none runs (`remote.resident`);
- `--keep-alive 0`, or where no resident model can be (no Unix sockets): the model loads here, as it always did.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from vlmo.cli.options import DEFAULT_MODEL, Run, status, stderr

if TYPE_CHECKING:
    from vlmo.api import VLMo
    from vlmo.generation import GenerateOptions
    from vlmo.tasks import Answer, Prompt


class Answerer(Protocol):
    """What a command asks of a model (`InProcess` or `remote.client.RemoteModel`); `name`: the id of the model
    that answers (what `--json` reports)."""

    name: str

    def texts(self, images: list[str], prompt: Prompt, options: GenerateOptions) -> list[str]: ...

    def stream(self, image: str, prompt: Prompt, options: GenerateOptions) -> Iterator[str]: ...

    def run(self, image: str, prompt: Prompt, options: GenerateOptions) -> Answer: ...


class InProcess:
    """The model loaded in this process."""

    def __init__(self, vlm: VLMo, name: str, mask_decoder: str | os.PathLike[str] | None = None) -> None:
        self.vlm, self.name, self.mask_decoder = vlm, name, mask_decoder

    def texts(self, images: list[str], prompt: Prompt, options: GenerateOptions) -> list[str]:
        texts = self.vlm.generate(list(images), prompt, **options)  # a list in: a list out
        return [texts] if isinstance(texts, str) else texts

    def stream(self, image: str, prompt: Prompt, options: GenerateOptions) -> Iterator[str]:
        return self.vlm.stream(image, prompt, **options)

    def run(self, image: str, prompt: Prompt, options: GenerateOptions) -> Answer:
        return self.vlm.run(image, prompt, mask_decoder=self.mask_decoder, **options)


@contextlib.contextmanager
def answering(
    run: Run, mask_decoder: str | os.PathLike[str] | None = None, *, resident: bool = True
) -> Iterator[Answerer]:
    """The model that answers this command (module docstring); `resident=False` always loads in this process."""
    if run.server is not None:
        from vlmo.cli.remote.client import RemoteModel, Server

        if mask_decoder is not None:
            from vlmo.errors import OptionError

            raise OptionError(
                "{mask_decoder} cannot be used with {server}: the server has its own", mask_decoder=None, server=None
            )
        # The server's model answers; a model named on purpose (--model, VLMO_MODEL) must be the one it serves.
        chosen = None if run.model == DEFAULT_MODEL else run.model
        yield RemoteModel(Server.at_url(run.server, run.api_key), chosen, name=run.model)
        return
    if resident and run.keep_alive_seconds > 0:
        from vlmo.cli.remote.resident import resident_model

        load = {**run.load_options, "mask_decoder": None if mask_decoder is None else os.fspath(mask_decoder)}
        with resident_model(
            load, run.keep_alive_seconds, lambda line: stderr.print(line), lambda: status(f"Loading {run.model}")
        ) as model:
            if model is not None:
                yield model
                return
    yield InProcess(run.load(), run.model, mask_decoder)


__all__ = ["Answerer", "InProcess", "answering"]
