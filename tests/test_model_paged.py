"""Paged KV cache: chunked prefill, decode and mixed batches give the logits of a full prefill."""
from __future__ import annotations

import pytest
import torch

from checkpoints import allocate_kv_caches, attention_metadata, prefill_batch
from qwen2vl.loader import load_model
from test_model_parity import IMAGE_TOKEN, VIDEO_TOKEN, Reference, vision_inputs

BLOCK_SIZE = 4


class Seq:
    """A prompt followed by greedy decode tokens, with everything a forward needs per token."""

    def __init__(self, model, ref, prompt):
        inputs = ref.inputs(prompt)
        _, positions = ref.logits_and_positions(inputs)
        self.ids = inputs["input_ids"][0]
        self.positions = positions
        pixels, grids = vision_inputs(inputs)
        with torch.no_grad():
            self.vision_rows = model.encode_vision(pixels, grids) if pixels is not None else None

    def append(self, token: int):
        next_position = self.positions.max() + 1  # decode positions: L + i + rope_delta on all axes
        self.ids = torch.cat([self.ids, torch.tensor([token])])
        self.positions = torch.cat([self.positions, next_position.expand(3, 1)], dim=1)

    def is_vision(self, start, end):
        ids = self.ids[start:end]
        return (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)

    def vision_rows_in(self, start, end):
        before = int(self.is_vision(0, start).sum())
        return self.vision_rows[before: before + int(self.is_vision(start, end).sum())]


@torch.no_grad()
def step(model, caches, tables, segments):
    """One forward over `segments` = [(seq, start, end)]: logits of every new row, per segment."""
    ids = torch.cat([s.ids[a:b] for s, a, b in segments])
    positions = torch.cat([s.positions[:, a:b] for s, a, b in segments], dim=1)
    mask = torch.cat([s.is_vision(a, b) for s, a, b in segments])
    rows = [s.vision_rows_in(a, b) for s, a, b in segments if s.vision_rows is not None]
    embeds = torch.cat(rows) if rows and mask.any() else None
    attn = attention_metadata([b - a for _, a, b in segments], [b for _, _, b in segments],
                              [tables[id(s)] for s, _, _ in segments], BLOCK_SIZE)
    logits = model(input_ids=ids, positions=positions, attn=attn, kv_caches=caches,
                   vision_embeds=embeds, vision_mask=mask if embeds is not None else None,
                   logits_indices=torch.arange(len(ids)))
    return logits.split([b - a for _, a, b in segments])


@torch.no_grad()
def full_prefill(model, seq):
    attn, caches, _ = prefill_batch(model.config.text, [len(seq.ids)], BLOCK_SIZE)
    mask = seq.is_vision(0, len(seq.ids))
    return model(seq.ids, seq.positions, attn, caches, seq.vision_rows if mask.any() else None,
                 mask if mask.any() else None, torch.arange(len(seq.ids)))


@pytest.fixture(scope="module", params=["a", "b"])
def pair(request, tiny_ckpt_factory):
    ckpt = tiny_ckpt_factory(request.param)
    return load_model(ckpt), Reference(ckpt)


def test_chunked_prefill_decode_and_mixed_batches_match_full_prefill(pair):
    model, ref = pair
    a, b, c = (Seq(model, ref, p) for p in ("image", "text", "image_video"))
    len_a, len_b, len_c = len(a.ids), len(b.ids), len(c.ids)
    # Blocks handed out shuffled, so that block tables are not contiguous.
    blocks = torch.randperm(3 * 12, generator=torch.Generator().manual_seed(0)).tolist()
    tables = {id(a): blocks[0:12], id(b): blocks[12:24], id(c): blocks[24:36]}
    caches = allocate_kv_caches(model.config.text, 36, BLOCK_SIZE)
    got = {id(s): [] for s in (a, b, c)}

    def run(segments):
        for (s, _, _), logits in zip(segments, step(model, caches, tables, segments)):
            got[id(s)].append(logits)

    # The chunk boundary of `a` falls inside its image's pad tokens.
    first_pad = int(a.is_vision(0, len_a).nonzero()[0]) + 2
    run([(a, 0, first_pad), (b, 0, len_b)])                     # chunk + full prefill
    b.append(int(got[id(b)][-1][-1].argmax()))
    run([(b, len_b, len_b + 1), (a, first_pad, len_a), (c, 0, 9)])  # decode + chunk + chunk
    for s in (a, b):
        s.append(int(got[id(s)][-1][-1].argmax()))
    run([(c, 9, len_c), (a, len_a, len_a + 1), (b, len_b + 1, len_b + 2)])  # chunk + decodes
    c.append(int(got[id(c)][-1][-1].argmax()))
    run([(c, len_c, len_c + 1)])                                # a lone decode

    for s in (a, b, c):
        expected = full_prefill(model, s)
        paged = torch.cat(got[id(s)])
        assert paged.shape == expected.shape
        torch.testing.assert_close(paged, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def paged_greedy_and_generate(model, ref, new_tokens: int, num_blocks: int) -> tuple[list[int], list[int]]:
    """(ours, transformers'): `new_tokens` greedy tokens after the image prompt, ours through the
    paged cache (`num_blocks` blocks), theirs from `generate`."""
    inputs = ref.inputs("image")
    with torch.no_grad():
        generated = ref.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    seq = Seq(model, ref, "image")
    caches = allocate_kv_caches(model.config.text, num_blocks, BLOCK_SIZE)
    tables = {id(seq): list(range(num_blocks))}
    ours, start = [], 0
    for _ in range(new_tokens):
        (logits,) = step(model, caches, tables, [(seq, start, len(seq.ids))])
        start = len(seq.ids)
        ours.append(int(logits[-1].argmax()))
        seq.append(ours[-1])
    return ours, generated[0, inputs["input_ids"].shape[1]:].tolist()


def test_decode_steps_match_transformers_generate(pair):
    """Greedy decoding through our paged cache follows transformers' own greedy generate."""
    ours, theirs = paged_greedy_and_generate(*pair, new_tokens=4, num_blocks=12)
    assert ours == theirs
