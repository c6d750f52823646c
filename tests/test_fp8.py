"""Block-scaled FP8 checkpoints (Qwen's `*-FP8`): config, exact dequantization at load, parity
with transformers on the same dequantized weights, and the errors of a bad checkpoint.

The tiny checkpoints use blocks of 24 rows x 40 columns, so that most linears have several
blocks, partial ones at the ends, and fused q/k/v and gate/up parts that are not multiples of
the block height (their scale rows do not line up with the fused weight's rows)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import reference_config, write_tiny_checkpoint
from fp8_checkpoints import dequantize_reference, write_dequantized_checkpoint, write_fp8_checkpoint
from qwen2vl.config import QuantConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.layers import quantization as q
from qwen2vl.layers.linear import FP8Linear, Linear
from qwen2vl.loader import load_model
from test_model_parity import Reference, assert_close, run_ours, vision_inputs
from test_model_paged import paged_greedy_and_generate

BLOCK = (24, 40)
# One decoder linear kept unquantized, named in the current key layout (as Qwen3-VL's cards do).
SKIPPED = "model.language_model.layers.1.mlp.down_proj"


def fp8_config(**changes) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.visual.blocks.0.attn.qkv"], **changes}


def test_fp8_quantization_config():
    quant = QuantConfig.from_dict(fp8_config())
    assert (quant.method, quant.weight_block_size, quant.modules_to_not_convert) == (
        "fp8", (128, 128), ("lm_head", "model.visual.blocks.0.attn.qkv"))
    assert QuantConfig.from_dict({"quant_method": "fp8", "weight_block_size": [64, 32]}).weight_block_size == (64, 32)


@pytest.mark.parametrize("changes, message", [
    ({"fmt": "e5m2"}, "FP8 fmt 'e5m2' is not supported"),
    ({"activation_scheme": "static"}, "FP8 activation_scheme 'static' is not supported"),
    ({"scale_fmt": "ue8m0"}, "FP8 scale_fmt 'ue8m0' is not supported"),
    ({"weight_block_size": None}, "FP8 without weight_block_size"),
    ({"weight_block_size": [128]}, r"weight_block_size \[128\] must be two positive integers"),
    ({"weight_block_size": [128, 0]}, "must be two positive integers"),
    ({"quant_method": "fp4"}, "unknown quant_method 'fp4'"),
])
def test_unsupported_fp8_configs_are_refused(changes, message):
    with pytest.raises(CheckpointError, match=message):
        QuantConfig.from_dict(fp8_config(**changes))


def test_modules_to_not_convert_match_whole_dotted_parts():
    quant = QuantConfig.from_dict(fp8_config(modules_to_not_convert=["visual", "model.layers.0.mlp.gate", "lm_head"]))
    assert not quant.converts("visual.blocks.0.mlp.fc1")
    assert not quant.converts("model.layers.0.mlp.gate")  # a MoE router
    assert quant.converts("model.layers.0.mlp.gate_proj")
    assert quant.converts("model.layers.10.mlp.gate_proj")
    assert not quant.converts("lm_head")


def test_fused_scale_rows_restart_at_each_part():
    # Parts of 5 and 3 rows in blocks of 4: part 0 has scale rows 0 (rows 0-3) and 1 (row 4),
    # part 1 has scale row 2 (its rows 0-2), not 1 as row // 4 would say for fused rows 5-7.
    assert q.fp8_scale_rows((5, 3), 4).tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    weight = torch.tensor([[1.0, -2.0, 0.5], [448.0, 0.001953125, -0.875]]).to(q.FP8_DTYPE)
    scale = torch.tensor([[0.5, 3.0]])  # one block row, columns 0-1 and 2
    expected = torch.tensor([[0.5, -1.0, 1.5], [224.0, 0.0009765625, -2.625]])
    assert torch.equal(q.dequantize_fp8_blocks(weight, scale, q.fp8_scale_rows((2,), 4), 2), expected)


def test_quantize_fp8_blocks_rounds_each_block_to_e4m3():
    weight = torch.randn(50, 70, generator=torch.Generator().manual_seed(0))
    weight[30:, 40:] *= 100  # a block with another range
    values, scales = q.quantize_fp8_blocks(weight, BLOCK)
    assert values.dtype == q.FP8_DTYPE and scales.shape == (3, 2) and scales.dtype == torch.float32
    back = dequantize_reference(values, scales, BLOCK)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(24 * i, 24 * (i + 1)), slice(40 * j, 40 * (j + 1))
            # Each block's largest magnitude is e4m3's largest, 448, times the block's scale.
            assert values[rows, cols].float().abs().max() == 448
            assert scales[i, j] == weight[rows, cols].abs().max() / 448
    # Round to nearest with 3 mantissa bits: within half a step (2^-4 relative) of the weight,
    # or of the subnormal step 2^-9 x scale.
    block_scale = scales.repeat_interleave(24, 0)[:50].repeat_interleave(40, 1)[:, :70]
    step = torch.maximum(weight.abs() * 2**-4, 2**-10 * block_scale)
    assert ((back - weight).abs() <= step).all()


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(FP8 checkpoint, the same with its FP8 weights dequantized to float32) of tiny variant "a"."""
    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-fp8-src"), "a")
    fp8 = write_fp8_checkpoint(tiny, tmp_path_factory.mktemp("tiny-fp8"), BLOCK, ("lm_head", SKIPPED))
    return fp8, write_dequantized_checkpoint(fp8, tmp_path_factory.mktemp("tiny-fp8-dequantized"))


