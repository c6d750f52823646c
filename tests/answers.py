"""Two raw answers of a model compared: how far apart their grounding boxes are."""
from __future__ import annotations

import math
import re

from qwen2vl.grounding import parse_boxes


def box_gap(answer: str, other: str) -> float:
    """How far apart two raw answers are: 0 if identical, the largest difference between their
    box coordinates (in 1000ths) if they differ in those alone, else infinity."""
    if answer == other:
        return 0.0
    boxes, other_boxes = parse_boxes(answer), parse_boxes(other)
    if not boxes or len(boxes) != len(other_boxes) or re.sub(r"\d", "", answer) != re.sub(r"\d", "", other):
        return math.inf
    return max(abs(getattr(a, edge) - getattr(b, edge)) for a, b in zip(boxes, other_boxes) for edge in ("x1", "y1", "x2", "y2"))
