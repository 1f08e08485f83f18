"""The shapes world: seeded scenes of 1–3 coloured shapes on a light background, and every task about them.

    scene = make_scene(seed=0, index=7)          # a Scene: size, background, shapes (left to right), noise
    image = render(scene)                         # PIL RGB image
    for ex in task_examples(scene): ...           # TaskExample(kind, prefix, suffix), every question of the scene

Rules (a scene never breaks them; tests check each):
- image: `width`×`height` RGB (224×224 unless asked otherwise), one light background colour (each channel
  200–255), optional mild Gaussian noise (σ ≤ 4) and 2× supersampled antialiasing.
- 1–3 shapes, each a `circle`, an axis-aligned `square` or an upright isosceles `triangle` (apex at the top
  centre of its box, base along the bottom), coloured `red`, `green`, `blue` or `yellow`, each channel of the
  base colour drifting by up to ±30.
- each shape's box is a square whose side is 20–45 % of the image's shorter side, fully inside the image; boxes
  are at least 2 px apart (no overlap) and their centres at least 5 % of the width apart horizontally, so "left to
  right" is well defined.
- boxes are `(x_min, y_min, x_max, y_max)` in pixels with edges between pixels (0 = left edge of the first pixel):
  the shape covers exactly the pixels of its box.

Tasks and targets (`task_examples`), PaliGemma's prompt syntax:
- `caption en` → shapes left to right by box centre: `a red circle`, `a red circle and a blue square`,
  `a red circle, a blue square and a green triangle`;
- `answer en how many shapes are there?` → `1` / `2` / `3`;
- `answer en what color is the {shape}?` → the colour word, asked only when exactly one such shape exists;
- `answer en is there a {color} {shape}?` → `yes` / `no`;
- `detect {shape}`, `detect {shape} ; {shape}` and `detect {shape} ; {shape} ; {shape}` (every order) →
  PaliGemma's detection text (`vlmo.detection.encode_boxes`), one entry per instance of the named kinds, left to
  right by box centre whatever the prompt's order, empty when there is none.

Everything is a pure function of its seed: `make_scene(seed, index)` draws from `random.Random(f"{seed}:{index}")`
(string seeds hash the same on every platform and Python version).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image, ImageDraw

from vlmo.data.examples import Example
from vlmo.detection import ParsedObject, box_to_bins, encode_boxes, format_objects

ShapeKind = Literal["circle", "square", "triangle"]
TaskKind = Literal["caption", "count", "color", "exists", "detect", "segment"]
RGB = tuple[int, int, int]

SHAPES: tuple[ShapeKind, ...] = ("circle", "square", "triangle")
COLORS: dict[str, RGB] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 205, 40)}
TASKS: tuple[TaskKind, ...] = ("caption", "count", "color", "exists", "detect")

SHADE_DRIFT = 30  # each channel of a shape's colour: base ± this
BACKGROUND_MIN = 200  # each background channel: 200–255 ("light")
SIZE_RANGE = (0.20, 0.45)  # box side as a fraction of the shorter image side
BOX_GAP = 2  # px between boxes, at least
CENTRE_GAP = 0.05  # horizontal distance between box centres, as a fraction of the width, at least
MAX_NOISE = 4.0  # σ of the Gaussian pixel noise, at most
SUPERSAMPLE = 2  # antialiasing: draw at 2× and reduce

COUNT_QUESTION = "how many shapes are there?"
# The words the demo tokenizer merges into single pieces (prompts and answers tokenize to few ids).
VOCABULARY: tuple[str, ...] = (
    "caption", "answer", "detect", "en", "how", "many", "shapes", "are", "there", "what", "color", "is", "the", "a",
    "and", "yes", "no", *SHAPES, *COLORS,
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    kind: ShapeKind
    color: str  # a key of COLORS
    rgb: RGB  # the drawn colour (the base colour with drift)
    box: tuple[int, int, int, int]  # x_min, y_min, x_max, y_max in pixels (edges), x_max - x_min == y_max - y_min

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: RGB
    shapes: tuple[Shape, ...]  # left to right by box centre
    noise: float  # σ of the pixel noise (0: none)
    noise_seed: int
    antialias: bool = True


# -- scenes ------------------------------------------------------------------------------------------------------


def make_scene(
    seed: int | str, index: int, size: tuple[int, int] | None = (224, 224), num_shapes: int | None = None
) -> Scene:
    """Scene `index` of the stream `seed`. `size`: (width, height), or None for a random size (`random_size`)."""
    rng = random.Random(f"{seed}:{index}")
    width, height = random_size(rng) if size is None else size
    return draw_scene(rng, width, height, num_shapes)


def example_scene() -> Scene:
    """The scene of `examples/shapes.png` (224×224): a yellow circle, a red square and a blue triangle.

    Scene 7129 of the stream "example": the first with those three, left to right, on which the shipped model
    answers the README's questions right, every box of `detect circle ; square ; triangle` and every mask of
    `segment circle ; square` fits with IoU ≥ 0.8, and int8 and float32 give the same boxes, so the README's numbers
    hold whichever int8 kernels a CPU has (docs/demo-model.md says why scenes 0 and 4393, the pictures before, are
    no longer the example)."""
    return make_scene("example", 7129, num_shapes=3)


def random_size(rng: random.Random, square: float = 0.5) -> tuple[int, int]:
    """224×224 with probability `square`, otherwise each side 160–400 px independently (aspect ratios up to 2.5)."""
    if rng.random() < square:
        return 224, 224
    return rng.randint(160, 400), rng.randint(160, 400)


def draw_scene(rng: random.Random, width: int, height: int, num_shapes: int | None = None) -> Scene:
    """A scene drawn from `rng` by the module's rules. Placement is rejection sampling: retry on a clash."""
    if min(width, height) < 32:
        raise ValueError(f"images must be at least 32 px on each side, got {width}x{height}")
    n = rng.randint(1, 3) if num_shapes is None else num_shapes
    if not 1 <= n <= 3:
        raise ValueError(f"a scene has 1 to 3 shapes, not {n}")
    red, green, blue = (rng.randint(BACKGROUND_MIN, 255) for _ in range(3))
    while True:
        shapes = _place(rng, width, height, n)
        if shapes is not None:
            break
    noise = rng.uniform(0.0, MAX_NOISE) if rng.random() < 0.5 else 0.0
    return Scene(width, height, (red, green, blue), shapes, noise, rng.getrandbits(62))


