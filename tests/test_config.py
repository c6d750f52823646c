"""Config parsing: both config.json layouts, rope settings, quantization configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import reference_config
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent.parent / "qwen2vl" / "assets"


def flat_2b() -> dict:
    return json.loads((ASSETS / "qwen2-vl-2b-instruct-awq.config.json").read_text())


def test_flat_layout_of_the_2b_awq_card():
    c = Qwen2VLConfig.from_dict(flat_2b())
    t, v = c.text, c.vision
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers) == (151936, 1536, 8960, 28)
    assert (t.num_heads, t.num_kv_heads, t.head_dim) == (12, 2, 128)
    assert t.mrope_section == (16, 24, 24) and t.rope_theta == 1e6 and t.tie_word_embeddings
    # Vision sizes absent from the flat config come from the architecture's defaults.
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_hidden_size, v.hidden_size) == (32, 1280, 16, 5120, 1536)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.patch_dim) == (14, 2, 2, 1176)
    assert c.quant.method == "awq" and c.quant.bits == 4 and c.quant.group_size == 128
    assert c.quant.modules_to_not_convert == ("visual",)
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)
    assert c.eos_token_id == 151645 and c.torch_dtype == torch.float16


def test_nested_layout_written_by_transformers():
    c = Qwen2VLConfig.from_dict(reference_config("b").to_dict())
    assert (c.text.hidden_size, c.text.num_layers, c.text.num_heads, c.text.num_kv_heads) == (96, 3, 6, 1)
    assert c.text.mrope_section == (4, 2, 2) and c.text.tie_word_embeddings
    assert (c.vision.embed_dim, c.vision.depth, c.vision.hidden_size, c.vision.mlp_hidden_size) == (48, 1, 96, 96)
    assert c.quant is None


def test_tie_word_embeddings_inside_text_config_counts():
    d = reference_config("a").to_dict()
    d["tie_word_embeddings"] = False
    d["text_config"]["tie_word_embeddings"] = True
    assert Qwen2VLConfig.from_dict(d).text.tie_word_embeddings


def test_gptq_config():
    d = flat_2b()
    d["quantization_config"] = {"bits": 8, "group_size": 128, "desc_act": True, "sym": True,
                                "quant_method": "gptq"}
    quant = Qwen2VLConfig.from_dict(d).quant
    assert (quant.method, quant.bits, quant.desc_act, quant.checkpoint_format) == ("gptq", 8, True, "gptq")


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "bitsandbytes", "bits": 4}, "unknown quant_method 'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 3, "group_size": 128, "version": "gemm"}, "AWQ with bits=3"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ with bits=3"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
])
def test_bad_quantization_configs(quant, message):
    d = flat_2b()
    d["quantization_config"] = quant
    with pytest.raises(CheckpointError, match=message):
        Qwen2VLConfig.from_dict(d)


def test_mrope_section_must_cover_half_the_head():
    d = flat_2b()
    d["rope_scaling"]["mrope_section"] = [16, 24, 16]
    with pytest.raises(CheckpointError, match="mrope_section"):
        Qwen2VLConfig.from_dict(d)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Qwen2VLConfig.from_pretrained(tmp_path)
