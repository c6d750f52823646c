"""Qwen2-VL grounding: boxes the model writes as text, mapped back onto the image.

The model answers a "where is ..." question with
`<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
coordinates normalized to [0, 1000) of the image's width and height (so the same numbers hold for
the original and the resized image). A reference may carry several boxes, and a box may come
without a reference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

NORMALIZED_RANGE = 1000

_REF_OR_BOX = re.compile(
    r"<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>"
    r"|<\|box_start\|>\s*\(\s*(?P<x1>-?\d+(?:\.\d+)?)\s*,\s*(?P<y1>-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(?P<x2>-?\d+(?:\.\d+)?)\s*,\s*(?P<y2>-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>",
    re.S,
)


@dataclass(frozen=True)
class Box:
    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float

    def scaled(self, width: int, height: int) -> "Box":
        """This box (normalized to [0, 1000)) in pixels of a `width` x `height` image."""
        sx, sy = width / NORMALIZED_RANGE, height / NORMALIZED_RANGE
        return Box(self.label, self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)


def parse_boxes(text: str) -> list[Box]:
    """Every box in `text` (decoded with special tokens kept), in normalized coordinates.

    A box takes the label of the nearest object reference before it.
    """
    boxes, label = [], None
    for match in _REF_OR_BOX.finditer(text):
        if match["label"] is not None:
            label = match["label"].strip()
            continue
        x1, y1, x2, y2 = (float(match[k]) for k in ("x1", "y1", "x2", "y2"))
        boxes.append(Box(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def draw_boxes(image: Image.Image, boxes: list[Box], color: str = "red") -> Image.Image:
    """A copy of `image` with `boxes` (already in its pixels) drawn and labelled."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 150))
    for box in boxes:
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=color, width=width)
        if box.label:
            draw.text((box.x1 + width, max(0, box.y1 - 12)), box.label, fill=color)
    return canvas
