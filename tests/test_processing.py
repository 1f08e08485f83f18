"""Image preprocessing and prompt encoding, checked against transformers 5.24 (model-notes §2, §3)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vlmo.demo.standins import build_tokenizer
from vlmo.errors import CheckpointError, ImageError, InputError
from vlmo.processing import (
    EncodedBatch,
    ImageProcessorConfig,
    TextProcessor,
    load_image,
    preprocess_images,
)

N_IMAGE_TOKENS = 16  # a 56x56 image in 14x14 patches


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels, so that resampling differences cannot hide."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height * width * bands,), generator=gen, dtype=torch.uint8)
    return Image.frombytes(mode, (width, height), bytes(data.tolist()))


def encoded(image: Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def hub_preprocessor_config(size: int) -> dict[str, object]:
    """The shape of PaliGemma's hub `preprocessor_config.json` (model-notes §2)."""
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": 256,
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": size, "width": size},
    }


def hf_image_processor(size: int) -> Any:
    siglip = pytest.importorskip("transformers.models.siglip")
    # Pin the PIL backend: the torchvision one (chosen when torchvision is installed) resamples differently.
    return siglip.SiglipImageProcessorPil(
        size={"height": size, "width": size},
        resample=3,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


# -- preprocessing parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 64, 70])
@pytest.mark.parametrize("width,height", [(37, 23), (300, 200), (64, 64), (1, 5)])
def test_preprocess_matches_transformers_pil_backend(size: int, width: int, height: int) -> None:
    hf = hf_image_processor(size)
    image = noise_image(width, height, seed=width * height)
    expected = hf(images=[image], return_tensors="pt")["pixel_values"]
    ours = preprocess_images([image], ImageProcessorConfig.from_hf(hub_preprocessor_config(size), size))
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, size, size)
    assert torch.equal(ours, expected)
    assert ours.min() >= -1 and ours.max() <= 1


