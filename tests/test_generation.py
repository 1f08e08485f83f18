"""Generation behaviour on a tiny real model: batching, seeds, sampling options, stopping, streaming, the cache."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmo import SamplingConfig, VLMo
from vlmo.engine.sampling import select_next
from vlmo.engine.scheduler import Collector, Finished, Scheduler
from vlmo.errors import GenerationConfigError, InputError


@pytest.fixture(scope="module")
def vlm(tiny_float32: VLMo) -> VLMo:
    return tiny_float32  # conftest.py: loaded once, shared with test_model_details.py


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


PROMPTS = ["caption en", "answer en how many shapes are there in this picture?", "ocr"]


def test_batched_generation_equals_one_by_one(vlm: VLMo) -> None:
    """Left padding with per-row positions and masks: prompts of different lengths in one batch."""
    images = [picture(i) for i in range(3)]
    batched = vlm.generate(images, PROMPTS, max_new_tokens=24)
    single = [vlm.generate(im, p, max_new_tokens=24) for im, p in zip(images, PROMPTS, strict=True)]
    assert batched == single
    assert len(set(batched)) > 1


def test_one_image_many_prompts_is_encoded_once(vlm: VLMo) -> None:
    vlm.image_cache.clear()
    calls = []
    handle = vlm.model.vision.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    try:
        out = vlm.generate(picture(0), PROMPTS, max_new_tokens=12)
    finally:
        handle.remove()
    assert calls == [1], "the vision tower runs once per request, for one image"
    assert out == [vlm.generate(picture(0), p, max_new_tokens=12) for p in PROMPTS]


def test_image_inputs_path_bytes_and_pil_agree(vlm: VLMo, tmp_path: Path) -> None:
    img = picture(5)
    path = tmp_path / "x.png"
    img.save(path)
    outs = {vlm.generate(src, "caption en", max_new_tokens=10) for src in (img, path, str(path), path.read_bytes())}
    assert len(outs) == 1


def test_same_seed_same_sample_and_greedy_is_deterministic(vlm: VLMo) -> None:
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=200, top_p=0.95)
    a = vlm.generate(picture(1), "caption en", seed=7, **kw)
    b = vlm.generate(picture(1), "caption en", seed=7, **kw)
    others = {vlm.generate(picture(1), "caption en", seed=s, **kw) for s in range(8, 12)}
    assert a == b
    assert others - {a}, "different seeds should give different samples"
    greedy = vlm.generate(picture(1), "caption en", max_new_tokens=20)
    assert greedy == vlm.generate(picture(1), "caption en", max_new_tokens=20)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
    ],
)
def test_invalid_sampling_settings_are_clear_errors(vlm: VLMo, kwargs: dict, words: str) -> None:
    with pytest.raises(GenerationConfigError, match=words):
        vlm.generate(picture(0), "caption en", do_sample=True, **kwargs)


def test_select_next_applies_top_k_then_temperature_then_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draw = lambda cfg: {int(select_next(logits, cfg, g)) for _ in range(300)}  # noqa: E731
    assert draw(SamplingConfig(do_sample=True, top_k=2)) == {0, 1}
    assert draw(SamplingConfig(do_sample=True, top_k=1, temperature=100.0)) == {0}
    # p(0)=0.64, p(1)=0.24: top_p=0.7 keeps tokens 0 and 1 (0.64 < 0.7), top_p=0.5 keeps token 0 only.
    assert draw(SamplingConfig(do_sample=True, top_p=0.7)) == {0, 1}
    assert draw(SamplingConfig(do_sample=True, top_p=0.5)) == {0}
    assert draw(SamplingConfig(do_sample=True, temperature=100.0)) == {0, 1, 2, 3, 4}
    assert int(select_next(logits, SamplingConfig(), None)) == 0


def run_rows(
    vlm: VLMo, prompts: list[str], images: list[object], max_new_tokens: int, eos: set[int] | None = None
) -> tuple[list[Finished], list[list[int]]]:
    """The engine's loop (`Scheduler`) over rows that all join at once: each row's end and its token ids."""
    from vlmo import tasks

    scheduler = Scheduler(vlm, max_batch_size=len(prompts))
    if eos is not None:
        scheduler._eos = frozenset(eos)
    sinks = [Collector() for _ in prompts]
    requests = [
        scheduler.request(im, tasks.raw(p), {"max_new_tokens": max_new_tokens}, sink)  # type: ignore[arg-type]
        for p, im, sink in zip(prompts, images, sinks, strict=True)
    ]
    ids: dict[int, list[int]] = {}
    detokenize = vlm.detokenize

    def spy(row_ids: list[int]) -> str:  # the scheduler decodes each row's ids after every token
        ids[id(row_ids)] = list(row_ids)
        return detokenize(row_ids)

    vlm.detokenize = spy  # type: ignore[method-assign]
    try:
        scheduler.step(requests)
        while scheduler.running:
            scheduler.step()
    finally:
        del vlm.detokenize
    return [sink.finished() for sink in sinks], list(ids.values())


def test_max_new_tokens_and_eos_stop(vlm: VLMo) -> None:
    (end,), (ids,) = run_rows(vlm, ["caption en"], [picture(2)], 9)
    assert (end.finish_reason, end.ended, end.completion_tokens, len(ids)) == ("length", False, 9, 9)
    # Declare the 4th greedy token an end-of-sequence token: generation must stop right there.
    stop = ids[3]
    assert stop not in ids[:3], "pick a prompt whose 4th token is new"
    (end,), (stopped,) = run_rows(vlm, ["caption en"], [picture(2)], 9, eos={stop})
    assert stopped == ids[:3] and (end.finish_reason, end.ended, end.completion_tokens) == ("stop", True, 4)
    assert end.text == vlm.detokenize(ids[:3])
    # In a batch, a finished row leaves while the other goes on to its own end.
    ends, _ = run_rows(vlm, ["caption en", "ocr"], [picture(2), picture(3)], 9, eos={stop})
    assert ends[0].text == end.text and ends[0].ended
    assert ends[1].completion_tokens >= 1


def test_stop_strings_end_the_answer_and_are_not_shown(vlm: VLMo) -> None:
    """`stop=` is a library option: the answer ends where a stop string first appears, without it, in generate,
    stream and the task methods alike, and it is checked like the other options."""
    full = vlm.generate(picture(4), "caption en", max_new_tokens=24)
    assert len(full) > 4
    stop = full[2:4]
    cut = full[: full.index(stop)]
    assert vlm.generate(picture(4), "caption en", max_new_tokens=24, stop=[stop, "never there"]) == cut
    assert "".join(vlm.stream(picture(4), "caption en", max_new_tokens=24, stop=stop)) == cut
    assert vlm.caption(picture(4), max_new_tokens=24, stop=[stop]) == vlm.generate(
        picture(4), "caption en", max_new_tokens=24, stop=stop
    )
    for bad in ([""], [3], "", ["x"] * 17):
        with pytest.raises(GenerationConfigError, match="stop"):
            vlm.generate(picture(4), "caption en", stop=bad)  # type: ignore[arg-type]


def test_a_misspelled_option_is_a_type_error_naming_the_nearest(vlm: VLMo) -> None:
    with pytest.raises(TypeError, match="'max_new_token'.*did you mean 'max_new_tokens'"):
        vlm.caption(picture(0), max_new_token=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'temprature'.*'temperature'"):
        vlm.generate(picture(0), "caption en", temprature=0.5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'stops'"):
        list(vlm.stream(picture(0), "caption en", stops=["a"]))  # type: ignore[call-arg]


def test_stream_pieces_concatenate_to_generate(vlm: VLMo) -> None:
    pieces = list(vlm.stream(picture(4), "caption en", max_new_tokens=24))
    assert len(pieces) > 1
    assert "".join(pieces) == vlm.generate(picture(4), "caption en", max_new_tokens=24)


def test_decode_steps_equal_a_full_forward_and_write_the_cache_in_place(vlm: VLMo) -> None:
    """Prefill + cached decode == recomputing the whole sequence with generated tokens as suffix (type 1)."""
    model = vlm.model
    batch = vlm.text.encode(["caption en", "answer en what is it?"])
    pixels = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        feats = model.encode_images(pixels)
        cache = model.new_cache(2, batch.input_ids.shape[1] + 6)
        k_ptr = cache.k.data_ptr()
        logits, state = model.prefill(batch.input_ids, feats, batch.attention_mask, cache)
        assert logits.shape == (2, model.cfg.text.vocab_size), "prefill computes only the last position's logits"
        ids, steps = batch.input_ids, []
        for _ in range(5):
            token = logits.argmax(-1)
            steps.append(logits)
            ids = torch.cat([ids, token[:, None]], dim=1)
            logits = model.decode(token, state)
        assert cache.k.data_ptr() == k_ptr
        n = ids.shape[1]
        mask = torch.cat([batch.attention_mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
        types = torch.cat([torch.zeros_like(batch.input_ids), torch.ones(2, 5, dtype=torch.long)], dim=1)
        full = model(ids, pixels, mask, types)
    t0 = batch.input_ids.shape[1] - 1
    for i, step in enumerate(steps):
        torch.testing.assert_close(step, full[:, t0 + i], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, full[:, n - 1], atol=1e-5, rtol=0)


def test_mismatched_batch_lengths_are_errors(vlm: VLMo) -> None:
    with pytest.raises(InputError, match="2 images but 3 prompts"):
        vlm.generate([picture(0), picture(1)], PROMPTS)
    with pytest.raises(InputError):
        vlm.generate([], "caption en")


def test_bytes_that_are_not_an_image_fail_clearly(vlm: VLMo) -> None:
    from vlmo.errors import ImageError

    with pytest.raises(ImageError):
        vlm.generate(b"definitely not a png", "caption en")
    buf = io.BytesIO()
    picture(0).save(buf, format="PNG")
    with pytest.raises(ImageError):
        vlm.generate(buf.getvalue()[:40], "caption en")


def test_prefill_of_the_last_position_only_fills_the_same_cache(vlm: VLMo) -> None:
    """The last layer skips every position but the last, except for the keys and values the cache needs."""
    model = vlm.model
    batch = vlm.text.encode(["caption en", "answer en what is it?"])
    feats = torch.randn(2, model.cfg.num_image_tokens, model.cfg.text.hidden_size)
    caches = [model.new_cache(2, batch.input_ids.shape[1] + 2) for _ in range(2)]
    with torch.no_grad():
        last, _ = model.prefill(batch.input_ids, feats, batch.attention_mask, caches[0])
        every, _ = model.prefill(batch.input_ids, feats, batch.attention_mask, caches[1], all_logits=True)
    torch.testing.assert_close(last, every[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


# -- limits: the token budget, seeds, stopping when the consumer goes ---------------------------------------------

CONTEXT = 40  # max_position_embeddings of the `short` model: "caption en" (about 21 positions) leaves about 19


@pytest.fixture(scope="module")
def short(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> VLMo:
    """The gqa tiny model with a context of CONTEXT positions (its weights linked, its config.json edited)."""
    import json

    src = tiny_checkpoints["gqa"]
    out = tmp_path_factory.mktemp("short-context")
    for item in src.iterdir():
        (out / item.name).symlink_to(item)
    (out / "config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (out / "config.json").write_text(json.dumps(config))
    return VLMo.from_pretrained(out, device="cpu", dtype="float32")


class Calls:
    """Counts calls of a model method, wrapped in place on the instance."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.count = 0
        inner = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.count += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def prompt_length(vlm: VLMo, prompt: str) -> int:
    return int(vlm.text.encode([prompt]).input_ids.shape[1])


