"""Loader: key layouts, sharding, dtypes, and the errors a bad checkpoint gets."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import prefill_batch, reference_config
from qwen2vl.errors import CheckpointError
from qwen2vl.loader import load_model
from qwen2vl.tools.random_checkpoint import write_random_checkpoint


def state(model):
    return {k: v for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def copy_ckpt(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        save_file(edit(tensors), dst / "model.safetensors")
    return dst


def test_loads_what_transformers_saved(tiny_ckpt):
    from transformers import Qwen2VLForConditionalGeneration

    ref = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ours = load_model(tiny_ckpt)
    layer = ours.language_model.layers[0]
    ref_attn = ref.model.language_model.layers[0].self_attn
    assert torch.equal(layer.self_attn.qkv_proj.weight,
                       torch.cat([ref_attn.q_proj.weight, ref_attn.k_proj.weight, ref_attn.v_proj.weight]))
    ref_mlp = ref.model.language_model.layers[0].mlp
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([ref_mlp.gate_proj.weight, ref_mlp.up_proj.weight]))
    assert torch.equal(ours.visual.patch_embed.weight, ref.model.visual.patch_embed.proj.weight.flatten(1))
    assert torch.equal(ours.head.weight, ref.lm_head.weight)
    assert ours.dtype == torch.float32


def test_new_key_layout_loads_the_same(tiny_ckpt, tmp_path):
    def relayout(tensors):
        return {("model.language_model." + k[6:]) if k.startswith("model.") else
                ("model.visual." + k[7:]) if k.startswith("visual.") else k: v for k, v in tensors.items()}

    other = copy_ckpt(tiny_ckpt, tmp_path / "new", relayout)
    assert any(k.startswith("model.language_model.") for k in load_file(other / "model.safetensors"))
    assert_same_weights(load_model(tiny_ckpt), load_model(other))


def test_tied_embeddings(tiny_ckpt_factory):
    model = load_model(tiny_ckpt_factory("b"))
    assert model.head is model.language_model.embed_tokens


def test_sharded_checkpoint_with_index_loads_like_a_single_file(tmp_path):
    config = reference_config("c").to_dict()
    single = write_random_checkpoint(config, tmp_path / "single", dtype="fp32", seed=3)
    sharded = write_random_checkpoint(config, tmp_path / "sharded", dtype="fp32", seed=3, max_shard_bytes=20 * 2**20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_weights(load_model(single), load_model(sharded))


def test_dtypes(tmp_path):
    ckpt = write_random_checkpoint(reference_config("a").to_dict(), tmp_path / "bf16", dtype="bf16")
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = load_model(ckpt)
    assert fp32.dtype == torch.float32
    bf16 = load_model(ckpt, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.visual.patch_embed.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.language_model.embed_tokens.weight.float(), fp32.language_model.embed_tokens.weight)
    # float16 requested: the vision tower takes it, the text decoder computes in bfloat16.
    fp16 = load_model(ckpt, dtype=torch.float16)
    assert fp16.visual.patch_embed.weight.dtype == torch.float16 and fp16.dtype == torch.bfloat16
    ids = torch.tensor([151644, 872, 198, 9707, 0, 13, 151645])
    attn, caches, _ = prefill_batch(fp16.config.text, [len(ids)], dtype=fp16.dtype)
    logits = fp16(ids, torch.arange(len(ids)).expand(3, -1), attn, caches)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.weight"},
     r"missing tensor model.layers.1.self_attn.k_proj.weight \[expected shape \[32, 64\]\]"),
    (lambda t: {**t, "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 65)},
     r"tensor model.layers.0.mlp.up_proj.weight: expected shape \[128, 64\], found \[128, 65\]"),
    (lambda t: {**t, "visual.blocks.0.attn.qkv.bias": torch.zeros(95)},
     r"tensor visual.blocks.0.attn.qkv.bias: expected shape \[96\], found \[95\]"),
    (lambda t: {**t, "model.layers.7.mlp.up_proj.weight": torch.zeros(128, 64)},
     r"tensor model.layers.7.mlp.up_proj.weight in model.safetensors is not part of this model"),
])
def test_bad_checkpoints_name_the_tensor(tiny_ckpt, tmp_path, edit, message):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_quantized_config_over_plain_weights_names_the_missing_packed_tensor(tiny_ckpt, tmp_path):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                     "zero_point": True}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight is stored unquantized.*"
                       r"expected model.layers.0.mlp.down_proj.qweight"):
        load_model(bad)


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "exl2", "bits": 4}, "unknown quant_method 'exl2'"),
    ({"quant_method": "gptq", "bits": 2, "group_size": 32}, "GPTQ with bits=2"),
])
def test_bad_quantization_config_in_checkpoint(tiny_ckpt, tmp_path, quant, message):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = quant
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_missing_weights_file(tiny_ckpt, tmp_path):
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(bad)