def test_checkpoint_has_qwens_fp8_layout(fp8_pair):
    fp8, _ = fp8_pair
    tensors = load_file(fp8 / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (2, 2)  # 32 x 64 in 24 x 40 blocks
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (3, 4)  # 64 x 128
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32  # skipped
    assert "model.layers.1.mlp.down_proj.weight_scale_inv" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.float32
    assert tensors["visual.blocks.0.attn.qkv.weight"].dtype == torch.float32


def test_loaded_linears_are_the_exact_dequantization(fp8_pair):
    fp8, dequantized = fp8_pair
    model = load_model(fp8, dtype=torch.float32)
    assert model.config.quant.method == "fp8" and model.config.quant.weight_block_size == BLOCK
    tensors = load_file(fp8 / "model.safetensors")
    layer = model.language_model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, FP8Linear) and layer.self_attn.qkv_proj.weight_scale_inv is None
    parts = [dequantize_reference(tensors[f"model.layers.0.self_attn.{p}_proj.weight"],
                                  tensors[f"model.layers.0.self_attn.{p}_proj.weight_scale_inv"], BLOCK) for p in "qkv"]
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(parts))
    assert torch.equal(layer.self_attn.qkv_proj.bias, torch.cat([tensors[f"model.layers.0.self_attn.{p}_proj.bias"]
                                                                  for p in "qkv"]))
    # modules_to_not_convert: the skipped linear stays a plain one with the stored weight.
    skipped = model.language_model.layers[1].mlp.down_proj
    assert type(skipped) is Linear and torch.equal(skipped.weight, tensors["model.layers.1.mlp.down_proj.weight"])
    assert isinstance(model.language_model.layers[1].mlp.gate_up_proj, FP8Linear)
    assert not isinstance(model.visual.blocks[0].attn.qkv, FP8Linear)
    # Every parameter equals the one loaded from the dequantized checkpoint.
    reference = dict(load_model(dequantized, dtype=torch.float32).named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, reference[name]), name


def test_bf16_load_dequantizes_to_bf16_on_the_cpu(fp8_pair):
    fp8, _ = fp8_pair
    model = load_model(fp8, dtype=torch.bfloat16)
    qkv = model.language_model.layers[1].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.bfloat16 and qkv.weight_scale_inv is None
    assert torch.equal(qkv.weight, load_model(fp8, dtype=torch.float32).language_model.layers[1].self_attn.qkv_proj
                       .weight.to(torch.bfloat16))


@pytest.fixture(scope="module")
def fp8_models(fp8_pair):
    fp8, dequantized = fp8_pair
    return load_model(fp8), Reference(dequantized)


@pytest.mark.parametrize("prompt", ["text", "image", "two_images"])
def test_logits_match_transformers_on_the_dequantized_weights(fp8_models, prompt):
    ours_model, ref = fp8_models
    inputs = ref.inputs(prompt)
    ref_logits, positions = ref.logits_and_positions(inputs)
    (ours,) = run_ours(ours_model, [(inputs["input_ids"][0], positions, *vision_inputs(inputs))])
    assert_close(ours, ref_logits)
    assert torch.equal(ours.argmax(-1), ref_logits.argmax(-1))
    assert len(set(ours.argmax(-1).tolist())) > 3
    top5 = ref_logits[-1].topk(5).indices
    assert torch.equal(ours[-1].topk(5).indices, top5)


def test_greedy_decode_matches_transformers_generate(fp8_models):
    ours, theirs = paged_greedy_and_generate(*fp8_models, new_tokens=6, num_blocks=16)
    assert ours == theirs


