"""The published Qwen3-VL configs in `qwen2vl/assets/`, parsed field by field.

Each expected value is written by hand from the published file (docs/qwen3-vl-sources.md says
which file and how it was checked). The parser tests skip until the parser knows the architecture:
`qwen3_vl` / `qwen3_vl_moe` in `VISION_CONFIGS`, `TextConfig.moe`, `QuantConfig.weight_block_size`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from qwen2vl import config as config_module
from qwen2vl.config import Qwen2VLConfig

ASSETS = Path(__file__).resolve().parent.parent / "qwen2vl" / "assets"

# Files that are byte-identical to the published ones (SHA-256 of the Qwen/Qwen3-VL-2B-Instruct download).
PUBLISHED_SHA256 = {
    "qwen3-vl-2b-instruct.config.json": "bec4b3d446efa05807365c9e1cec03ac590836879d02f3a6da879971154bdd3b",
    "qwen3-vl.preprocessor_config.json": "27225450ac9c6529872ee1924fcb0962ff5634834f817040f444118116f4e516",
    "qwen3-vl.video_preprocessor_config.json": "7768af27c1fafa9cc9011c1dc20067e03f8915e03b63504550e11d5066986d13",
    "qwen3-vl.generation_config.json": "1e241830b48b397cb0900101421df5450baddc7adf01e5fc86b5615865f3bae4",
}

# The 2B's text and vision settings; its FP8 release shares them.
TEXT_2B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
               num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=5000000, mrope_section=(24, 20, 20),
               max_position_embeddings=262144, tie_word_embeddings=True,
               qk_norm=True, attention_bias=False, mrope_interleaved=True)
VISION_2B = dict(depth=24, embed_dim=1024, hidden_size=2048, mlp_hidden_size=4096, num_heads=16, head_dim=64,
                 in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, patch_dim=1536,
                 hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                 deepstack_visual_indexes=(5, 11, 17), video_timestamps=True)
TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653, eos_token_id=151645, torch_dtype=torch.bfloat16)

TEXT_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                    num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=5000000,
                    mrope_section=(24, 20, 20), max_position_embeddings=262144, tie_word_embeddings=False,
                    qk_norm=True, attention_bias=False, mrope_interleaved=True)
MOE_30B_A3B = dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                   mlp_only_layers=(), norm_topk_prob=True)
VISION_30B_A3B = dict(depth=27, embed_dim=1152, hidden_size=2048, mlp_hidden_size=4304, num_heads=16, head_dim=72,
                      in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, patch_dim=1536,
                      hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                      deepstack_visual_indexes=(8, 16, 24), video_timestamps=True)


def published(name: str) -> dict:
    return json.loads((ASSETS / name).read_text())


def parsed(name: str) -> Qwen2VLConfig:
    return Qwen2VLConfig.from_dict(published(name))


def assert_fields(obj, expected: dict):
    actual = {name: getattr(obj, name) for name in expected}
    assert actual == expected


def supports(model_type: str) -> bool:
    return model_type in config_module.VISION_CONFIGS


def has_field(cls, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


dense = pytest.mark.skipif(not supports("qwen3_vl"), reason="qwen3_vl is not in VISION_CONFIGS yet")
moe = pytest.mark.skipif(not (supports("qwen3_vl_moe") and has_field(config_module.TextConfig, "moe")),
                         reason="qwen3_vl_moe / TextConfig.moe not supported yet")
fp8 = pytest.mark.skipif(not (supports("qwen3_vl") and has_field(config_module.QuantConfig, "weight_block_size")),
                         reason="qwen3_vl / FP8 QuantConfig not supported yet")


@pytest.mark.parametrize("name", sorted(PUBLISHED_SHA256))
def test_published_files_are_unchanged(name):
    assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == PUBLISHED_SHA256[name]


@dense
def test_2b_instruct():
    c = parsed("qwen3-vl-2b-instruct.config.json")
    assert c.model_type == "qwen3_vl"
    assert_fields(c.text, TEXT_2B)
    assert_fields(c.vision, VISION_2B)
    assert_fields(c, TOKENS)
    assert c.quant is None
    if has_field(config_module.TextConfig, "moe"):
        assert c.text.moe is None


@dense
def test_2b_processor_settings():
    settings = parsed("qwen3-vl-2b-instruct.config.json").processor_settings
    assert settings.context_len == 262144
    assert settings.vision_token_ids == (151655, 151656, 151652, 151653)
    if hasattr(settings, "video_timestamps"):
        assert settings.video_timestamps


@moe
def test_30b_a3b_instruct():
    c = parsed("qwen3-vl-30b-a3b-instruct.config.json")
    assert c.model_type == "qwen3_vl_moe"
    assert_fields(c.text, TEXT_30B_A3B)
    assert_fields(c.text.moe, MOE_30B_A3B)
    assert all(c.text.moe.is_sparse_layer(i) for i in range(48))
    assert_fields(c.vision, VISION_30B_A3B)
    assert_fields(c, TOKENS)
    assert c.quant is None


@fp8
def test_2b_instruct_fp8():
    c = parsed("qwen3-vl-2b-instruct-fp8.config.json")
    assert c.model_type == "qwen3_vl"
    assert_fields(c.text, TEXT_2B)
    assert_fields(c.vision, VISION_2B)
    assert_fields(c, TOKENS)
    assert (c.quant.method, c.quant.bits, c.quant.weight_block_size) == ("fp8", 8, (128, 128))
    assert not c.four_bit


def test_published_preprocessor_configs():
    image = published("qwen3-vl.preprocessor_config.json")
    video = published("qwen3-vl.video_preprocessor_config.json")
    for d in (image, video):
        assert (d["patch_size"], d["temporal_patch_size"], d["merge_size"]) == (16, 2, 2)
        assert d["image_mean"] == d["image_std"] == [0.5, 0.5, 0.5]
        assert d["processor_class"] == "Qwen3VLProcessor"
    # min / max pixels: 64 and 16384 32-pixel tokens for images, 4 and 24576 (x2 frames) for videos
    assert image["size"] == {"longest_edge": 16384 * 32 * 32, "shortest_edge": 64 * 32 * 32}
    assert video["size"] == {"longest_edge": 24576 * 32 * 32, "shortest_edge": 4 * 32 * 32}
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert image["image_processor_type"] == "Qwen2VLImageProcessorFast"


def test_published_generation_config():
    g = published("qwen3-vl.generation_config.json")
    assert g == {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                 "top_p": 0.8, "top_k": 20, "temperature": 0.7, "repetition_penalty": 1.0,
                 "transformers_version": "4.56.0"}


CONVERSATION = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]},
    {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA cat."},
    {"role": "user", "content": [{"type": "video", "video": "b.mp4"}, {"type": "text", "text": "And?"}]},
]
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def render(template: str) -> str:
    from qwen2vl.processor.chat import ChatTemplate

    return ChatTemplate.from_file(ASSETS / template).render(CONVERSATION, add_generation_prompt=True)


def test_instruct_template_keeps_the_assistant_text_and_opens_a_plain_turn():
    assert render("qwen3-vl.chat_template.jinja") == (
        "<|im_start|>system\nsys<|im_end|>\n"
        f"<|im_start|>user\n{VISION}What?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nA cat.<|im_end|>\n"
        f"<|im_start|>user\n{VIDEO}And?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_thinking_template_drops_past_reasoning_and_opens_a_think_block():
    assert render("qwen3-vl-thinking.chat_template.jinja") == (
        "<|im_start|>system\nsys<|im_end|>\n"
        f"<|im_start|>user\n{VISION}What?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\n{VIDEO}And?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
