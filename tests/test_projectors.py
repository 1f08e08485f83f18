"""The Dense Connector projector kinds (sti, sci, dci, seed) beside PaliGemma's linear projector.

Every kind must (a) equal the linear projector exactly at initialisation, given the same `linear` weights, (b) let
gradients reach all its parameters, (c) ask the tower for hidden states only when it reads them, (d) keep [B, N, D],
and (e) actually learn. Tiny towers of 4 layers keep layer choices meaningful and the file fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import pytest
import torch
from torch import nn

from vlmo.config import PaliGemmaConfig, ProjectorConfig, TextConfig, VisionConfig
from vlmo.errors import ConfigError
from vlmo.nn.paligemma import PaliGemma
from vlmo.nn.projector import (
    BASE_PARAMETERS,
    DenseProjector,
    STIProjector,
    build_projector,
    extra_parameter_names,
    init_from_linear,
)

DENSE = ("sti", "sci", "dci", "seed")
KINDS = ("linear", *DENSE)
VISION_LAYERS = 4


def tiny_config(kind: str = "linear", image_size: int = 56, **projector: Any) -> PaliGemmaConfig:
    """4 vision layers of width 32, a 1-layer Gemma of width 64; 56 px → 4×4 = 16 tokens, 70 px → 5×5 = 25."""
    vision = VisionConfig(
        hidden_size=32, intermediate_size=48, num_layers=VISION_LAYERS, num_heads=4, image_size=image_size
    )
    text = TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16
    )
    proj = ProjectorConfig(kind=kind, in_features=32, out_features=64, vision_layers=VISION_LAYERS, **projector)
    return PaliGemmaConfig(vision=vision, text=text, projector=proj, image_token_id=127)


def pixels(batch: int = 2, size: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def tower_outputs(cfg: PaliGemmaConfig, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Real features and hidden states of a random tiny tower (detached: these tests train the projector only)."""
    torch.manual_seed(seed)
    model = PaliGemma(cfg)
    with torch.no_grad():
        features, hidden = model.vision(pixels(size=cfg.vision.image_size), output_hidden_states=True)
    return features, hidden


def branch_parameters(projector: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in projector.named_parameters() if n not in BASE_PARAMETERS}


def last_layer_names(projector: nn.Module) -> set[str]:
    assert isinstance(projector, DenseProjector)
    last = projector.last_layer()
    return {n for n, p in projector.named_parameters() if p is last.weight or p is last.bias}


# ---------------------------------------------------------------------------------------------------- equality at init


