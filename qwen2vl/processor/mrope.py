"""M-RoPE positions of a prompt: three position ids (temporal, height, width) per token.

Text tokens have t = h = w = their running index. A vision span of grid (t, h, w) patches, i.e.
(t, h/m, w/m) merged tokens, gets its own grid coordinates offset by the running index at the span
start; the text after it resumes at the largest position in the span plus one. `rope_delta` =
max position + 1 - length, so decode step i after a prompt of length L sits at position
L + i + rope_delta on all three axes.

transformers 5.17 resumes text after a span at start + max(h, w)/m, ignoring t; that equals
max + 1 except for videos with more temporal than spatial merged tokens, where we keep the
original Qwen2-VL rule (the one the model was trained with and the one in get_rope_index's
docstring example).

Qwen2.5-VL aligns a video's temporal positions to time: temporal patch i sits at
floor(i x second_per_grid_t x tokens_per_second) (`time_steps`), as its reference implementation
and vLLM compute it. transformers 5.17 differs there in two ways we do not follow: it truncates
second_per_grid_t to an integer first (a video sampled at 4 fps, 0.5 s per temporal patch, would
get no temporal positions at all), and it resumes text at start + max(h, w)/m as above. Both agree
with this rule where second_per_grid_t is whole and the video's temporal extent is not over its
spatial one.

Qwen3-VL has no time-aligned positions: its video prompt gives each temporal patch its own
`<t seconds><|vision_start|>...<|vision_end|>`, and the processor hands each of those runs of pads
here as an item of grid (1, h, w), as Qwen3-VL's get_rope_index splits `video_grid_thw`; with t = 1
transformers' resume rule is this one.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def mrope_positions(
    input_ids: torch.Tensor,
    vision_grids: Sequence[tuple[int, int, int]],
    pad_token_ids: Collection[int],
    merge_size: int = 2,
    time_steps: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """(`positions[3, L]` int64, `rope_delta`) for one prompt.

    `input_ids` is `[L]` with every vision item's pads expanded; `vision_grids` are the items'
    `(t, h, w)` patch grids in prompt order; `pad_token_ids` are the ids that stand for vision
    embeddings (image and video pads). Each item's pads must be one contiguous run.
    `time_steps[i]`: how far item i's temporal position advances per temporal patch (default 1).
    """
    input_ids = torch.as_tensor(input_ids).long().cpu()
    length = input_ids.numel()
    index = torch.arange(length)
    if not vision_grids:
        return index.expand(3, length).clone(), 0

    grids = torch.tensor(vision_grids, dtype=torch.long).view(-1, 3)
    merged = torch.stack([grids[:, 0], grids[:, 1] // merge_size, grids[:, 2] // merge_size], dim=1)
    counts = merged.prod(dim=1)
    pad_index = torch.nonzero(torch.isin(input_ids, torch.tensor(list(pad_token_ids))), as_tuple=True)[0]
    if pad_index.numel() != int(counts.sum()):
        raise ValueError(f"prompt has {pad_index.numel()} vision pad tokens, the grids need {int(counts.sum())}")
    first = torch.cumsum(counts, 0) - counts
    starts, ends = pad_index[first], pad_index[first + counts - 1]
    if not torch.equal(ends - starts + 1, counts):
        raise ValueError("each vision item's pad tokens must be one contiguous run")

    steps = [1.0] * len(grids) if time_steps is None else list(time_steps)
    times = [_temporal_coordinates(int(t), step) for t, step in zip(merged[:, 0], steps)]
    # Positions after a span move by (its extent - its length); text positions are index + shifts so far.
    extents = torch.stack([torch.maximum(time[-1], item[1:].max() - 1) + 1 for time, item in zip(times, merged)])
    shift = torch.zeros(length + 1, dtype=torch.long)
    shift.index_add_(0, ends + 1, extents - counts)
    text_positions = index + torch.cumsum(shift, 0)[:length]
    positions = text_positions.expand(3, length).clone()

    span_bases = text_positions[starts]
    coords = [_grid_coordinates(time, *item[1:].tolist()) + base for time, item, base in zip(times, merged, span_bases)]
    positions[:, pad_index] = torch.cat(coords, dim=1)
    return positions, int(positions.max()) + 1 - length


def _temporal_coordinates(t: int, step: float) -> torch.Tensor:
    """The temporal position of each of `t` temporal patches, `step` apart, rounded down."""
    if step == 1:
        return torch.arange(t)
    return (torch.arange(t, dtype=torch.float64) * step).long()


def _grid_coordinates(times: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`[3, t*h*w]` (t, h, w) coordinates in row-major order of the merged vision tokens."""
    grid = torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid).reshape(3, -1)