def test_preprocess_batch_matches_transformers() -> None:
    hf = hf_image_processor(64)
    images = [noise_image(40, 30, seed=1), noise_image(80, 90, seed=2), noise_image(64, 64, seed=3)]
    expected = hf(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(preprocess_images(images, ImageProcessorConfig(64, 64)), expected)


def test_preprocess_other_mean_std_matches_transformers() -> None:
    """With 0.5/0.5 many formulas agree; CLIP statistics check that the order of float ops is the same."""
    siglip = pytest.importorskip("transformers.models.siglip")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    hf = siglip.SiglipImageProcessorPil(size={"height": 48, "width": 40}, image_mean=mean, image_std=std)
    image = noise_image(33, 57, seed=9)
    expected = hf(images=[image], return_tensors="pt")["pixel_values"]
    config = ImageProcessorConfig(48, 40, image_mean=mean, image_std=std)
    assert torch.equal(preprocess_images([image], config), expected)


def rgb_tRNS_image() -> Image.Image:
    image = noise_image(20, 12, seed=5)
    image.info["transparency"] = image.getpixel((0, 0))
    return image


def palette_with_transparency() -> Image.Image:
    image = noise_image(20, 12, seed=6).quantize(16)
    image.info["transparency"] = 3
    return image


MODE_IMAGES = {
    "L": lambda: noise_image(21, 13, "L"),
    "LA": lambda: noise_image(21, 13, "LA"),
    "P+transparency": palette_with_transparency,
    "PA": lambda: noise_image(21, 13, "PA").convert("PA"),
    "RGBA": lambda: noise_image(21, 13, "RGBA"),
    "RGB+tRNS": rgb_tRNS_image,
    "CMYK": lambda: noise_image(21, 13, "CMYK"),
    "1": lambda: noise_image(21, 13, "L").convert("1"),
}  # 16-bit and 32-bit modes (I;16, I, F) are scaled by range, where transformers clips: see below


@pytest.mark.parametrize("name", sorted(MODE_IMAGES))
def test_modes_match_transformers_convert_rgb(name: str) -> None:
    hf = hf_image_processor(64)
    image = MODE_IMAGES[name]()
    expected = hf(images=[image], return_tensors="pt")["pixel_values"]
    rgb = load_image(image, exif_transpose=False)
    assert rgb.mode == "RGB"
    assert torch.equal(preprocess_images([rgb], ImageProcessorConfig(64, 64)), expected)
    # preprocess_images converts non-RGB input the same way by itself.
    assert torch.equal(preprocess_images([image], ImageProcessorConfig(64, 64)), expected)


# -- 16-bit and 32-bit images: scaled by range, not clipped -------------------------------------------------

DARK, MID = 20, 128  # 8-bit levels of the shape and the background


def shape_on_background(mode: str, dark: float, mid: float, size: tuple[int, int] = (12, 8)) -> Image.Image:
    """A dark rectangle (x 2..5, y 1..4) on a mid background, in a 16-bit or 32-bit `mode`."""
    width, height = size
    values = [dark if 2 <= x <= 5 and 1 <= y <= 4 else mid for y in range(height) for x in range(width)]
    if mode.startswith("I;16"):
        order = {"I;16B": ">", "I;16N": "="}.get(mode, "<")
        return Image.frombytes(mode, size, struct.pack(f"{order}{len(values)}H", *values))
    image = Image.new(mode, size)
    image.putdata(values)
    return image


def grey_levels(image: Image.Image | Path) -> tuple[int, int]:
    """(shape, background) grey level of a `shape_on_background` image loaded as RGB, checking it is grey."""
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (12, 8)
    shape, background = rgb.getpixel((3, 2)), rgb.getpixel((0, 0))
    assert len(set(shape)) == 1 and len(set(background)) == 1  # grey
    assert rgb.getpixel((5, 4)) == shape and rgb.getpixel((6, 4)) == background
    return shape[0], background[0]


def test_16bit_png_keeps_its_colours(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    shape_on_background("I;16", DARK * 257, MID * 257).save(path)
    assert Image.open(path).mode == "I;16"  # what Pillow reads a 16-bit greyscale PNG as
    assert grey_levels(path) == (DARK, MID)  # not (255, 255): Pillow's convert("RGB") clips to white
    assert Image.open(path).convert("RGB").getpixel((3, 2)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16bit_modes_scale_by_the_full_range(mode: str) -> None:
    assert grey_levels(shape_on_background(mode, DARK * 257, MID * 257)) == (DARK, MID)
    assert grey_levels(shape_on_background(mode, 0, 65535)) == (0, 255)
    assert grey_levels(shape_on_background(mode, 32768, 128)) == (128, 0)  # 32768 / 257 = 127.5, rounded up


def test_32bit_int_and_float_scale_by_their_min_and_max() -> None:
    assert grey_levels(shape_on_background("I", -1000, 3000)) == (0, 255)
    assert grey_levels(shape_on_background("I", 200_000, 100_000)) == (255, 0)
    assert grey_levels(shape_on_background("F", 0.25, 0.75)) == (0, 255)
    image = shape_on_background("F", 0.25, 0.75)
    image.putpixel((11, 7), 1.25)  # a brighter pixel stretches the range: 0.25 → 0, 0.75 → 127.5 → 128
    assert grey_levels(image) == (0, 128)
    image.putpixel((11, 7), float("nan"))  # NaN and infinities count as the ends of the finite range
    image.putpixel((10, 7), float("inf"))
    rgb = load_image(image)
    assert (rgb.getpixel((11, 7)), rgb.getpixel((10, 7)), rgb.getpixel((0, 0))) == ((0,) * 3, (255,) * 3, (255,) * 3)


@pytest.mark.parametrize(("mode", "value", "level"), [("I", 100, 100), ("I", 70_000, 255), ("F", -3.5, 0)])
def test_constant_wide_images_keep_their_clipped_value(mode: str, value: float, level: int) -> None:
    rgb = load_image(Image.new(mode, (5, 3), value))
    assert set(rgb.get_flattened_data()) == {(level,) * 3}


def test_transformers_clips_16bit_images_where_vlmo_scales() -> None:
    image = shape_on_background("I;16", DARK * 257, MID * 257)
    clipped = hf_image_processor(64)(images=[image], return_tensors="pt")["pixel_values"]
    assert bool((clipped == 1.0).all())  # all white: the model would be asked about an empty picture
    ours = preprocess_images([image], ImageProcessorConfig(64, 64))
    assert ours.min() < -0.8 and ours[0, :, 0, 0].tolist() == pytest.approx([MID / 255 * 2 - 1] * 3, abs=1e-6)
    assert torch.equal(ours, preprocess_images([load_image(image)], ImageProcessorConfig(64, 64)))


def test_transparency_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 2), (200, 10, 60, 255))
    rgba.putpixel((0, 0), (200, 10, 60, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))
    assert out.getpixel((3, 1)) == (200, 10, 60)
    # Plain convert("RGB") would have dropped alpha and kept the colour.
    assert rgba.convert("RGB").getpixel((0, 0)) == (200, 10, 60)

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert load_image(encoded(palette, "PNG")).tobytes() == bytes([255, 255, 255, 40, 50, 60])


def test_unsupported_mode_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="mode 'La'"):
        load_image(Image.new("La", (3, 3)))