def test_the_token_budget_is_the_context_length(short: VLMo) -> None:
    n = prompt_length(short, "caption en")
    room = CONTEXT - n
    assert 0 < room < 64  # the default length (64) does not fit either
    assert len(short.text.encode([""]).input_ids[0]) < n  # (the image tokens count too)
    answer = short.generate(picture(0), "caption en", max_new_tokens=room)  # the whole budget is fine
    assert isinstance(answer, str)
    for prompt, call in (
        ("caption en", lambda: short.generate(picture(0), "caption en", max_new_tokens=room + 1)),
        ("caption en", lambda: short.caption(picture(0))),  # the task's default (64) is refused too: no clamping
        ("caption en", lambda: short.stream(picture(0), "caption en", max_new_tokens=100_000)),  # before a piece
        ("detect cat", lambda: short.detect(picture(0), "cat", max_new_tokens=100_000)),
    ):
        n = prompt_length(short, prompt)
        with pytest.raises(GenerationConfigError) as info:
            call()
        want = f"the prompt takes {n} of the model's {CONTEXT} positions; max_new_tokens may be at most {CONTEXT - n}"
        assert str(info.value) == want


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(
    short: VLMo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#9: a very long question must not allocate a cache for it (nor run the vision tower) before failing."""
    short.image_cache.clear()
    caches = Calls(monkeypatch, short.model, "new_cache")
    vision = Calls(monkeypatch, short.model, "encode_images")
    question = "what is " + "very " * 40 + "red?"  # over the context in tokens, not in characters
    n = prompt_length(short, tasks_ask(question))
    for call in (
        lambda: short.ask(picture(0), question, max_new_tokens=1),
        lambda: short.stream(picture(0), tasks_ask(question), max_new_tokens=1),
    ):
        with pytest.raises(InputError, match=rf"^the prompt takes {n} of the model's {CONTEXT} positions") as info:
            call()
        assert "\n" not in str(info.value) and "shorten" in str(info.value)
    assert (caches.count, vision.count) == (0, 0)
    # the engine's loop itself refuses such a request when it is made, before it waits or runs
    from vlmo import tasks

    with pytest.raises(InputError, match="positions"):
        Scheduler(short).request(picture(0), tasks.ask(question), {"max_new_tokens": 1}, Collector())
    assert (caches.count, vision.count) == (0, 0)


def tasks_ask(question: str) -> str:
    from vlmo import tasks

    return tasks.ask(question).text


@pytest.mark.parametrize("seed", [2**64, 99999999999999999999999, -1, "7", 1.5, True])
def test_seeds_must_fit_in_64_bits(vlm: VLMo, seed: object) -> None:
    with pytest.raises(GenerationConfigError, match=r"^seed must be a whole number from 0 to 2\*\*64 - 1") as info:
        vlm.generate(picture(0), "caption en", max_new_tokens=2, do_sample=True, seed=seed)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationConfigError, match="seed"):  # validated with the other options, before any work
        SamplingConfig.from_options({"seed": seed}, 8)  # type: ignore[typeddict-item]