def _place(rng: random.Random, width: int, height: int, n: int) -> tuple[Shape, ...] | None:
    short = min(width, height)
    lo, hi = (max(1, round(f * short)) for f in SIZE_RANGE)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        side = rng.randint(lo, hi)
        for _attempt in range(50):
            x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, other, width) for other in boxes):
                boxes.append(box)
                break
        else:
            return None  # no room left for this size: start the scene's layout again
    shapes = [Shape(kind, color, _shade(rng, color), box) for box in boxes for kind, color in [_kind_color(rng)]]
    return tuple(sorted(shapes, key=lambda s: s.centre_x))


def _kind_color(rng: random.Random) -> tuple[ShapeKind, str]:
    return rng.choice(SHAPES), rng.choice(list(COLORS))


def _shade(rng: random.Random, color: str) -> RGB:
    red, green, blue = (min(255, max(0, c + rng.randint(-SHADE_DRIFT, SHADE_DRIFT))) for c in COLORS[color])
    return red, green, blue


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], width: int) -> bool:
    separated = a[2] + BOX_GAP <= b[0] or b[2] + BOX_GAP <= a[0] or a[3] + BOX_GAP <= b[1] or b[3] + BOX_GAP <= a[1]
    return separated and abs((a[0] + a[2]) - (b[0] + b[2])) / 2 >= CENTRE_GAP * width


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.width`×`scene.height`."""
    k = SUPERSAMPLE if scene.antialias else 1
    image = Image.new("RGB", (scene.width * k, scene.height * k), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = (v * k for v in shape.box)
        _draw_shape(draw, shape.kind, (x0, y0, x1, y1), shape.rgb)
    if k > 1:
        image = image.reduce(k)
    if scene.noise > 0:
        g = torch.Generator().manual_seed(scene.noise_seed)
        buffer = bytearray(image.tobytes())
        pixels = torch.frombuffer(buffer, dtype=torch.uint8)  # shares `buffer`'s memory: written back in place
        noisy = pixels.float() + torch.randn(pixels.shape, generator=g) * scene.noise
        pixels.copy_(noisy.round().clamp(0, 255).to(torch.uint8))
        image = Image.frombytes("RGB", image.size, bytes(buffer))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: RGB | int) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=fill)


# Classes of `patch_targets`: 0 is the background, then one per (colour, kind) pair.
PATCH_CLASSES: tuple[str, ...] = ("background", *(f"{c} {k}" for c in COLORS for k in SHAPES))


def label_map(scene: Scene) -> Image.Image:
    """A `scene.width`×`scene.height` "L" image whose pixels are `PATCH_CLASSES` indices: 0 for the background,
    `1 + 3·colour + kind` where a shape is (the same geometry as `render`, without antialiasing)."""
    image = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        _draw_shape(draw, s.kind, s.box, PATCH_CLASSES.index(f"{s.color} {s.kind}"))
    return image


def patch_targets(scene: Scene, image_size: int, patch_size: int) -> torch.Tensor:
    """float32[grid², len(PATCH_CLASSES)], row-major patches of the model's `image_size`² input: the fraction of
    each patch that each class covers, after the same squash to a square as the image processor's resize (nearest
    neighbour). The vision pre-training stage of `vlmo.demo.train` learns these."""
    size = image_size // patch_size * patch_size  # the patch convolution drops a remainder
    labels = label_map(scene).resize((image_size, image_size), Image.Resampling.NEAREST).crop((0, 0, size, size))
    ids = torch.frombuffer(bytearray(labels.tobytes()), dtype=torch.uint8).long()
    grid = size // patch_size
    one_hot = torch.nn.functional.one_hot(ids, len(PATCH_CLASSES)).float()
    return one_hot.view(grid, patch_size, grid, patch_size, -1).mean((1, 3)).reshape(grid * grid, -1)


def shape_mask(scene: Scene, shape: Shape) -> torch.Tensor:
    """bool[H, W]: the pixels `shape` covers in `scene` (the geometry of `render`, without antialiasing), the
    ground truth of `segment`."""
    image = Image.new("L", (scene.width, scene.height), 0)
    _draw_shape(ImageDraw.Draw(image), shape.kind, shape.box, 1)
    return _bool_pixels(image)


def box_mask(kind: str, side: int, pad: int = 0) -> torch.Tensor:
    """bool[side + 2·pad, side + 2·pad]: a `kind` drawn in the box (pad, pad, pad + side, pad + side). Drawing is
    the same at any integer offset, so with pad 0 this is `shape_mask` cropped to the shape's box."""
    image = Image.new("L", (side + 2 * pad, side + 2 * pad), 0)
    _draw_shape(ImageDraw.Draw(image), kind, (pad, pad, pad + side, pad + side), 1)
    return _bool_pixels(image)


def _bool_pixels(image: Image.Image) -> torch.Tensor:
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width) > 0


# -- tasks -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskExample:
    kind: TaskKind
    prefix: str  # the prompt, PaliGemma task syntax
    suffix: str  # the exact target


def caption(scene: Scene) -> str:
    """`a red circle`, `a red circle and a blue square`, `a red circle, a blue square and a green triangle`."""
    parts = [f"a {s.color} {s.kind}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def detect_target(scene: Scene, kinds: Sequence[str]) -> str:
    """The detection text for `detect k1 ; k2`: every instance of the named kinds, left to right ("" for none)."""
    found = [s for s in scene.shapes if s.kind in kinds]
    return encode_boxes([s.box for s in found], [s.kind for s in found], (scene.width, scene.height))


MaskCodes = Callable[[Shape], Sequence[int]]  # a shape's 16 `<seg>` codes (`vlmo.demo.masks.ShapeCodes`)


def segment_target(scene: Scene, kinds: Sequence[str], codes: MaskCodes) -> str:
    """The segmentation text for `segment k1 ; k2`: per instance of the named kinds, left to right, its 4 `<loc>`
    tokens, its 16 `<seg>` codes and its kind (PaliGemma's order); "" when there is none."""
    size = (scene.width, scene.height)
    found = [s for s in scene.shapes if s.kind in kinds]
    return format_objects(ParsedObject(box_to_bins(s.box, size), tuple(codes(s)), s.kind) for s in found)


def task_examples(scene: Scene, codes: MaskCodes | None = None) -> list[TaskExample]:
    """Every question the world defines for `scene`, with its exact target; `segment` prompts too when `codes`
    gives the shapes' mask codes."""
    kinds = [s.kind for s in scene.shapes]
    out = [
        TaskExample("caption", "caption en", caption(scene)),
        TaskExample("count", f"answer en {COUNT_QUESTION}", str(len(scene.shapes))),
    ]
    for kind in SHAPES:
        if kinds.count(kind) == 1:
            color = next(s.color for s in scene.shapes if s.kind == kind)
            out.append(TaskExample("color", f"answer en what color is the {kind}?", color))
    present = {(s.color, s.kind) for s in scene.shapes}
    for color in COLORS:
        for kind in SHAPES:
            answer = "yes" if (color, kind) in present else "no"
            out.append(TaskExample("exists", f"answer en is there a {color} {kind}?", answer))
    for named in kind_prompts():
        out.append(TaskExample("detect", "detect " + " ; ".join(named), detect_target(scene, named)))
    if codes is not None:
        for named in kind_prompts():
            out.append(TaskExample("segment", "segment " + " ; ".join(named), segment_target(scene, named, codes)))
    return out


def kind_prompts() -> list[tuple[str, ...]]:
    """The kinds a `detect` or `segment` prompt names: one, two or all three, in every order (15 prompts)."""
    return [named for n in (1, 2, 3) for named in itertools.permutations(SHAPES, n)]


def detect_kinds(example: TaskExample) -> list[str]:
    """The kinds a `detect` or `segment` prompt names, in its order: `detect circle ; square` → ["circle", "square"]."""
    return [k.strip() for k in example.prefix.split(" ", 1)[1].split(";")]


# How often each task is drawn for training. Detection is the hardest (four exact loc tokens per object).
TRAIN_MIX: dict[TaskKind, float] = {"caption": 0.2, "count": 0.1, "color": 0.1, "exists": 0.15, "detect": 0.45}


# The last training stage's mix: the two hardest tasks (yes/no, with hard negatives, and detection), and enough of
# the others to keep them.
FOCUS_MIX: dict[TaskKind, float] = {"caption": 0.1, "count": 0.05, "color": 0.05, "exists": 0.35, "detect": 0.45}

# The detection stage's mix: mostly boxes, with enough of every other task to keep (and finish) it.
DETECT_MIX: dict[TaskKind, float] = {"caption": 0.15, "count": 0.05, "color": 0.05, "exists": 0.15, "detect": 0.6}

# The segmentation stage's mix: masks most, boxes still often (they are the masks' frame), the rest kept up.
SEGMENT_MIX: dict[TaskKind, float] = {
    "caption": 0.1, "count": 0.05, "color": 0.05, "exists": 0.1, "detect": 0.3, "segment": 0.4,
}  # fmt: skip

# The last stage's mix: every task at a low rate, captions and yes/no more often than in the segmentation stage (which
# cost captions half a point), masks and boxes still most.
BLEND_MIX: dict[TaskKind, float] = {
    "caption": 0.2, "count": 0.05, "color": 0.05, "exists": 0.15, "detect": 0.25, "segment": 0.3,
}  # fmt: skip

# How many kinds a sampled `detect` prompt names (1, 2, 3): stages 2 and 3 taught one or two, the detection stage
# all three equally.
PAIRS_ONLY: tuple[float, float, float] = (2 / 3, 1 / 3, 0.0)
ANY_KINDS: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)


def sample_task(
    scene: Scene,
    rng: random.Random,
    mix: dict[TaskKind, float] = TRAIN_MIX,
    hard_negatives: float = 0.0,
    kinds_weights: tuple[float, float, float] = PAIRS_ONLY,
    codes: MaskCodes | None = None,
) -> TaskExample:
    """One question about `scene`: a task kind by `mix`, then a question of that kind uniformly, except that
    `exists` questions are yes or no with equal odds and a `detect` or `segment` prompt names 1, 2 or 3 kinds with
    the odds `kinds_weights` (then any order uniformly). A mix with `segment` needs `codes` (`task_examples`).

    `hard_negatives`: the probability that a "no" question names a colour or a kind that *is* in the scene (a red
    square asked of a scene with a red circle and a blue square), which a model cannot answer without binding the
    colour to the kind. Drawn uniformly, most "no" questions name neither, and a model that checks the kind alone
    still answers 85 % of them right."""
    if mix.get("segment") and codes is None:
        raise ValueError("a mix with segment needs the shapes' mask codes (codes=…)")
    by_kind: dict[str, list[TaskExample]] = {}
    for ex in task_examples(scene, codes):
        by_kind.setdefault(ex.kind, []).append(ex)
    kinds = [k for k in mix if k in by_kind]
    kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
    pool = by_kind[kind]
    if kind == "exists":
        want = rng.choice(("yes", "no"))
        pool = [ex for ex in pool if ex.suffix == want] or pool
        if want == "no" and hard_negatives > 0 and rng.random() < hard_negatives:
            present = {s.color for s in scene.shapes} | {s.kind for s in scene.shapes}
            pool = [ex for ex in pool if set(ex.prefix.removesuffix("?").split()[-2:]) & present] or pool
    elif kind in ("detect", "segment"):
        # One uniform draw against the cumulative odds: with PAIRS_ONLY this is the draw stages 2 and 3 were
        # trained with, so the recipe still reproduces them.
        draw, named = rng.random(), 1
        for weight in itertools.accumulate(kinds_weights[:-1]):
            named += draw >= weight
        pool = [ex for ex in pool if len(detect_kinds(ex)) == named]
    return rng.choice(pool)


class ShapesDataset:
    """Training data drawn on the fly: `get(index, epoch)` renders a fresh scene and one question from
    (stream, seed, epoch, index), so no two epochs repeat and a resumed run sees the same data. `1 - square` of the
    scenes (a third by default) have a random size (`random_size`), so the model also learns squashed, non-square
    inputs. `mix`, `hard_negatives` and `kinds_weights` go to `sample_task`; each training stage uses its own
    `stream`. `codes`: the shapes' mask codes, the `segment` targets (`vlmo.demo.masks.ShapeCodes`).
    """

    def __init__(
        self,
        seed: int | str,
        length: int = 1_000_000,
        mix: dict[TaskKind, float] = TRAIN_MIX,
        hard_negatives: float = 0.0,
        stream: str = "train",
        kinds_weights: tuple[float, float, float] = PAIRS_ONLY,
        square: float = 2 / 3,
        codes: MaskCodes | None = None,
    ) -> None:
        self.seed, self.length, self.mix, self.hard_negatives, self.stream = seed, length, mix, hard_negatives, stream
        self.kinds_weights, self.square, self.codes = kinds_weights, square, codes

    def __len__(self) -> int:
        return self.length

    def get(self, index: int, epoch: int) -> Example:
        rng = random.Random(f"{self.stream}:{self.seed}:{epoch}:{index}")
        width, height = random_size(rng, square=self.square)
        scene = draw_scene(rng, width, height)
        task = sample_task(scene, rng, self.mix, self.hard_negatives, self.kinds_weights, self.codes)
        return Example(render(scene), task.prefix, task.suffix)
