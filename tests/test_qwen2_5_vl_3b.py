"""The real Qwen2.5-VL-3B-Instruct shape, random weights: the published config read as transformers
reads it, then written as the AWQ checkpoint by our writer, loaded and run on the CPU.

The slowest Qwen2.5-VL test (~3.4 GB written, ~3 GB of RAM in bf16 on the int4 kernel).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.tools.random_checkpoint import write_random_checkpoint

CONFIG_3B = Path(__file__).resolve().parent.parent / "qwen2vl" / "assets" / "qwen2.5-vl-3b-instruct.config.json"
CHECKPOINT_BYTES = 3.6 * 2**30


def test_3b_config_reads_as_transformers_reads_it():
    from transformers import Qwen2_5_VLConfig

    raw = json.loads(CONFIG_3B.read_text())
    theirs, ours = Qwen2_5_VLConfig(**raw), Qwen2VLConfig.from_dict(raw)
    t, v = theirs.text_config, theirs.vision_config
    assert ours.model_type == theirs.model_type == "qwen2_5_vl"
    assert (ours.text.vocab_size, ours.text.hidden_size, ours.text.intermediate_size, ours.text.num_layers,
            ours.text.num_heads, ours.text.num_kv_heads, ours.text.rms_norm_eps, ours.text.rope_theta,
            ours.text.max_position_embeddings) == (
        t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
        t.num_key_value_heads, t.rms_norm_eps, t.rope_parameters["rope_theta"], t.max_position_embeddings)
    assert list(ours.text.mrope_section) == t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert ours.text.tie_word_embeddings == theirs.tie_word_embeddings is True
    assert (ours.vision.depth, ours.vision.embed_dim, ours.vision.hidden_size, ours.vision.mlp_hidden_size,
            ours.vision.num_heads, ours.vision.in_channels, ours.vision.patch_size, ours.vision.temporal_patch_size,
            ours.vision.spatial_merge_size, ours.vision.window_size, list(ours.vision.fullatt_block_indexes),
            ours.vision.tokens_per_second, ours.vision.hidden_act, ours.vision.rope_theta) == (
        v.depth, v.hidden_size, v.out_hidden_size, v.intermediate_size, v.num_heads, v.in_channels, v.patch_size,
        v.temporal_patch_size, v.spatial_merge_size, v.window_size, list(v.fullatt_block_indexes),
        v.tokens_per_second, v.hidden_act, v.rope_parameters["rope_theta"])
    assert (ours.image_token_id, ours.video_token_id, ours.vision_start_token_id, ours.vision_end_token_id) == (
        theirs.image_token_id, theirs.video_token_id, theirs.vision_start_token_id, theirs.vision_end_token_id)
    assert ours.eos_token_id == t.eos_token_id == 151645


@pytest.fixture(scope="module")
def ckpt_3b_awq(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2.5-vl-3b-awq")
    if shutil.disk_usage(out).free < CHECKPOINT_BYTES:
        pytest.skip(f"the 3B checkpoint needs {CHECKPOINT_BYTES / 2**30:.1f} GiB free")
    try:
        yield write_random_checkpoint(json.loads(CONFIG_3B.read_text()), out, quant="awq")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_3b_awq_loads_and_decodes_on_the_cpu(ckpt_3b_awq):
    from qwen2vl import Qwen2VL
    from qwen2vl.layers.linear import Int4Linear

    index = json.loads((ckpt_3b_awq / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.35.mlp.down_proj.qweight" in index and "visual.blocks.31.mlp.gate_proj.weight" in index
    assert "visual.merger.ln_q.weight" in index and "visual.merger.ln_q.bias" not in index
    llm = Qwen2VL.from_pretrained(ckpt_3b_awq, device="cpu", max_model_len=1024)
    assert isinstance(llm.engine.model.language_model.layers[0].mlp.down_proj, Int4Linear)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (224, 280, 3), dtype=np.uint8))  # 8 x 10 merged tokens: 6 windows
    completion = llm.chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                         {"type": "text", "text": "Describe it."}]}],
                          max_tokens=3, ignore_eos=True)
    assert len(completion.token_ids) == 3
    assert completion.usage.prompt_tokens > 80
