"""Logits parity with transformers' Qwen2-VL on tiny random checkpoints (fp32).

The checkpoints are written by transformers' `save_pretrained` and loaded by our loader; inputs
are built by transformers' processor; M-RoPE positions come from the reference `get_rope_index`.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints import prefill_batch
from qwen2vl.layers.attention import Segments, packed_attention
from qwen2vl.loader import load_model

IMAGE_TOKEN, VIDEO_TOKEN = 151655, 151656


def _image(width, height, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _video(frames, width, height, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


PROMPTS = {
    "text": ([{"type": "text", "text": "Write a haiku about the sea, please."}], [], []),
    "image": ([{"type": "image"}, {"type": "text", "text": "What is this?"}], [(56, 84, 1)], []),
    "two_images": ([{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                    {"type": "text", "text": "Compare them."}], [(84, 56, 2), (112, 112, 3)], []),
    "video": ([{"type": "video"}, {"type": "text", "text": "What happens?"}], [], [(4, 56, 84, 4)]),
    "image_video": ([{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Both?"}],
                    [(56, 56, 5)], [(2, 84, 56, 6)]),
}


class Reference:
    """transformers model + processor for one checkpoint."""

    def __init__(self, ckpt):
        from transformers import Qwen2VLForConditionalGeneration

        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.processor = self.processor_for(ckpt)

    @staticmethod
    def processor_for(ckpt):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(ckpt)

    def inputs(self, prompt: str):
        content, images, videos = PROMPTS[prompt]
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs = {}
        if images:
            kwargs["images"] = [_image(*spec) for spec in images]
        if videos:
            kwargs["videos"] = [_video(*spec) for spec in videos]
            kwargs["videos_kwargs"] = {"do_sample_frames": False}
        return self.processor(text=[text], return_tensors="pt", return_mm_token_type_ids=True, **kwargs)

    @torch.no_grad()
    def logits_and_positions(self, inputs):
        logits = self.model(**inputs).logits[0]
        if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
            positions, _ = self.model.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
                inputs.get("video_grid_thw"), inputs["attention_mask"])
            positions = positions[:, 0]
        else:
            positions = torch.arange(inputs["input_ids"].shape[1]).expand(3, -1)
        return logits, positions


def vision_inputs(inputs):
    """Pixels and grids of a prompt, in prompt order (our prompts put images before videos)."""
    pixels = [inputs[k] for k in ("pixel_values", "pixel_values_videos") if k in inputs]
    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs]
    if not pixels:
        return None, None
    return torch.cat(pixels), torch.cat(grids)


@torch.no_grad()
def run_ours(model, prompts):
    """One packed forward over several prompts: [(input_ids [L], positions [3, L], pixels, grids)]."""
    ids = torch.cat([p[0] for p in prompts])
    positions = torch.cat([p[1] for p in prompts], dim=1)
    embeds = [model.encode_vision(p[2], p[3]) for p in prompts if p[2] is not None]
    vision_embeds = torch.cat(embeds) if embeds else None
    vision_mask = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN) if embeds else None
    attn, caches, _ = prefill_batch(model.config.text, [len(p[0]) for p in prompts], block_size=4)
    logits = model(ids, positions, attn, caches, vision_embeds, vision_mask, torch.arange(len(ids)))
    return logits.split([len(p[0]) for p in prompts])


def assert_close(ours, ref):
    scale = ref.abs().max()
    diff = (ours - ref).abs().max()
    assert diff <= 1e-4 * scale, f"max abs diff {diff:.3g} > 1e-4 x logit scale {scale:.3g}"


@pytest.fixture(scope="module", params=["a", "b", "c"])
def pair(request, tiny_ckpt_factory):
    ckpt = tiny_ckpt_factory(request.param)
    return load_model(ckpt), Reference(ckpt)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_transformers(pair, prompt):
    ours_model, ref = pair
    inputs = ref.inputs(prompt)
    ref_logits, positions = ref.logits_and_positions(inputs)
    pixels, grids = vision_inputs(inputs)
    (ours,) = run_ours(ours_model, [(inputs["input_ids"][0], positions, pixels, grids)])
    assert ours.dtype == torch.float32
    assert_close(ours, ref_logits)
    # The scaled init makes logits far from uniform: greedy choices vary along the prompt.
    assert len(set(ours.argmax(-1).tolist())) > 3


def test_batch_of_two_prompts_matches_each_alone(pair):
    ours_model, ref = pair
    prompts, refs = [], []
    for name in ("image_video", "text"):
        inputs = ref.inputs(name)
        ref_logits, positions = ref.logits_and_positions(inputs)
        refs.append(ref_logits)
        prompts.append((inputs["input_ids"][0], positions, *vision_inputs(inputs)))
    assert len(prompts[0][0]) != len(prompts[1][0])
    for ours, ref_logits in zip(run_ours(ours_model, prompts), refs):
        assert_close(ours, ref_logits)


def test_encode_vision_packs_items_in_input_order(pair):
    ours_model, ref = pair
    inputs = ref.inputs("image_video")
    pixels, grids = vision_inputs(inputs)
    with torch.no_grad():
        packed = ours_model.encode_vision(pixels, grids)
        split = [ours_model.encode_vision(pixels[:len(inputs["pixel_values"])], grids[:1]),
                 ours_model.encode_vision(pixels[len(inputs["pixel_values"]):], grids[1:])]
        ref_embeds = ref.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    merge = ours_model.config.vision.spatial_merge_size
    assert packed.shape == (int(grids.prod(-1).sum()) // merge**2, ours_model.config.text.hidden_size)
    torch.testing.assert_close(packed, torch.cat(split), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[0], torch.cat(ref_embeds.pooler_output), rtol=1e-5, atol=1e-5)


def test_packed_attention_batches_segments_of_one_length():
    generator = torch.Generator().manual_seed(0)
    lengths = [6, 4, 6, 9, 4, 6]
    query, key, value = (torch.randn(sum(lengths), 2, 8, generator=generator) for _ in range(3))
    segments = Segments(lengths)
    assert sorted((count, length) for _, count, length in segments.groups) == [(1, 9), (2, 4), (3, 6)]
    expected = torch.cat([
        F.scaled_dot_product_attention(*(t[start:start + n].transpose(0, 1) for t in (query, key, value))).transpose(0, 1)
        for start, n in zip(itertools.accumulate(lengths, initial=0), lengths)])
    torch.testing.assert_close(packed_attention(query, key, value, segments), expected)


def test_packed_causal_attention_of_prompts_placed_anywhere_with_grouped_heads():
    """The decoder's batched prefill: prompts at given rows (others' rows between them), causal,
    4 query heads over 2 kv heads; rows outside the segments are not attention's business."""
    generator = torch.Generator().manual_seed(1)
    starts, lengths = [0, 9, 13, 30], [5, 4, 5, 5]
    query = torch.randn(40, 4, 8, generator=generator)
    key, value = (torch.randn(40, 2, 8, generator=generator) for _ in range(2))
    segments = Segments(lengths, starts=starts)
    assert sorted((count, length) for _, count, length in segments.groups) == [(1, 4), (3, 5)]
    out = packed_attention(query, key, value, segments, causal=True)
    for start, n in zip(starts, lengths):
        q, k, v = (t[start:start + n].transpose(0, 1) for t in (query, key, value))
        expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), is_causal=True)
        torch.testing.assert_close(out[start:start + n], expected.transpose(0, 1))
