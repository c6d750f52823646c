"""Grounding: the boxes and points a model writes as text, mapped back onto the image.

Each architecture of the family writes them its own way (`grounding_format`, by config.json
`model_type`, the one place that decides it):

- Qwen2-VL (`qwen2_vl`): special tokens,
  `<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
  coordinates normalized to [0, 1000) of the image's width and height (the same numbers for the
  original and the resized image). A reference may carry several boxes; a box may come without one.
- Qwen2.5-VL (`qwen2_5_vl`): JSON, `{"bbox_2d": [x1, y1, x2, y2], "label": "..."}` and
  `{"point_2d": [x, y], "label": "..."}`, in absolute pixels of the *resized* image the model saw
  (the processor's `smart_resize`, recorded per image as `VisionItem.resized_size`).
- Qwen3-VL (`qwen3_vl`, `qwen3_vl_moe`): the same JSON, in [0, 1000) of the image.

JSON answers come as a list or a single object, often in a ```json fence, sometimes cut short
or followed by prose: every well-formed object with a valid `bbox_2d` or `point_2d` is read, in
order, and anything else is skipped; no model text raises.

No format names the image a box refers to: with several images, it is the last one of the prompt
(the one a grounding question follows), unless the caller picks another.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

NORMALIZED_RANGE = 1000


@dataclass(frozen=True)
class GroundingFormat:
    """How one architecture writes boxes: `syntax` "tokens" (Qwen2-VL's special tokens) or "json"
    (`bbox_2d` / `point_2d` objects); `frame` "normalized" ([0, 1000) of the image) or "resized"
    (pixels of the resized image the model saw)."""

    syntax: str
    frame: str


GROUNDING_FORMATS = {
    "qwen2_vl": GroundingFormat("tokens", "normalized"),
    "qwen2_5_vl": GroundingFormat("json", "resized"),
    "qwen3_vl": GroundingFormat("json", "normalized"),
    "qwen3_vl_moe": GroundingFormat("json", "normalized"),
}


def grounding_format(model_type: str) -> GroundingFormat:
    """How the architecture `model_type` (config.json) writes boxes and points."""
    if model_type not in GROUNDING_FORMATS:
        raise ValueError(f"model_type {model_type!r}: no grounding format known "
                         f"(known: {', '.join(GROUNDING_FORMATS)})")
    return GROUNDING_FORMATS[model_type]


def _scale(width: float, height: float, frame: tuple[float, float]) -> tuple[float, float]:
    return width / frame[0], height / frame[1]


@dataclass(frozen=True)
class Box:
    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float

    def scaled(self, width: float, height: float,
               frame: tuple[float, float] = (NORMALIZED_RANGE, NORMALIZED_RANGE)) -> "Box":
        """This box, given in a `frame` = (width, height) coordinate range ([0, 1000) unless
        given), in pixels of a `width` x `height` image."""
        sx, sy = _scale(width, height, frame)
        return Box(self.label, self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy)


@dataclass(frozen=True)
class Point:
    label: str | None
    x: float
    y: float

    def scaled(self, width: float, height: float,
               frame: tuple[float, float] = (NORMALIZED_RANGE, NORMALIZED_RANGE)) -> "Point":
        """This point, given in a `frame` = (width, height) coordinate range ([0, 1000) unless
        given), in pixels of a `width` x `height` image."""
        sx, sy = _scale(width, height, frame)
        return Point(self.label, self.x * sx, self.y * sy)


Mark = Box | Point

_REF_OR_BOX = re.compile(
    r"<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>"
    r"|<\|box_start\|>\s*\(\s*(?P<x1>-?\d+(?:\.\d+)?)\s*,\s*(?P<y1>-?\d+(?:\.\d+)?)\s*\)\s*,\s*"
    r"\(\s*(?P<x2>-?\d+(?:\.\d+)?)\s*,\s*(?P<y2>-?\d+(?:\.\d+)?)\s*\)\s*<\|box_end\|>",
    re.S,
)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


# As JSON.parse reads numbers (the chat page's): every number a float (one too large is infinite,
# and refused as a coordinate), NaN and Infinity not JSON.
_JSON = json.JSONDecoder(parse_int=float, parse_constant=_not_json)


def parse_boxes(text: str, model_type: str = "qwen2_vl") -> list[Mark]:
    """Every box (and, in the JSON formats, point) of `text` in the order written, in the model's
    own coordinates (`grounding_format(model_type).frame`). `text` is decoded with special tokens
    kept (Qwen2-VL's boxes are special tokens)."""
    if grounding_format(model_type).syntax == "tokens":
        return _token_boxes(text)
    return _json_marks(text)


def _token_boxes(text: str) -> list[Box]:
    """Qwen2-VL's boxes; a box takes the label of the nearest object reference before it."""
    boxes, label = [], None
    for match in _REF_OR_BOX.finditer(text):
        if match["label"] is not None:
            label = match["label"].strip()
            continue
        x1, y1, x2, y2 = (float(match[k]) for k in ("x1", "y1", "x2", "y2"))
        boxes.append(Box(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def _json_marks(text: str) -> list[Mark]:
    """Every JSON object of `text` that is a box or a point. An object that does not parse (cut
    short) or is neither is skipped, and the objects inside it are still looked at."""
    marks = []
    start = text.find("{")
    while start != -1:
        try:
            value, end = _JSON.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        mark = _mark(value) if isinstance(value, dict) else None
        if mark is not None:
            marks.append(mark)
            start = text.find("{", end)
        else:
            start = text.find("{", start + 1)
    return marks


def _numbers(value, count: int) -> list[float] | None:
    """`value` as `count` finite numbers, or None."""
    if not isinstance(value, list) or len(value) != count:
        return None
    if not all(isinstance(v, float) and math.isfinite(v) for v in value):
        return None
    return value


def _mark(obj: dict) -> Mark | None:
    label = obj.get("label")
    label = label.strip() if isinstance(label, str) else None
    box = _numbers(obj.get("bbox_2d"), 4)
    if box is not None:
        x1, y1, x2, y2 = box
        return Box(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    point = _numbers(obj.get("point_2d"), 2)
    if point is not None:
        return Point(label, *point)
    return None


def to_image(marks: list[Mark], model_type: str, size: tuple[int, int],
             resized_size: tuple[int, int] | None) -> list[Mark]:
    """`marks` (as `parse_boxes` reads them) in pixels of the original image, `size` = (width,
    height); `resized_size` is what the processor resized it to (needed by the "resized" frame)."""
    frame = grounding_format(model_type).frame
    if frame == "resized":
        if resized_size is None:
            raise ValueError(f"model_type {model_type!r} writes boxes in pixels of the resized image: "
                             "its resized size is needed to map them onto the original")
        return [mark.scaled(*size, frame=resized_size) for mark in marks]
    return [mark.scaled(*size) for mark in marks]


def grounding_header(model_type: str, sizes: list[tuple[int, int]],
                     resized_sizes: list[tuple[int, int]]) -> str:
    """What a client needs to place an answer's boxes, as one line of JSON (the server's
    `X-Grounding` response header): the format, and each image's (width, height) as sent and as
    the model saw it."""
    fmt = grounding_format(model_type)
    images = [{"width": w, "height": h, "resized_width": rw, "resized_height": rh}
              for (w, h), (rw, rh) in zip(sizes, resized_sizes)]
    return json.dumps({"syntax": fmt.syntax, "frame": fmt.frame, "images": images}, separators=(",", ":"))


def draw_boxes(image: Image.Image, boxes: list[Mark], color: str = "red") -> Image.Image:
    """A copy of `image` with `boxes` (boxes and points, already in its pixels) drawn and labelled."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 150))
    for mark in boxes:
        if isinstance(mark, Point):
            radius = 3 * width
            draw.ellipse((mark.x - radius, mark.y - radius, mark.x + radius, mark.y + radius), outline=color, width=width)
            corner = (mark.x + radius, mark.y - radius)
        else:
            draw.rectangle((mark.x1, mark.y1, mark.x2, mark.y2), outline=color, width=width)
            corner = (mark.x1, mark.y1)
        if mark.label:
            draw.text((corner[0] + width, max(0, corner[1] - 12)), mark.label, fill=color)
    return canvas