def _broken_copy(fp8, tmp_path, edit):
    """`fp8` copied to `tmp_path` with its tensors changed by `edit(tensors)`."""
    shutil.copytree(fp8, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_a_bad_scale_shape_is_a_clear_error(fp8_pair, tmp_path):
    key = "model.layers.0.self_attn.v_proj.weight_scale_inv"
    broken = _broken_copy(fp8_pair[0], tmp_path, lambda t: t.update({key: torch.ones(1, 2)}))
    with pytest.raises(CheckpointError, match=rf"tensor {key}: expected shape \[2, 2\], found \[1, 2\]"):
        load_model(broken)


def test_a_missing_scale_is_a_clear_error(fp8_pair, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight_scale_inv"
    broken = _broken_copy(fp8_pair[0], tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"checkpoint is missing tensor {key} \[expected shape \[6, 2\]\]"):
        load_model(broken)


def test_an_unquantized_weight_where_fp8_is_expected_is_a_clear_error(fp8_pair, tmp_path):
    key = "model.layers.0.mlp.gate_proj.weight"
    broken = _broken_copy(fp8_pair[0], tmp_path, lambda t: t.update({key: t[key].float()}))
    with pytest.raises(CheckpointError, match=rf"tensor {key}: expected torch.float8_e4m3fn .*found torch.float32"):
        load_model(broken)


def test_fp8_weights_without_a_quantization_config_are_refused(fp8_pair, tmp_path):
    broken = shutil.copytree(fp8_pair[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_scale_inv in model.safetensors is not part of this model"):
        load_model(broken)


def test_dequantization_equals_transformers_on_whole_blocks():
    """transformers 5.17's own FP8 dequantization (`Fp8Dequantize`, what `dequantize=True` loads)
    gives the same weights, bitwise, where the blocks tile the weight. On partial blocks it
    raises (it derives the block from the scale grid), and vLLM refuses parts that are not
    multiples of the block; the stored scale grid is ceil(out / rows) x ceil(in / columns) in
    both, which is what we read (hand-computed partial blocks:
    `test_fused_scale_rows_restart_at_each_part`)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    values, scales = q.quantize_fp8_blocks(weight, (16, 32))
    theirs = Fp8Dequantize(None)._dequantize_one(values, scales, torch.float32)
    assert torch.equal(q.dequantize_fp8_blocks(values, scales, q.fp8_scale_rows((64,), 16), 32), theirs)
    values, scales = q.quantize_fp8_blocks(weight[:40], (16, 32))
    with pytest.raises(ValueError, match="not divisible by scale grid"):
        Fp8Dequantize(None)._dequantize_one(values, scales, torch.float32)


def test_bfloat16_scales_are_read_as_float32(fp8_pair, tmp_path):
    """Some FP8 releases store `weight_scale_inv` in bfloat16: read exactly, as float32."""
    key = "model.layers.0.mlp.down_proj"
    tensors = load_file(fp8_pair[0] / "model.safetensors")
    scale = tensors[f"{key}.weight_scale_inv"].bfloat16()
    converted = _broken_copy(fp8_pair[0], tmp_path, lambda t: t.update({f"{key}.weight_scale_inv": scale}))
    model = load_model(converted, dtype=torch.float32)
    expected = dequantize_reference(tensors[f"{key}.weight"], scale.float(), BLOCK)
    assert torch.equal(model.language_model.layers[0].mlp.down_proj.weight, expected)


def test_random_checkpoint_writer_writes_loadable_fp8(tmp_path):
    """`random_checkpoint --quant fp8` (the benchmarks' random weights): Qwen's layout, loads."""
    from qwen2vl.tools.random_checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint(reference_config("b").to_dict(), tmp_path, quant="fp8", group_size=32)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["quantization_config"]["weight_block_size"] == [32, 32]
    tensors = load_file(ckpt / "model.safetensors")
    # variant b: hidden 96, 6 heads of 16, one kv head: k_proj is 16 x 96, one partial block row.
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 3)
    model = load_model(ckpt, dtype=torch.float32)
    qkv = model.language_model.layers[2].self_attn.qkv_proj
    prefix = "model.layers.2.self_attn"
    parts = [dequantize_reference(tensors[f"{prefix}.{p}_proj.weight"], tensors[f"{prefix}.{p}_proj.weight_scale_inv"],
                                  (32, 32)) for p in "qkv"]
    assert isinstance(qkv, FP8Linear) and torch.equal(qkv.weight, torch.cat(parts))


def test_the_engine_answers_as_on_the_dequantized_checkpoint(fp8_pair, tmp_path):
    """Through `Qwen2VL` (scheduler, paged cache, prefix cache): a batch of an image prompt and a
    text prompt, greedy, twice (the second run from the prefix cache), as the dequantized
    checkpoint answers."""
    from PIL import Image

    from qwen2vl import Qwen2VL

    image = tmp_path / "picture.png"
    Image.fromarray(torch.randint(0, 256, (84, 56, 3), generator=torch.Generator().manual_seed(5),
                                  dtype=torch.uint8).numpy()).save(image)
    conversations = [[{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                   {"type": "text", "text": "What is this?"}]}],
                     [{"role": "user", "content": "Write a haiku about the sea."}]]
    answers = {}
    for name, ckpt in zip(("fp8", "dequantized"), fp8_pair):
        llm = Qwen2VL.from_pretrained(ckpt, num_kv_blocks=128)
        answers[name] = [[c.token_ids for c in llm.chat(conversations, max_tokens=8, temperature=0, ignore_eos=True)]
                         for _ in range(2)]
    assert answers["fp8"] == answers["dequantized"]
    assert answers["fp8"][0] == answers["fp8"][1] and answers["fp8"][0][0] != answers["fp8"][0][1]