def test_the_largest_seed_works(vlm: VLMo) -> None:
    kw = dict(max_new_tokens=4, do_sample=True)
    assert vlm.generate(picture(0), "caption en", seed=2**64 - 1, **kw) == vlm.generate(
        picture(0), "caption en", seed=2**64 - 1, **kw
    )


def test_closing_a_stream_stops_generation_at_once(vlm: VLMo, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    decodes = Calls(monkeypatch, vlm.model, "decode")
    pieces = vlm.stream(picture(4), "caption en", max_new_tokens=200)
    first = [next(pieces), next(pieces)]
    assert all(first)
    before = decodes.count
    assert before <= 4
    pieces.close()  # what Gradio does when the client has gone (GeneratorExit at the next yield)
    assert inspect.getgeneratorstate(pieces) == inspect.GEN_CLOSED
    assert decodes.count == before
    with pytest.raises(StopIteration):
        next(pieces)
    assert decodes.count == before


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"temperature": 1e-39}, "temperature must be at least 0.0001"),
        ({"top_p": 1e-320}, "top_p must be at least 1e-06"),
        ({"top_p": True}, "top_p must be in"),
    ],
)
def test_sampling_values_the_sampler_cannot_compute_are_refused(vlm: VLMo, options: dict, fragment: str) -> None:
    """A temperature or top_p so small that float32 probabilities overflow is an error before any work."""
    with pytest.raises(GenerationConfigError, match=fragment):
        vlm.generate(picture(0), "caption en", do_sample=True, **options)


