"""Small, self-made stand-ins for tests, benchmarks, docs and the demo model: a tokenizer and a mask decoder.

Real PaliGemma tokenizers are gated on the hub, so tests build a tiny one with the same *structure*: a byte-fallback
BPE over "▁"-normalised text (Gemma style), the special tokens at their real ids (`<pad>` 0, `<eos>` 1, `<bos>` 2,
`<unk>` 3, `<mask>` 4), the 1024 `<locNNNN>` and 128 `<segNNN>` tokens as ordinary vocabulary entries in that
order, and `<image>` as the last, special, added token. Only the ids differ from the real tokenizer (a real one
has 257153 entries; this one about 1600).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

if TYPE_CHECKING:
    from vlmo.nn.vqvae import VQVAEDecoder

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))
IMAGE_TOKEN = "<image>"

# Characters with their own piece; anything else falls back to bytes <0x00>..<0xFF>, as in Gemma.
_ALPHABET = "▁\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:?!'\"-()/"
# Words that get merged into single pieces (with and without the leading "▁"), so prompts tokenize to fewer ids.
DEFAULT_WORDS = (
    "caption", "answer", "detect", "segment", "describe", "ocr", "question", "en", "fr", "de", "what", "is", "in",
    "the", "a", "an", "of", "on", "and", "image", "picture", "photo", "cat", "dog", "car", "red", "green", "blue",
    "yellow", "circle", "square", "triangle", "how", "many", "color", "there", "yes", "no", "shape", "shapes",
    "are", "this",
)  # fmt: skip


def build_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS) -> Tokenizer:
    """A Gemma-structured tokenizer with PaliGemma's extra tokens (see module docstring).

    Ids: specials 0–4, bytes 5–260, single characters, merged words, then `<loc0000>`…`<loc1023>`,
    `<seg000>`…`<seg127>`, and `<image>` last (`len(tokenizer) - 1`).
    """
    vocab: dict[str, int] = {}

    def add(piece: str) -> None:
        if piece not in vocab:
            vocab[piece] = len(vocab)

    for special in SPECIALS:
        add(special)
    for b in range(256):
        add(f"<0x{b:02X}>")
    for ch in _ALPHABET:
        add(ch)
    merges: list[tuple[str, str]] = []
    for word in words:
        for form in (word, "▁" + word):
            for end in range(2, len(form) + 1):
                left, right = form[: end - 1], form[end - 1]
                if form[:end] not in vocab:
                    merges.append((left, right))
                    add(form[:end])
    for piece in LOC_TOKENS + SEG_TOKENS:
        add(piece)

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    # loc/seg already have ids in the vocabulary; registering them as (non-special) added tokens makes text such as
    # "<loc0012>" encode to that one id, as PaliGemmaProcessor arranges for the real tokenizer. Ids do not move.
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in LOC_TOKENS + SEG_TOKENS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    assert tok.token_to_id(IMAGE_TOKEN) == len(vocab)
    return tok


def preprocessor_config(image_size: int, image_tokens: int) -> dict[str, object]:
    """`preprocessor_config.json` as the hub's PaliGemma checkpoints have it (SigLIP processor: bicubic resize to a
    square, rescale 1/255, normalise with mean = std = 0.5), for a checkpoint written on the fly."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": image_tokens,
    }


def blob_mask_decoder() -> VQVAEDecoder:
    """A hand-set vae-oid decoder that draws its 4×4 code grid as a smooth blob, for tests and the docs' pictures.

    Codes ≥ 64 mean "inside", codes < 64 "outside": the codebook puts that bit in channel 0, every layer carries
    channel 0 alone (1×1 identity, residual blocks zeroed, each transposed convolution a ×2 bilinear upsampling),
    and the last layer thresholds at 0.5. So the 64×64 mask is the grid upsampled and rounded off. The real
    decoder's weights come from `vae-oid.npz`; this one only makes the plumbing visible.
    """
    import torch

    from vlmo.nn.vqvae import VQVAEDecoder

    decoder = VQVAEDecoder()
    bilinear = torch.tensor([0.25, 0.75, 0.75, 0.25])
    with torch.no_grad():
        for p in decoder.parameters():
            p.zero_()
        decoder._vq_vae._embedding[64:, 0] = 1.0
        layer = decoder.decoder.get_parameter  # by checkpoint name ("12.weight"), typed as a Parameter
        layer("0.weight")[0, 0] = 1.0
        for i in (4, 6, 8, 10):
            layer(f"{i}.weight")[0, 0] = torch.outer(bilinear, bilinear)
        layer("12.weight")[0, 0] = 1.0
        layer("12.bias").fill_(-0.5)
    return decoder.eval().requires_grad_(False)
