"""The shapes task: synthetic images and videos with exactly known answers.

Fixed so anyone can regenerate fresh samples from a seed. Images are RGB, width and height
uniform in [112, 336], white, with 1 to 4 shapes (circle, square, triangle pointing up) whose
square bounding boxes (side 28 to 96 pixels) do not overlap, each in one of six colours. Shapes
are listed left to right by the left edge of their box. Seven prompt types:

    shape      "What shape is in the image?"                       -> "circle"
    color      "What color is the shape?"                          -> "red"
    count      "How many shapes are there?"                        -> "3"
    describe   "Describe this image."                              -> "a red circle, a blue square and a green triangle"
    ground     "Where is the red circle?"                          -> "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>"
    compare    two images, "Are the shapes in the two images the same color?"  -> "yes" / "no"
    direction  8 frames of 224x224, one shape moving horizontally  -> "left" / "right"

Box coordinates are normalized to [0, 1000) of the image's width and height, as Qwen2-VL writes
them: `int(x * 1000 / width)` with the right/bottom edge exclusive, at most 999.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "black": (20, 20, 20),
    "purple": (140, 60, 170),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE = 112, 336
MIN_BOX, MAX_BOX = 28, 96
MAX_SHAPES = 4
VIDEO_FRAMES, VIDEO_SIDE = 8, 224
WHITE = (255, 255, 255)
TASKS = ("shape", "color", "count", "describe", "ground", "compare", "direction")
PROMPTS = {
    "shape": "What shape is in the image?",
    "color": "What color is the shape?",
    "count": "How many shapes are there?",
    "describe": "Describe this image.",
    "compare": "Are the shapes in the two images the same color?",
    "direction": "Which direction does the shape move?",
}
GROUND_IOU = 0.5


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    color: str
    x: int  # left edge of the bounding box, pixels
    y: int  # top edge
    size: int  # side of the square bounding box

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) in pixels, right/bottom edges exclusive."""
        return self.x, self.y, self.x + self.size, self.y + self.size

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class Sample:
    """One question with its media and exact answer. `messages` holds PIL images / frame lists."""

    task: str
    messages: list[dict]
    answer: str
    box: tuple[int, int, int, int] | None = None  # normalized true box of a `ground` answer
    shapes: list[Shape] = field(default_factory=list)


def draw(shapes: list[Shape], width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), WHITE)
    canvas = ImageDraw.Draw(image)
    for shape in shapes:
        x1, y1, x2, y2 = shape.box
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            canvas.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape.kind == "square":
            canvas.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            canvas.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return image


def left_to_right(shapes: list[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: (s.x, s.y))


def describe(shapes: list[Shape]) -> str:
    names = [f"a {shape.name}" for shape in left_to_right(shapes)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def normalized_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    scale = lambda v, size: min(999, v * 1000 // size)  # noqa: E731
    return scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)


def ground_answer(name: str, box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = box
    return (f"<|object_ref_start|>the {name}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def random_layout(rng: random.Random, count: int, width: int, height: int) -> list[Shape]:
    """`count` shapes with non-overlapping boxes inside the image (resampled until they fit)."""
    while True:
        shapes: list[Shape] = []
        for _ in range(count):
            size = rng.randint(MIN_BOX, min(MAX_BOX, width, height))
            kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            for _ in range(50):
                shape = Shape(kind, color, rng.randint(0, width - size), rng.randint(0, height - size), size)
                if not any(_overlaps(shape.box, other.box) for other in shapes):
                    shapes.append(shape)
                    break
            else:
                break
        if len(shapes) == count:
            return shapes


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)


def _user(*content: dict) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def make_sample(task: str, rng: random.Random) -> Sample:
    """One fresh sample of `task`, drawn from `rng`."""
    if task in ("shape", "color", "count", "describe", "ground"):
        width, height = _canvas_size(rng)
        count = 1 if task in ("shape", "color") else rng.randint(1, MAX_SHAPES)
        shapes = random_layout(rng, count, width, height)
        image = {"type": "image", "image": draw(shapes, width, height)}
        if task == "ground":
            names = [shape.name for shape in shapes]
            target = rng.choice([shape for shape in shapes if names.count(shape.name) == 1] or [None])
            if target is None:  # every colour+shape repeats: draw again
                return make_sample(task, rng)
            box = normalized_box(target.box, width, height)
            return Sample(task, _user(image, _text(f"Where is the {target.name}?")),
                          ground_answer(target.name, box), box, shapes)
        answer = {"shape": lambda: shapes[0].kind, "color": lambda: shapes[0].color,
                  "count": lambda: str(len(shapes)), "describe": lambda: describe(shapes)}[task]()
        return Sample(task, _user(image, _text(PROMPTS[task])), answer, shapes=shapes)
    if task == "compare":
        same = rng.random() < 0.5
        first_color = rng.choice(list(COLORS))
        second_color = first_color if same else rng.choice([c for c in COLORS if c != first_color])
        images, shapes = [], []
        for color in (first_color, second_color):
            width, height = _canvas_size(rng)
            shape = random_layout(rng, 1, width, height)[0]
            shape = Shape(shape.kind, color, shape.x, shape.y, shape.size)
            images.append({"type": "image", "image": draw([shape], width, height)})
            shapes.append(shape)
        return Sample(task, _user(*images, _text(PROMPTS[task])), "yes" if same else "no", shapes=shapes)
    if task == "direction":
        return _direction_sample(rng)
    raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")


def _direction_sample(rng: random.Random) -> Sample:
    size = rng.randint(MIN_BOX, MAX_BOX)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    y = rng.randint(0, VIDEO_SIDE - size)
    travel = rng.randint(VIDEO_SIDE // 3, VIDEO_SIDE - size)  # left edge moves this far in total
    start = rng.randint(0, VIDEO_SIDE - size - travel)
    right = rng.random() < 0.5
    xs = [start + round(travel * i / (VIDEO_FRAMES - 1)) for i in range(VIDEO_FRAMES)]
    if not right:
        xs.reverse()
    frames = [draw([Shape(kind, color, x, y, size)], VIDEO_SIDE, VIDEO_SIDE) for x in xs]
    video = {"type": "video", "video": frames}
    return Sample("direction", _user(video, _text(PROMPTS["direction"])), "right" if right else "left",
                  shapes=[Shape(kind, color, xs[0], y, size)])


def make_samples(n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Sample]:
    """`n` samples per task, deterministic given `seed` (tasks interleaved)."""
    rng = random.Random(seed)
    return [make_sample(task, rng) for _ in range(n) for task in tasks]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def is_correct(sample: Sample, raw_text: str) -> bool:
    """Whether an answer (decoded with special tokens kept) is right: exact text, or for `ground`
    a box of IoU >= 0.5 with the true box."""
    if sample.task != "ground":
        return raw_text.replace("<|im_end|>", "").strip().lower() == sample.answer
    from qwen2vl.grounding import parse_boxes

    boxes = parse_boxes(raw_text)
    return len(boxes) == 1 and iou((boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2), sample.box) >= GROUND_IOU