def test_preprocess_without_resize_or_normalize() -> None:
    image = noise_image(5, 4)
    config = ImageProcessorConfig(4, 5, do_resize=False, do_normalize=False, do_rescale=False)
    out = preprocess_images([image], config)
    assert out.shape == (1, 3, 4, 5)
    assert torch.equal(out[0].permute(1, 2, 0).flatten(), torch.tensor(list(image.tobytes()), dtype=torch.float32))
    with pytest.raises(InputError, match="different sizes"):
        preprocess_images([image, noise_image(6, 4)], config)
    with pytest.raises(InputError, match="no images"):
        preprocess_images([], config)


# -- loading -------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)

    raw = load_image(path, exif_transpose=False)
    upright = load_image(path)
    assert raw.size == (40, 20) and upright.size == (20, 40)
    assert upright.tobytes() == raw.transpose(Image.Transpose.ROTATE_270).tobytes()
    r, g, b = upright.getpixel((15, 5))  # the red block is now top-right
    assert r > 200 and b < 60


def test_load_from_path_bytes_and_pil(tmp_path: Path) -> None:
    image = noise_image(9, 7)
    data = encoded(image, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (path, str(path), data, Image.open(io.BytesIO(data)), image):
        out = load_image(source)
        assert out.mode == "RGB" and out.tobytes() == image.tobytes()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no image file at .*nope.png; check the path"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="no image file"):
        load_image(tmp_path)  # a directory


def test_not_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image\n")
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(text)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageError, match="the given image bytes is not an image"):
        load_image(b"not an image")
    with pytest.raises(ImageError, match="pass a path, bytes or a PIL image"):
        load_image(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encoded(noise_image(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageError, match="the given image bytes is truncated"):
        load_image(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(ImageError, match="truncated"):
        load_image(lazy)  # a lazily opened PIL image fails on load, too


# 150 pixels: Pillow only warns (between the limit and twice it); 400: past twice the limit, Pillow raises.
@pytest.mark.parametrize("pixels", [150, 400])
def test_decompression_bomb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pixels: int) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (pixels, 1)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="too large .*limit of 100 pixels"):
        load_image(path)
    with pytest.raises(ImageError, match="too large"):
        load_image(path.read_bytes())


# -- config --------------------------------------------------------------------------------------------------


def test_from_hf_reads_hub_config() -> None:
    config = ImageProcessorConfig.from_hf(hub_preprocessor_config(448), image_size=224)
    assert (config.height, config.width, config.resample) == (448, 448, 3)
    assert config.image_mean == config.image_std == (0.5, 0.5, 0.5)
    assert config.rescale_factor == pytest.approx(1 / 255)


def test_from_hf_variants_and_defaults() -> None:
    assert ImageProcessorConfig.from_hf(None, 896) == ImageProcessorConfig(896, 896)
    config = ImageProcessorConfig.from_hf(
        {"size": {"shortest_edge": 112}, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25, "new_key": 1}, 224
    )
    assert (config.height, config.width) == (112, 112)
    assert config.image_mean == (0.1, 0.2, 0.3) and config.image_std == (0.25, 0.25, 0.25)
    config = ImageProcessorConfig.from_hf({"size": {"height": 30, "width": 50}, "do_normalize": False}, 224)
    assert (config.height, config.width, config.do_normalize) == (30, 50, False)
    out = preprocess_images([noise_image(7, 9)], config)
    assert out.shape == (1, 3, 30, 50) and out.min() >= 0 and out.max() <= 1


# -- prompts and token ids -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().save(str(path))
    return path


@pytest.fixture(scope="module")
def text_processor(tokenizer_file: Path) -> TextProcessor:
    return TextProcessor.from_file(tokenizer_file, N_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def hf_processor(tokenizer_file: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    image_processor = hf_image_processor(56)
    image_processor.image_seq_length = N_IMAGE_TOKENS
    tokenizer = transformers.GemmaTokenizer(tokenizer_file=str(tokenizer_file))
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def assert_same_as_hf(ours: EncodedBatch, hf: dict[str, torch.Tensor], with_suffix: bool) -> None:
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(getattr(ours, key), hf[key]), key
        assert getattr(ours, key).dtype == torch.int64
    if with_suffix:
        assert ours.labels is not None and torch.equal(ours.labels, hf["labels"])
    else:
        assert ours.labels is None
        assert (hf["labels"] == -100).all()  # transformers returns all-ignored labels without suffixes


CASES = {
    "single": (["caption en"], None),
    "batch": (["caption en", "what is in the picture of the red car?", "ocr"], None),
    "suffix": (["detect cat"], ["<loc0012><loc0100><loc0500><loc0900> cat"]),
    "batch+suffix": (
        ["caption en", "answer en how many shapes are there?"],
        ["a red circle and a blue square", "3"],
    ),
    "image token": (["<image>answer en what color is the car?"], None),
    "image token+suffix": (["<image> caption fr"], ["une voiture"]),
    "non-ascii": (["caption de Größe ü"], ["naïve ☃"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_matches_paligemma_processor(text_processor: TextProcessor, hf_processor: Any, case: str) -> None:
    prompts, suffixes = CASES[case]
    images = [noise_image(30 + i, 20, seed=i) for i in range(len(prompts))]
    hf = hf_processor(images=images, text=prompts, suffix=suffixes, padding="longest", return_tensors="pt")
    ours = text_processor.encode(prompts, suffixes)
    assert_same_as_hf(ours, hf, with_suffix=suffixes is not None)
    assert torch.equal(preprocess_images(images, ImageProcessorConfig(56, 56)), hf["pixel_values"])


def test_encode_right_padding_matches(text_processor: TextProcessor, hf_processor: Any) -> None:
    prompts, suffixes = ["caption en", "describe the photo"], ["a", "a dog on a car"]
    images = [noise_image(8, 8)] * 2
    hf = hf_processor(
        images=images,
        text=prompts,
        suffix=suffixes,
        padding="longest",
        padding_side="right",
        return_tensors="pt",
    )
    assert_same_as_hf(text_processor.encode(prompts, suffixes, padding_side="right"), hf, with_suffix=True)


def test_encode_layout(text_processor: TextProcessor) -> None:
    tp = text_processor
    batch = tp.encode(["caption en", "a"], ["red", "blue"])
    ids, types, labels = batch.input_ids, batch.token_type_ids, batch.labels
    assert labels is not None
    for row in range(2):
        real = ids[row][batch.attention_mask[row] == 1].tolist()
        assert real[:N_IMAGE_TOKENS] == [tp.image_id] * N_IMAGE_TOKENS
        assert real[N_IMAGE_TOKENS] == tp.bos_id and real[-1] == tp.eos_id
        assert real.count(tp.image_id) == N_IMAGE_TOKENS and real.count(tp.bos_id) == 1
    assert batch.input_ids[1, 0] == tp.pad_id and batch.attention_mask[1, 0] == 0  # left padded
    assert torch.equal(labels != -100, types == 1)
    # Each prefix ends in exactly one "\n" (the processor's); the user writes none.
    newline = tp.tokenizer.token_to_id("\n")
    prefix = ids[0][(types[0] == 0) & (batch.attention_mask[0] == 1)].tolist()
    assert prefix[-1] == newline and prefix[-2] != newline
    assert tp.decode(labels[0][labels[0] != -100]) == "red"


def test_str_prompt_is_a_batch_of_one(text_processor: TextProcessor) -> None:
    a, b = text_processor.encode("caption en", "x"), text_processor.encode(["caption en"], ["x"])
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape[0] == 1


def test_decode_keeps_loc_and_seg(text_processor: TextProcessor) -> None:
    tp = text_processor
    text = "<loc0012><loc1023><seg007> cat"
    ids = [tp.image_id, tp.bos_id, *tp.tokenizer.encode(text, add_special_tokens=False).ids, tp.eos_id]
    assert tp.decode(ids) == text
    assert tp.decode(torch.tensor(ids), skip_special_tokens=False).startswith("<image><bos><loc0012>")


def test_ids_come_from_the_tokenizer(text_processor: TextProcessor) -> None:
    tok = build_tokenizer()
    assert (text_processor.pad_id, text_processor.eos_id, text_processor.bos_id) == (0, 1, 2)
    assert text_processor.image_id == tok.get_vocab_size() - 1


def test_encode_input_errors(text_processor: TextProcessor) -> None:
    with pytest.raises(InputError, match="prompts must be strings"):
        text_processor.encode([123])  # type: ignore[list-item]
    with pytest.raises(InputError, match="2 prompts but 1 suffixes"):
        text_processor.encode(["a", "b"], ["c"])
    with pytest.raises(InputError, match="suffixes must be strings"):
        text_processor.encode(["a"], [None])  # type: ignore[list-item]
    with pytest.raises(InputError, match="no prompts"):
        text_processor.encode([])


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer file"):
        TextProcessor.from_file(tmp_path / "missing.json", N_IMAGE_TOKENS)
    with pytest.raises(CheckpointError, match="'<img>'"):
        TextProcessor(build_tokenizer(), N_IMAGE_TOKENS, image_token="<img>")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"model": {"type": "WordLevel",', "not a valid tokenizer"),
        (b"\xff\xfe not utf-8", "not a valid tokenizer"),
        (b"[1, 2, 3]", "not a valid tokenizer"),
        (b"{}", "not a valid tokenizer"),
        (b'{"model": {"type": "WordLevel", "vocab": {}, "unk_token": "<unk>"}}', "no vocabulary"),
        (b'{"model": {"type": "BPE", "vocab": {}, "merges": []}}', "no vocabulary"),
    ],
    ids=["broken-json", "not-utf8", "not-an-object", "empty-object", "empty-wordlevel", "empty-bpe"],
)
def test_unreadable_tokenizer_file_is_one_checkpoint_error(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        TextProcessor.from_file(path, N_IMAGE_TOKENS)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and words in msg, msg


def test_tokenizer_without_the_paligemma_tokens_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    build_tokenizer().save(str(path))
    with pytest.raises(CheckpointError) as info:
        TextProcessor.from_file(path, N_IMAGE_TOKENS, image_token="<img>")
    assert str(path) in str(info.value) and "'<img>'" in str(info.value)


def test_padding_and_truncation_of_the_tokenizer_are_ignored() -> None:
    tok = build_tokenizer()
    tok.enable_padding(length=200)
    tok.enable_truncation(max_length=4)
    batch = TextProcessor(tok, N_IMAGE_TOKENS).encode(["caption en"])
    plain = TextProcessor(build_tokenizer(), N_IMAGE_TOKENS).encode(["caption en"])
    assert torch.equal(batch.input_ids, plain.input_ids)
    assert tok.padding is not None  # the caller's tokenizer is left as it was


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_bos_adding_post_processor_does_not_change_ids(tmp_path: Path, add_bos_token: bool) -> None:
    """Real Gemma tokenizer.json files add <bos> in a post-processor (and PaliGemma 1/2 tokenizer configs differ in
    add_bos_token); PaliGemmaProcessor turns it off and places <bos> itself. So must we, for either tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer()
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    image_processor = transformers.models.siglip.SiglipImageProcessorPil(size={"height": 56, "width": 56})
    image_processor.image_seq_length = 16
    hf_tok = transformers.GemmaTokenizer(tokenizer_file=str(path), add_bos_token=add_bos_token)
    proc = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tok)
    img = Image.new("RGB", (30, 30))
    want = proc(images=[img, img], text=["<image>caption en", "<image>ocr"], suffix=["a cat", "b"], padding="longest")
    got = TextProcessor.from_file(path, 16).encode(["caption en", "ocr"], ["a cat", "b"])
    assert got.input_ids.tolist() == list(map(list, want["input_ids"]))
    # Compare values, not containers: transformers 5.25 returns `labels` as a list of lists, earlier releases a tensor.
    assert got.labels is not None and got.labels.tolist() == [list(map(int, row)) for row in want["labels"]]


def test_an_unreadable_file_says_why_and_not_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the system will not let us read (tests run as root, where chmod stops nothing: `open` refuses it as
    for an unprivileged user) is "permission denied", not "truncated or corrupt"."""
    import builtins
    import errno
    import os

    path = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(path)
    real_open = builtins.open

    def refusing(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike) and os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(ImageError, match=f"cannot read {path}: permission denied; check its permissions") as info:
        load_image(path)
    assert "corrupt" not in str(info.value)


def test_no_bytes_is_no_image_and_a_url_is_not_a_missing_file() -> None:
    with pytest.raises(ImageError, match="has no image"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"^http://host/a\.png is a URL.*--allow-remote-images") as info:
        load_image("http://host/a.png")
    assert "no image file" not in str(info.value)