def test_the_smallest_allowed_values_sample_the_greedy_token() -> None:
    """At the bounds the sampler still computes finite probabilities (the best score is shifted to 0 before the
    division), so a sample is the most likely token, not an error, even for logits far from 0."""
    from vlmo.generation import MIN_TEMPERATURE, MIN_TOP_P

    logits = torch.randn(4, 257, generator=torch.Generator().manual_seed(0)) * 80 + 500
    for cfg in (
        SamplingConfig(do_sample=True, temperature=MIN_TEMPERATURE),
        SamplingConfig(do_sample=True, top_p=MIN_TOP_P),
        SamplingConfig(do_sample=True, temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P, top_k=5),
    ):
        for seed in range(5):
            picked = select_next(logits, cfg, torch.Generator().manual_seed(seed))
            assert picked.tolist() == logits.argmax(-1).tolist()


def test_a_question_too_long_for_any_tokenization_is_refused_before_tokenizing(
    vlm: VLMo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More characters than the longest token × the context cannot fit: refused by length, before the tokenizer
    spends seconds on it (a server would hold that client's neighbours up meanwhile)."""
    from vlmo import tasks

    encodes = Calls(monkeypatch, vlm.text, "encode")
    most = vlm.text.max_token_chars * vlm.context_length
    question = "why " * (most // 4 + 1)
    for call in (
        lambda: vlm.ask(picture(0), question),
        lambda: Scheduler(vlm).request(picture(0), tasks.ask(question), None, Collector()),
    ):
        with pytest.raises(InputError, match=r"^the prompt has \d+ characters, more than the model's \d+ positions"):
            call()
    assert encodes.count == 0
    assert vlm.prompt_length(tasks.ask("why " * 5).text) > 0  # a normal question is tokenized as before
