"""M-RoPE positions: golden examples and a plain loop reference (the original Qwen2-VL rule)."""
from __future__ import annotations

import pytest
import torch

from qwen2vl.processor import mrope_positions

IMG, VID, TXT = 151655, 151656, 9


def loop_reference(ids, grids, merge=2):
    """Token by token, as the original get_rope_index: text after a span starts at its max + 1."""
    rows, grid_iter, i, next_pos = [], iter(grids), 0, 0
    while i < len(ids):
        if ids[i] in (IMG, VID):
            t, h, w = next(grid_iter)
            h, w = h // merge, w // merge
            for a in range(t):
                for b in range(h):
                    for c in range(w):
                        rows.append((next_pos + a, next_pos + b, next_pos + c))
            i += t * h * w
            next_pos = max(max(r) for r in rows[-t * h * w:]) + 1
        else:
            rows.append((next_pos,) * 3)
            next_pos += 1
            i += 1
    positions = torch.tensor(rows).T
    return positions, int(positions.max()) + 1 - len(ids)


def test_docstring_example():
    # get_rope_index's docstring: 3 temporal x 2x2 merged patches, then 5 text tokens;
    # Qwen2-VL has no time scaling, so temporal ids step by 1 and text resumes at max + 1 = 3.
    ids = torch.tensor([VID] * 12 + [TXT] * 5)
    positions, delta = mrope_positions(ids, [(3, 4, 4)], (IMG, VID))
    assert positions[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7]
    assert positions[1].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 3, 4, 5, 6, 7]
    assert positions[2].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 3, 4, 5, 6, 7]
    assert delta == 8 - 17


def test_text_only():
    positions, delta = mrope_positions(torch.tensor([TXT] * 6), [], (IMG, VID))
    assert positions.tolist() == [list(range(6))] * 3 and delta == 0


def test_image_between_text():
    ids = [TXT, TXT] + [IMG] * 6 + [TXT] * 3  # grid (1, 4, 6): 2x3 merged tokens
    positions, delta = mrope_positions(torch.tensor(ids), [(1, 4, 6)], (IMG, VID))
    assert positions[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7]
    assert positions[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7]
    assert positions[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]
    assert delta == 8 - 11


@pytest.mark.parametrize(
    "layout",
    [
        [("t", 3), ("i", (1, 2, 2)), ("t", 2), ("i", (1, 6, 4)), ("t", 4)],
        [("i", (1, 8, 2)), ("v", (5, 2, 4)), ("t", 1)],
        [("t", 1), ("v", (2, 6, 6)), ("i", (1, 2, 10)), ("t", 7), ("v", (1, 2, 2))],
    ],
)
def test_matches_loop_reference(layout):
    ids, grids = [], []
    for kind, value in layout:
        if kind == "t":
            ids += [TXT] * value
        else:
            grids.append(value)
            ids += [IMG if kind == "i" else VID] * (value[0] * value[1] * value[2] // 4)
    positions, delta = mrope_positions(torch.tensor(ids), grids, (IMG, VID))
    expected, expected_delta = loop_reference(ids, grids)
    assert torch.equal(positions, expected) and delta == expected_delta


def test_decode_continues_after_prompt():
    ids = [TXT] + [IMG] * 16 + [TXT] * 2  # a 4x4 merged image: extent 4, 16 tokens
    positions, delta = mrope_positions(torch.tensor(ids), [(1, 8, 8)], (IMG, VID))
    assert int(positions.max()) + 1 == len(ids) + delta  # first decode token's position


def test_pad_count_mismatch_raises():
    with pytest.raises(ValueError, match="vision pad tokens"):
        mrope_positions(torch.tensor([IMG] * 3), [(1, 4, 4)], (IMG, VID))
    with pytest.raises(ValueError, match="contiguous"):
        mrope_positions(torch.tensor([IMG, IMG, TXT, IMG, IMG]), [(1, 4, 4)], (IMG, VID))