@pytest.mark.parametrize("kind", DENSE)
@pytest.mark.parametrize("image_size", [56, 70])
def test_equals_linear_projector_at_init(kind: str, image_size: int) -> None:
    """A base model's weights load into the new kind under the same names; only the branch is left to initialise,
    and the image features are then bit-identical to the base model's."""
    torch.manual_seed(0)
    base = PaliGemma(tiny_config(image_size=image_size)).eval()
    torch.manual_seed(1)
    model = PaliGemma(tiny_config(kind, image_size=image_size)).eval()
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted("projector." + n for n in extra_parameter_names(model.cfg.projector))

    x = pixels(size=image_size)
    with torch.no_grad():
        want, got = base.encode_images(x), model.encode_images(x)
    n = (image_size // 14) ** 2
    assert got.shape == want.shape == (2, n, 64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", DENSE)
def test_init_from_linear_keeps_output_device_dtype_and_mode(kind: str) -> None:
    cfg = tiny_config(kind)
    features, hidden = tower_outputs(cfg)
    base = build_projector(replace(cfg.projector, kind="linear")).double().eval().requires_grad_(False)
    new = init_from_linear(cfg.projector, base)
    assert type(new).__name__ != "LinearProjector" and new.linear.weight.dtype == torch.float64
    assert not new.training and not any(p.requires_grad for p in new.parameters())
    assert torch.equal(new(features.double(), [h.double() for h in hidden]), base(features.double(), []))
    assert new.linear.weight.data_ptr() != base.linear.weight.data_ptr()  # a copy: training one leaves the other


def test_init_from_linear_rejects_other_widths() -> None:
    base = build_projector(ProjectorConfig(in_features=32, out_features=48))
    with pytest.raises(ConfigError, match="32 → 48"):
        init_from_linear(tiny_config("dci").projector, base)


# ------------------------------------------------------------------------------------------- hidden states and shapes


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_states_requested_only_when_needed(kind: str) -> None:
    torch.manual_seed(0)
    model = PaliGemma(tiny_config(kind)).eval()
    seen: list[bool] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(bool(kwargs.get("output_hidden_states", args[1] if len(args) > 1 else False)))

    model.vision.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        out = model.encode_images(pixels(batch=3))
    assert seen == [kind != "linear"]
    assert model.projector.uses_hidden_states == model.cfg.projector.uses_hidden_states == (kind != "linear")
    assert out.shape == (3, 16, 64)
    assert model.cfg.num_image_tokens == 16  # every kind keeps PaliGemma's token budget


def test_sti_integrates_each_window_into_its_own_tokens() -> None:
    """STI keeps N tokens: a pooled window of `pool_stride` row-major tokens changes exactly the tokens inside it,
    including the partial last window of a 25-token (5×5) grid."""
    cfg = tiny_config("sti", image_size=70).projector
    torch.manual_seed(0)
    proj = build_projector(cfg).eval()
    assert isinstance(proj, STIProjector) and cfg.pool_stride == 8
    nn.init.normal_(proj.mlp.fc2.weight)  # a trained branch: non-zero output
    features = torch.randn(1, 25, 32)
    hidden = [torch.randn(1, 25, 32) for _ in range(VISION_LAYERS + 1)]
    with torch.no_grad():
        ref = proj(features, hidden)
        for token, window in ((3, range(0, 8)), (24, range(24, 25))):
            bumped = [h.clone() for h in hidden]
            bumped[cfg.intermediate_layers[0]][0, token] += 5.0
            changed = (proj(features, bumped) - ref).abs().amax(-1)[0] > 0
            assert changed.nonzero().flatten().tolist() == list(window)


# ----------------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", DENSE)
def test_gradients_reach_every_parameter(kind: str) -> None:
    """Expected: on the first backward every parameter has a gradient tensor, and `linear` plus the zero last layer
    have non-zero ones. The branch layers before the zero last layer get *exactly* zero gradient (the zero weight
    blocks the backward path) — that is the price of starting equal to the base. After one optimiser step the last
    layer is non-zero, and the next backward gives every parameter a non-zero gradient."""
    cfg = tiny_config(kind)
    features, hidden = tower_outputs(cfg)
    torch.manual_seed(2)
    proj = build_projector(cfg.projector).train()
    target = torch.randn(2, 16, 64)
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad()
        (proj(features, hidden) - target).square().mean().backward()
        grads = {n: p.grad for n, p in proj.named_parameters()}
        assert all(g is not None for g in grads.values()), "a parameter is disconnected from the output"
        return {n: g for n, g in grads.items() if g is not None}

    first = step()
    last = last_layer_names(proj)
    assert last and set(branch_parameters(proj)) - last, "a branch has a zero last layer and layers before it"
    for name, grad in first.items():
        if name in last or name in BASE_PARAMETERS:
            assert grad.abs().sum() > 0, name
        else:
            assert torch.count_nonzero(grad) == 0, name
    opt.step()
    second = step()
    for name, grad in second.items():
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", DENSE)
def test_branch_learns_with_base_frozen(kind: str) -> None:
    """Train only the branch a few steps towards random targets: the loss falls and the output leaves the base's."""
    cfg = tiny_config(kind)
    features, hidden = tower_outputs(cfg)
    torch.manual_seed(3)
    proj = build_projector(cfg.projector).train()
    proj.linear.requires_grad_(False)
    with torch.no_grad():
        base_out = proj.linear(features)
    target = torch.randn(2, 16, 64)
    opt = torch.optim.Adam(branch_parameters(proj).values(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (proj(features, hidden) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert (proj(features, hidden) - base_out).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- names and loading


def test_extra_parameter_names_at_real_shapes() -> None:
    """What a plain checkpoint lacks, per kind, at PaliGemma-3B shapes (meta device: no memory)."""
    assert extra_parameter_names(ProjectorConfig()) == []
    norms2 = ["norms.0.weight", "norms.0.bias", "norms.1.weight", "norms.1.bias"]
    mlp = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for kind in ("sti", "sci", "dci"):
        assert extra_parameter_names(ProjectorConfig(kind=kind)) == norms2 + mlp
    assert extra_parameter_names(ProjectorConfig(kind="seed")) == [*norms2, "proj.weight", "proj.bias"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_projector(ProjectorConfig(kind="dci")).state_dict().items()}
    assert shapes["linear.weight"] == (2048, 1152) and shapes["mlp.fc1.weight"] == (2048, 3 * 1152)
    assert shapes["mlp.fc2.weight"] == (2048, 2048)


def test_reset_branch_parameters_materialises_a_meta_projector() -> None:
    """The loader's path for a branch no file provides: build on meta, `to_empty`, load `linear`, reset the branch."""
    cfg = tiny_config("sci")
    features, hidden = tower_outputs(cfg)
    base = build_projector(replace(cfg.projector, kind="linear"))
    with torch.device("meta"):
        proj = build_projector(cfg.projector)
    assert isinstance(proj, DenseProjector)
    proj.to_empty(device="cpu")
    proj.reset_branch_parameters()
    proj.linear.load_state_dict(base.linear.state_dict())
    with torch.no_grad():
        assert torch.equal(proj(features, hidden), base(features, []))


# -------------------------------------------------------------------------------------------------------- configuration


def test_default_layers_scale_with_depth() -> None:
    # 27 layers (SigLIP So400m): the paper's CLIP-L/24 hidden states 7, 15 scaled; seed at 1/3 and 2/3 depth.
    assert ProjectorConfig(kind="sti").intermediate_layers == (8, 17)
    assert ProjectorConfig(kind="sci").intermediate_layers == (8, 17)
    assert ProjectorConfig(kind="seed").intermediate_layers == (9, 18)
    assert ProjectorConfig(kind="dci").group_ranges == ((0, 13), (13, 26))  # the paper's own SigLIP grouping
    assert ProjectorConfig(kind="sti", vision_layers=4).intermediate_layers == (1, 3)
    assert ProjectorConfig(kind="dci", vision_layers=4).group_ranges == ((0, 2), (2, 3))
    assert ProjectorConfig(kind="dci", groups=3).group_ranges == ((0, 9), (9, 18), (18, 26))
    assert ProjectorConfig(kind="sci", layers=(2, 5, 11)).intermediate_layers == (2, 5, 11)
    assert ProjectorConfig(kind="sti").branch_width == 2048
    assert ProjectorConfig(kind="sti", mlp_width=512).branch_width == 512


def test_config_round_trips_through_json() -> None:
    cfg = ProjectorConfig(kind="sci", layers=(3, 9), mlp_width=256)
    back = ProjectorConfig(**json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and back.layers == (3, 9)


def test_linear_ignores_dense_fields() -> None:
    """`from_hf` sets no vision depth; the linear kind must accept any values of the fields it does not read."""
    ProjectorConfig(vision_layers=1, layers=(99,), groups=0, pool_stride=0, mlp_width=0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(kind="mlp"), "unknown projector kind 'mlp'"),
        (dict(kind="sti", vision_layers=1), "at least 2 layers"),
        (dict(kind="sti", layers=(1, 4)), r"in 0\.\.3"),
        (dict(kind="sci", layers=(2, 1)), "strictly increasing"),
        (dict(kind="sci", layers=(2, 2)), "strictly increasing"),
        (dict(kind="seed", layers=()), "strictly increasing"),
        (dict(kind="seed", layers=(-1, 2)), r"in 0\.\.3"),
        (dict(kind="sti", pool_stride=0), "pool_stride"),
        (dict(kind="dci", groups=0), r"groups must be in 1\.\.3"),
        (dict(kind="dci", groups=4), r"groups must be in 1\.\.3"),
        (dict(kind="sci", mlp_width=0), "mlp_width"),
    ],
)
def test_config_errors(fields: dict[str, Any], match: str) -> None:
    kw: dict[str, Any] = dict(in_features=32, out_features=64, vision_layers=VISION_LAYERS) | fields
    with pytest.raises(ConfigError, match=match):
        ProjectorConfig(**kw)


def test_27_layer_defaults_do_not_fit_a_4_layer_tower() -> None:
    """Default layer choices are checked against `vision_layers`; a projector configured for another depth than the
    tower it is fed fails with a ConfigError that says which field to set, never with an IndexError."""
    with pytest.raises(ConfigError, match="set ProjectorConfig.layers"):
        ProjectorConfig(kind="sti", vision_layers=4, layers=(8, 17))
    cfg = tiny_config("dci")
    with pytest.raises(ConfigError, match="reads a 27-layer tower but the vision tower has 4 layers"):
        replace(cfg, projector=replace(cfg.projector, vision_layers=27))


# ---------------------------------------------------------------------------------------------------- spatial order


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_keeps_the_image_tokens_spatial_order(kind: str, shapes_float32: Any) -> None:
    """Move one square across the image: the tokens whose projector output changes most (the linear path and, for a
    connector, its branch alone, with random "trained" weights) are the ones at the square's old and new places
    (for STI: inside their pooling windows), so no kind mixes up which token is where (docs/finetune.md, "Projector
    kinds": why above/below stayed at chance)."""
    from dataclasses import replace as replace_config

    from PIL import Image, ImageDraw

    from vlmo.processing import preprocess_images

    vlm = shapes_float32
    patch = vlm.model.cfg.vision.patch_size
    grid = vlm.model.cfg.vision.image_size // patch  # vlmo/shapes: 224 px in 32 px patches, 7×7 tokens
    places = ((1, 1), (5, 4))  # (row, column) of the square's token, before and after the move
    images = []
    for row, col in places:
        image = Image.new("RGB", (224, 224), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([col * patch, row * patch, (col + 1) * patch - 1, (row + 1) * patch - 1],
                                        fill=(250, 250, 250))  # fmt: skip
        images.append(image)
    with torch.no_grad():
        features, hidden = vlm.model.vision(preprocess_images(images, vlm.image_config), output_hidden_states=True)
        base = vlm.model.projector
        parts = {"linear": base.linear if hasattr(base, "linear") else base}
        outputs = {"linear": parts["linear"](features) if kind == "linear" else None}
        if kind != "linear":
            cfg = replace_config(vlm.model.cfg.projector, kind=kind, vision_layers=vlm.model.cfg.vision.num_layers)
            projector = init_from_linear(cfg, base)
            torch.manual_seed(0)
            nn.init.normal_(projector.last_layer().weight, std=0.05)  # a branch that has learned something
            outputs = {"linear": projector.linear(features), "branch": projector.branch(features, hidden)}
    moved = {row * grid + col for row, col in places}
    for name, out in outputs.items():
        assert out is not None
        change = (out[0] - out[1]).norm(dim=-1)  # [N]: how much each token's output changed
        if name == "branch" and kind == "sti":
            # STI pools windows of `pool_stride` row-major tokens (1-D, as the paper): a token's change reaches its
            # whole window and no other token (on a 7×7 grid a window of 8 wraps into the next row).
            stride = projector.cfg.pool_stride
            windows = {t for m in moved for t in range(m // stride * stride, (m // stride + 1) * stride)}
            assert set(change.topk(stride).indices.tolist()) <= windows
        else:  # each token keeps its place: the two tokens the square left and reached change most
            assert set(change.topk(2).indices.tolist()) == moved, f"{kind} {name}: {change.topk(4)}"
