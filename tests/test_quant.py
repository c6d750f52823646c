"""AWQ / GPTQ: bit order, exact dequantization at load, logits against transformers."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from checkpoints import reference_config, scale_init_
from qwen2vl.layers import quantization as q
from qwen2vl.layers.linear import AWQLinear, GPTQLinear
from qwen2vl.loader import load_model
from qwen2vl.tools.random_checkpoint import write_random_checkpoint
from test_model_parity import assert_close, vision_inputs, Reference

# Row 0 holds columns 0..7 = 1..8, row 1 holds 15..8. AWQ fills nibbles (lowest first) with
# columns 0, 2, 4, 6, 1, 3, 5, 7, so row 0's nibbles read 1,3,5,7,2,4,6,8 from the bottom.
HAND_VALUES = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 14, 13, 12, 11, 10, 9, 8]], dtype=torch.int32)


def int32(word: int) -> int:
    """A 32-bit pattern as the signed int32 the checkpoints store."""
    return word - 2**32 if word >= 2**31 else word


HAND_AWQ_WORDS = torch.tensor([[int32(0x86427531)], [int32(0x8ACE9BDF)]], dtype=torch.int32)


def test_awq_nibble_order_hand_built():
    assert torch.equal(q.unpack_awq(HAND_AWQ_WORDS), HAND_VALUES)
    assert torch.equal(q.pack_awq(HAND_VALUES), HAND_AWQ_WORDS)
    # One group of 2 rows, zero point 3 for every column, scale 0.5 (column 7: 0.25).
    zeros = q.pack_awq(torch.full((1, 8), 3, dtype=torch.int32))
    scales = torch.tensor([[0.5] * 7 + [0.25]], dtype=torch.float16)
    weight = q.dequantize_awq(HAND_AWQ_WORDS, zeros, scales, group_size=2)  # [N=8, K=2]
    expected = torch.tensor([[-1.0, 6.0], [-0.5, 5.5], [0.0, 5.0], [0.5, 4.5],
                             [1.0, 4.0], [1.5, 3.5], [2.0, 3.0], [1.25, 1.25]])
    assert torch.equal(weight, expected)


def test_gptq_rows_packed_along_input_dim_hand_built():
    # 4-bit: word r of column n holds rows 8r..8r+7, row 8r+i in nibble i (lowest first).
    values = HAND_VALUES.t().repeat(1, 4)  # [K=8, N=8]: columns alternate 1..8 and 15..8
    words = q.pack_gptq_rows(values, 4)
    assert words.tolist() == [[int32(0x87654321), int32(0x89ABCDEF)] * 4]
    # 8-bit: 4 rows per word.
    assert q.pack_gptq_rows(values[:4], 8).tolist() == [[0x04030201, 0x0C0D0E0F] * 4]
    # Original format stores zero - 1: stored 7 means zero 8 (symmetric 4-bit).
    qzeros = q.pack_gptq_zeros(torch.full((1, 8), 7, dtype=torch.int32), 4)
    weight = q.dequantize_gptq(words, qzeros, torch.ones(1, 8, dtype=torch.float16),
                               torch.zeros(8, dtype=torch.int32), bits=4, zero_offset=1)
    assert torch.equal(weight, (values - 8).float().t())


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_desc_act_groups_follow_g_idx(bits):
    gen = torch.Generator().manual_seed(bits)
    K, N, g = 64, 16, 16
    values = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits - 1, (K // g, N), generator=gen, dtype=torch.int32)
    scales = torch.rand(K // g, N, generator=gen).half()
    g_idx = (torch.randperm(K, generator=gen) // g).int()  # act-order: groups scattered over rows
    weight = q.dequantize_gptq(q.pack_gptq_rows(values, bits), q.pack_gptq_zeros(zeros, bits), scales, g_idx,
                               bits, zero_offset=1)
    for k in range(K):
        expected = (values[k] - zeros[g_idx[k]] - 1).float() * scales[g_idx[k]].float()
        assert torch.equal(weight[:, k], expected)


def reference_dequantized(f, prefix, quant, bits, group):
    """Straightforward per-element formula from the stored tensors: float32 [N, K]."""
    qweight, qzeros, scales = (f.get_tensor(f"{prefix}.{n}") for n in ("qweight", "qzeros", "scales"))
    shifts = torch.arange(0, 32, bits)
    mask = 2**bits - 1
    if quant == "awq":
        order = [0, 4, 1, 5, 2, 6, 3, 7]
        vals = ((qweight[:, :, None] >> shifts) & mask)[:, :, order].flatten(1)  # [K, N]
        zeros = ((qzeros[:, :, None] >> shifts) & mask)[:, :, order].flatten(1)
        rows = torch.arange(vals.shape[0]) // group
        offset = 0
    else:
        vals = ((qweight[:, None, :] >> shifts[None, :, None]) & mask).flatten(0, 1)  # [K, N]
        zeros = ((qzeros[:, :, None] >> shifts) & mask).flatten(1)
        rows = f.get_tensor(f"{prefix}.g_idx").long()
        offset = 1
    return ((vals - zeros[rows] - offset).double() * scales.double()[rows]).float().t()


@pytest.fixture(scope="module", params=["awq", "gptq4", "gptq8"])
def quant_ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"quant-{request.param}")
    return request.param, write_random_checkpoint(reference_config("a").to_dict(), out, dtype="fp16",
                                                  quant=request.param, group_size=32)


def test_writer_checkpoint_loads_to_exact_dequantized_weights(quant_ckpt):
    quant, ckpt = quant_ckpt
    bits, method = (4, "awq") if quant == "awq" else (int(quant[-1]), "gptq")
    model = load_model(ckpt, dtype=torch.float32)
    assert model.config.quant.method == method and model.config.quant.bits == bits
    layer = model.language_model.layers[1]
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    assert isinstance(qkv, AWQLinear if method == "awq" else GPTQLinear)
    assert qkv.qweight.dtype == torch.int32 and qkv.scales.dtype == torch.float16
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        parts = [reference_dequantized(f, f"model.layers.1.self_attn.{p}_proj", method, bits, 32) for p in "qkv"]
        assert torch.equal(qkv.weight, torch.cat(parts))
        assert torch.equal(down.weight, reference_dequantized(f, "model.layers.1.mlp.down_proj", method, bits, 32))
        assert torch.equal(qkv.bias, torch.cat([f.get_tensor(f"model.layers.1.self_attn.{p}_proj.bias").float()
                                                for p in "qkv"]))
    # The vision tower stays unquantized.
    assert not isinstance(model.visual.blocks[0].attn.qkv, (AWQLinear, GPTQLinear))


def test_logits_match_transformers_on_dequantized_weights(quant_ckpt):
    quant, ckpt = quant_ckpt
    bits, method = (4, "awq") if quant == "awq" else (int(quant[-1]), "gptq")
    from transformers import Qwen2VLForConditionalGeneration

    ref = Reference.__new__(Reference)
    ref.processor = Reference.processor_for(ckpt)
    config = reference_config("a")
    config._attn_implementation = "sdpa"
    ref.model = Qwen2VLForConditionalGeneration(config).eval()
    scale_init_(ref.model, seed=0, tied=False)  # overwritten below; keeps no parameter uninitialized
    state = {}
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.endswith((".qzeros", ".scales", ".g_idx")):
                continue
            if key.endswith(".qweight"):
                prefix = key[: -len(".qweight")]
                state[f"{prefix}.weight"] = reference_dequantized(f, prefix, method, bits, 32)
            else:
                state[key] = f.get_tensor(key).float()
    state = {("model.visual." + k[len("visual."):]) if k.startswith("visual.") else
             ("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
             for k, v in state.items()}
    missing, unexpected = ref.model.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    ours = load_model(ckpt, dtype=torch.float32)
    from test_model_parity import run_ours

    for prompt in ("image", "text"):
        inputs = ref.inputs(prompt)
        ref_logits, positions = ref.logits_and_positions(inputs)
        (logits,) = run_ours(ours, [(inputs["input_ids"][0], positions, *vision_inputs(inputs))])
        assert_close(logits, ref_logits)


def test_bf16_dequantized_load_keeps_scales_and_packed_tensors(quant_ckpt):
    _, ckpt = quant_ckpt
    model = load_model(ckpt, dtype=torch.bfloat16, int4_kernel=False)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta, name
        expected = {"scales": torch.float16, "qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32}
        assert tensor.dtype == expected.get(name.rpartition(".")[2], torch.bfloat16), name
