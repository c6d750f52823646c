"""Qwen2.5-VL against transformers' `Qwen2_5_VLForConditionalGeneration` on tiny random checkpoints
with window attention and full-attention blocks: logits, greedy tokens and top-5 logprobs of
every prompt position, fp32 and AWQ (dequantized exactly as AutoAWQ packs it).

Inputs come from our Processor (its parity with the reference processor is
tests/test_qwen2_5_vl_processor.py); both models get our M-RoPE positions.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from checkpoints import VARIANTS_2_5, build_reference_model_2_5, reference_config_2_5, write_tiny_checkpoint_2_5
from test_model_parity import _image, run_ours
from test_quant import reference_dequantized

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.loader import load_model
from qwen2vl.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, window_partition
from qwen2vl.processor import Processor, mrope_positions
from qwen2vl.tools.random_checkpoint import write_random_checkpoint


def _frames(count, width, height, seed):
    return [_image(width, height, seed * 100 + i) for i in range(count)]


def _user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def _img(width, height, seed):
    return {"type": "image", "image": _image(width, height, seed)}


def _vid(count, width, height, seed, fps=None):
    video = {"type": "video", "video": _frames(count, width, height, seed)}
    return {**video, "sample_fps": fps} if fps else video


CONVERSATIONS = {
    "text": [_user("Write a haiku about the sea, please.")],
    "image": [_user(_img(84, 56, 1), "What is this?")],
    "two_images": [_user(_img(56, 84, 2), "and", _img(112, 140, 3), "Compare them.")],
    "video": [_user(_vid(4, 84, 56, 4), "What happens?")],
    "image_video": [_user(_img(56, 56, 5), _vid(6, 56, 84, 6, fps=1.0), "Both?")],
    "multi_turn": [_user(_img(84, 84, 7), "Describe it."),
                   {"role": "assistant", "content": "A square of noise."},
                   _user(_vid(2, 56, 56, 8, fps=4.0), "And this one?")],
}


class Reference:
    def __init__(self, ckpt=None, model=None):
        from transformers import Qwen2_5_VLForConditionalGeneration as Reference25

        self.model = model or Reference25.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()

    @torch.no_grad()
    def logits(self, inputs):
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")
        return self.model(**{k: inputs[k] for k in keys if k in inputs}, position_ids=inputs["position_ids"]).logits[0]


def ours_inputs(processor, conversation):
    """(input_ids, positions, pixels, grids) of one prompt, as the engine gets them."""
    prompt = processor.prepare(conversation)
    items = prompt.vision_items
    pixels = torch.cat([item.pixel_values for item in items]) if items else None
    grids = torch.tensor([item.grid_thw for item in items]) if items else None
    return torch.tensor(prompt.input_ids), prompt.positions, pixels, grids


def assert_same_predictions(ours, ref):
    """Logits within 1e-4 of their scale, the same greedy token and the same top-5 logprobs at every position."""
    scale, diff = ref.abs().max(), (ours - ref).abs().max()
    assert diff <= 1e-4 * scale, f"max abs diff {diff:.3g} > 1e-4 x logit scale {scale:.3g}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    ours_lp, ref_lp = ours.log_softmax(-1), ref.log_softmax(-1)
    top = ref_lp.topk(5, dim=-1)
    assert torch.equal(ours_lp.topk(5, dim=-1).indices, top.indices)
    torch.testing.assert_close(ours_lp.gather(-1, top.indices), top.values, rtol=0, atol=1e-4)


@pytest.fixture(scope="module", params=list(VARIANTS_2_5))
def setup(request, tmp_path_factory):
    ckpt = write_tiny_checkpoint_2_5(tmp_path_factory.mktemp(f"tiny-2_5-{request.param}"), request.param)
    return load_model(ckpt), Reference(ckpt), Processor.from_pretrained(ckpt)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_predictions_match_transformers(setup, name):
    model, ref, processor = setup
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    (ours,) = run_ours(model, [ours_inputs(processor, CONVERSATIONS[name])])
    assert_same_predictions(ours, ref.logits(processor(CONVERSATIONS[name])))
    assert len(set(ours.argmax(-1).tolist())) > 3  # far from uniform: a wrong window or position shows


def test_mixed_batch_matches_each_prompt_alone(setup):
    model, ref, processor = setup
    names = ("image_video", "text", "two_images", "video")
    prompts = [ours_inputs(processor, CONVERSATIONS[name]) for name in names]
    for ours, prompt, name in zip(run_ours(model, prompts), prompts, names):
        (alone,) = run_ours(model, [prompt])
        torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5)
        assert_same_predictions(ours, ref.logits(processor(CONVERSATIONS[name])))


def test_encode_vision_matches_the_reference_tower(setup):
    model, ref, processor = setup
    inputs = processor(CONVERSATIONS["two_images"])
    with torch.no_grad():
        ours = model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
        theirs = ref.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(ours, torch.cat(theirs), rtol=1e-5, atol=1e-5)


def test_window_partition_regroups_and_drops_padding():
    # One 1 x 6 x 10 patch grid = 3 x 5 merged tokens, windows of 2 x 2 merged tokens: 2 x 3 windows,
    # the last row and column of windows clipped.
    order, lengths = window_partition([(1, 6, 10)], merge_size=2, window=2)
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert lengths == [16, 16, 8, 8, 8, 4]
    # A second item and frame continue the numbering; windows never span frames.
    order, lengths = window_partition([(1, 2, 2), (2, 2, 4)], merge_size=2, window=2)
    assert order.tolist() == [0, 1, 2, 3, 4] and lengths == [4, 8, 8]


def test_config_names_the_tower_width_and_the_merger_output():
    config = Qwen2VLConfig.from_dict(reference_config_2_5("a").to_dict())
    assert config.model_type == "qwen2_5_vl"
    vision = config.vision
    assert (vision.embed_dim, vision.hidden_size, vision.mlp_hidden_size) == (32, 64, 48)
    assert (vision.window_size, vision.fullatt_block_indexes, vision.tokens_per_second) == (56, (1,), 2)
    with pytest.raises(CheckpointError, match="model_type 'qwen9_vl' is not supported"):
        Qwen2VLConfig.from_dict({**reference_config_2_5("a").to_dict(), "model_type": "qwen9_vl"})


def test_awq_checkpoint_matches_transformers_on_the_dequantized_weights(tmp_path):
    ckpt = write_random_checkpoint(reference_config_2_5("a").to_dict(), tmp_path, dtype="fp16", quant="awq",
                                   group_size=32)
    reference = build_reference_model_2_5("a")
    state = {}
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.endswith((".qzeros", ".scales")):
                continue
            if key.endswith(".qweight"):
                prefix = key.removesuffix(".qweight")
                state[f"{prefix}.weight"] = reference_dequantized(f, prefix, "awq", 4, 32)
            else:
                state[key] = f.get_tensor(key).float()
    state = {("model.visual." + k.removeprefix("visual.")) if k.startswith("visual.") else
             ("model.language_model." + k.removeprefix("model.")) if k.startswith("model.") else k: v
             for k, v in state.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    model = load_model(ckpt, dtype=torch.float32)
    assert model.config.quant.method == "awq"
    processor = Processor.from_pretrained(ckpt)
    for name in ("image_video", "text"):
        (ours,) = run_ours(model, [ours_inputs(processor, CONVERSATIONS[name])])
        assert_same_predictions(ours, Reference(model=reference).logits(processor(CONVERSATIONS[name])))


def test_time_aligned_video_positions_by_hand():
    """Temporal patches floor(i x step) apart; text resumes past the span's largest position.
    A video of 3 temporal x 2 x 2 merged tokens at 0.5 s per temporal patch and 3 tokens per second:
    step 1.5, temporal positions 0, 1, 3 (transformers 5.17 would truncate 0.5 s to 0)."""
    ids = torch.tensor([7, 8] + [151656] * 12 + [9])
    positions, delta = mrope_positions(ids, [(3, 4, 4)], (151655, 151656), 2, time_steps=[0.5 * 3])
    assert positions[0, 2:14].tolist() == [2] * 4 + [3] * 4 + [5] * 4
    assert positions[1, 2:14].tolist() == [2, 2, 3, 3] * 3 and positions[2, 2:14].tolist() == [2, 3, 2, 3] * 3
    assert positions[:, 14].tolist() == [6, 6, 6] and delta == 6 - 14
    # The same grid with step 4: positions 0, 4, 8 past the start, the text after at 2 + 8 + 1.
    positions, _ = mrope_positions(ids, [(3, 4, 4)], (151655, 151656), 2, time_steps=[4.0])
    assert positions[0, 2:14:4].tolist() == [2, 6, 10] and positions[:, 14].tolist() == [11] * 3


def test_engine_decodes_as_transformers_generate(tmp_path, monkeypatch):
    """A hub id resolved from the cache (as `make demo MODEL=Qwen/Qwen2.5-VL-3B-Instruct-AWQ`
    does), then greedy decoding through the engine against `generate` with the checkpoint's
    generation_config. The prompts are ones where transformers' positions agree with ours."""
    from qwen2vl import Qwen2VL

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct-AWQ" / "snapshots" / "0"
    write_tiny_checkpoint_2_5(snapshot, "a")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    llm = Qwen2VL.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct-AWQ", device="cpu")
    reference = Reference(snapshot).model
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
            "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")
    for name in ("image", "video", "text"):
        inputs = llm.processor(CONVERSATIONS[name])
        with torch.no_grad():
            out = reference.generate(**{k: inputs[k] for k in keys if k in inputs}, max_new_tokens=6)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert llm.chat(CONVERSATIONS[name], max_new_tokens=6).token_ids == expected, name
