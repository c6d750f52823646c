"""Each Triton kernel equals its torch reference on random inputs: the cases behind
tests/test_triton_kernels.py (which decides whether they run in its process or a fresh one).

On a machine without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, which
must be set before triton is first imported) at small shapes; on a GPU they run natively
(benchmarks/speed.py runs them there, and repeats the checks at the real 2B shapes).
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the GPU kernels cannot be checked")

from qwen2vl.layers import quantization as q  # noqa: E402
from qwen2vl.layers.activation import silu_and_mul  # noqa: E402
from qwen2vl.layers.attention import PagedAttention  # noqa: E402
from qwen2vl.layers.attention_metadata import AttentionMetadata  # noqa: E402
from qwen2vl.layers.norm import RMSNorm  # noqa: E402
from qwen2vl.layers.rotary import MRotaryEmbedding, apply_rotary  # noqa: E402
import reference_ops  # noqa: E402


def _kernel_module(name: str):
    """Import a kernel module; re-import it if it was decorated before the interpreter was on."""
    full = f"qwen2vl.kernels.{name}"
    return importlib.reload(sys.modules[full]) if full in sys.modules else importlib.import_module(full)


triton_awq = _kernel_module("triton_awq")
triton_attention = _kernel_module("triton_attention")
triton_norm = _kernel_module("triton_norm")
triton_rotary = _kernel_module("triton_rotary")
triton_activation = _kernel_module("triton_activation")
triton_moe = _kernel_module("triton_moe")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter keeps bfloat16 as raw uint16 words: its dots multiply the words and its
# float32 -> bfloat16 casts do not round to nearest. bfloat16 is checked on the GPU only; float16
# runs the same code paths here.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the Triton interpreter does not emulate bfloat16 (checked on the GPU)"))
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def assert_rounding_apart(out: torch.Tensor, expected: torch.Tensor, scale: float, steps: float = 1) -> None:
    """Bitwise equal under the interpreter (numpy rounds each op as torch does); on a GPU, where
    the compiler contracts a*b+c into one rounding and orders sums its own way, at most `steps`
    rounding steps of the dtype apart at the operands' `scale`."""
    if DEVICE == "cpu":
        assert torch.equal(out, expected)
        return
    diff = (out.double() - expected.double()).abs()
    bound = steps * ULP[out.dtype] * (expected.double().abs() + scale)
    worst = float((diff / (expected.double().abs() + scale)).max()) / ULP[out.dtype]
    assert (diff <= bound).all(), f"{int((diff > bound).sum())}/{diff.numel()} apart by more than {steps} steps (worst {worst:.2f})"


def _random_awq(k: int, n: int, group_size: int, generator: torch.Generator):
    values = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=generator, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=generator) * 0.02 + 0.005).half()
    return values, zeros, scales


def test_awq_pack_is_the_checkpoint_layout():
    generator = torch.Generator().manual_seed(0)
    values, zeros, scales = _random_awq(128, 48, 32, generator)
    qweight, qzeros, packed_scales = triton_awq.pack(values, scales, zeros)
    assert torch.equal(qweight, q.pack_awq(values.t()))
    assert torch.equal(q.unpack_awq(qzeros), zeros)
    groups = torch.arange(128) // 32
    expected = (values - zeros.t()[:, groups]).float() * scales.float().t()[:, groups]
    assert torch.equal(q.dequantize_awq(qweight, qzeros, packed_scales, 32), expected)


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("m, config", [
    (1, None),  # decode default: split-K
    (5, triton_awq.MatmulConfig(16, 32, 32, split_k=3)),  # uneven split of 8 K tiles
    (16, triton_awq.MatmulConfig(16, 64, 64, split_k=1)),
    (3, triton_awq.MatmulConfig(4, 32, 64, split_k=2, gather=True)),  # CUDA-core products, gathered words
    (33, triton_awq.MatmulConfig(32, 64, 32, split_k=1, gather=True)),
    (1, triton_awq.MatmulConfig(1, 64, 32, split_k=3, gemv=True)),  # one row: the GEMV kernel, N tail masked
    (1, triton_awq.MatmulConfig(1, 256, 64, split_k=1, gemv=True)),  # bias fused, most words masked
    (1, triton_awq.MatmulConfig(1, 64, 32, split_k=3, gemv=True, prefetch=True)),  # next K tile loaded ahead
    (40, None),  # prefill default: tiled GEMM, M and N tails masked
    (triton_awq.DEQUANTIZE_MIN_M + 3, None),  # many rows: the weight dequantized once, then cuBLAS
])
def test_awq_matmul_matches_reference(m, config, dtype):
    generator = torch.Generator().manual_seed(m)
    k, n, group_size = 256, 96, 64
    values, zeros, scales = _random_awq(k, n, group_size, generator)
    qweight, qzeros, scales = (t.to(DEVICE) for t in triton_awq.pack(values, scales, zeros))
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    bias = (torch.randn(n, generator=generator) * 0.1).to(DEVICE, dtype)
    for b in (None, bias):
        out = triton_awq.awq_matmul(x, qweight, qzeros, scales, group_size, b, config=config)
        # The GEMV multiplies by the exact weight, the other launches by the weight rounded to x's dtype.
        expected = reference_ops.awq_matmul_reference(x, qweight, qzeros, scales, group_size, b,
                                                      exact_weight=config is not None and config.gemv)
        assert out.shape == (m, n) and out.dtype == dtype
        # Same products, float32 sums in another order: at most a rounding step of the output apart.
        torch.testing.assert_close(out.float(), expected.float(), rtol=ULP[dtype], atol=ULP[dtype] * 0.25)


@pytest.mark.parametrize("config", [
    triton_awq.MatmulConfig(16, 32, 32, split_k=3, reduce_in_kernel=True),  # uneven split of 8 K tiles
    triton_awq.MatmulConfig(1, 64, 32, split_k=5, gemv=True, reduce_in_kernel=True),
])
def test_split_sums_reduced_in_kernel_are_the_separate_reduction(config):
    """The last program of each tile sums the partials: bitwise what the separate reduction gives,
    bias included, and the per-tile counters are left zeroed for the next launch."""
    generator = torch.Generator().manual_seed(9)
    k, n, group_size = 256, 96, 64
    values, zeros, scales = _random_awq(k, n, group_size, generator)
    packed = [t.to(DEVICE) for t in triton_awq.pack(values, scales, zeros)]
    x = torch.randn(1, k, generator=generator).to(DEVICE, torch.float16)
    bias = (torch.randn(n, generator=generator) * 0.1).to(DEVICE, torch.float16)
    separate = dataclasses.replace(config, reduce_in_kernel=False)
    for b in (None, bias):
        for _ in range(2):  # the second launch finds the counters as the first left them
            out = triton_awq.awq_matmul(x, *packed, group_size, b, config=config)
            assert torch.equal(out, triton_awq.awq_matmul(x, *packed, group_size, b, config=separate))
    assert not triton_awq._split_counter_buffer(x.device).any()


@pytest.mark.parametrize("dtype", [torch.float16, BF16, torch.float32])
def test_dequantize_is_bitwise_the_reference(dtype):
    generator = torch.Generator().manual_seed(7)
    k, n, group_size = 256, 200, 64  # N not a multiple of the kernel's column block
    values, zeros, scales = _random_awq(k, n, group_size, generator)
    packed = [t.to(DEVICE) for t in triton_awq.pack(values, scales, zeros)]
    weight = triton_awq.dequantize(*packed, group_size, dtype)
    assert torch.equal(weight, q.dequantize_awq(*packed, group_size).t().to(dtype))


def test_awq_matmul_keeps_leading_dims_and_rejects_bad_tiles():
    generator = torch.Generator().manual_seed(1)
    values, zeros, scales = _random_awq(128, 64, 128, generator)
    packed = [t.to(DEVICE) for t in triton_awq.pack(values, scales, zeros)]
    x = torch.randn(2, 3, 128, generator=generator).to(DEVICE, torch.float16)
    out = triton_awq.awq_matmul(x, *packed, 128)
    torch.testing.assert_close(out, reference_ops.awq_matmul_reference(x, *packed, 128), rtol=2**-10, atol=2**-12)
    with pytest.raises(ValueError, match="block_k 96"):
        triton_awq.awq_matmul(x, *packed, 128, config=triton_awq.MatmulConfig(16, 64, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_qkv_rotary_cache_matches_the_reference(dtype):
    generator = torch.Generator().manual_seed(8)
    num_heads, num_kv_heads, head_dim, tokens, block_size = 6, 2, 64, 5, 4
    width = (num_heads + 2 * num_kv_heads) * head_dim
    positions = torch.randint(0, 500, (3, tokens), generator=generator).to(DEVICE)
    cos, sin = MRotaryEmbedding(head_dim, 1e6, (8, 12, 12)).cos_sin(positions, dtype)
    kv_cache = torch.randn(2, 4, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    slots = torch.tensor([9, 0, -1, 15, 4], device=DEVICE)  # -1: a padding row writes nowhere
    qkv = torch.randn(tokens, width, generator=generator).to(DEVICE, dtype)
    expected_cache = kv_cache.clone()
    expected_q = reference_ops.qkv_rotary_cache_reference(qkv, cos, sin, expected_cache, slots,
                                                          num_heads, num_kv_heads)
    q = triton_rotary.qkv_rotary_cache(qkv, cos, sin, kv_cache, slots, num_heads, num_kv_heads)
    scale = float(qkv.abs().max())
    assert_rounding_apart(q, expected_q, scale)
    assert_rounding_apart(kv_cache, expected_cache, scale)


def _paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, generator):
    """A cache with random contents and shuffled, -1-padded block tables for these sequences."""
    blocks_per_seq = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE, dtype)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(blocks_per_seq) + 2  # wider than needed, as a CUDA graph's static table is
    tables, used = [], 0
    for count in blocks_per_seq:
        tables.append(order[used:used + count] + [-1] * (width - count))
        used += count
    return kv_cache, torch.tensor(tables, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype, block_size", [(torch.float32, 16), (torch.float16, 5), pytest.param(torch.bfloat16, 16, marks=BF16.marks)])
def test_paged_decode_attention_matches_reference(dtype, block_size):
    generator = torch.Generator().manual_seed(2)
    num_heads, num_kv_heads, head_dim = 6, 2, 64
    context_lens = [1, 37, 300]
    kv_cache, block_tables = _paged_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, generator)
    query = torch.randn(len(context_lens), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    # Partitions of 128 tokens in steps of 32: 300 tokens take three partitions, the last partial.
    out = triton_attention.paged_decode_attention(query, kv_cache, block_tables, lens, scale,
                                                  partition_size=128, block_tokens=32)
    expected = reference_ops.paged_decode_attention_reference(query, kv_cache, block_tables, lens, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 4 * ULP[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)

    padded_lens = torch.tensor(context_lens[:2] + [0], dtype=torch.int32, device=DEVICE)  # a padding row
    padded = triton_attention.paged_decode_attention(query, kv_cache, block_tables, padded_lens, scale,
                                                     partition_size=128, block_tokens=32)
    assert torch.equal(padded[:2], out[:2]) and not padded[2].any()
    assert not triton_attention._merge_counters(query.device).any()  # left zeroed for the next launch

    # The decoder's attention layer, restricted to decode steps: from the qkv projection, rotary +
    # KV write and this kernel on CUDA in fp16/bf16 (a chunk with more than one new token goes
    # back to the torch path), torch elsewhere.
    from qwen2vl import kernels

    qkv = torch.randn(len(context_lens), (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    assert kernels.decode_attention_runs(qkv, [1] * 3, head_dim) == (DEVICE == "cuda" and dtype != torch.float32)
    assert not kernels.decode_attention_runs(qkv, [1, 2, 1], head_dim)
    slots = [block_tables[b, (n - 1) // block_size].item() * block_size + (n - 1) % block_size
             for b, n in enumerate(context_lens)]
    slot_mapping = torch.tensor(slots, device=DEVICE)
    positions = torch.tensor(context_lens, device=DEVICE).expand(3, -1) - 1
    cos, sin = MRotaryEmbedding(head_dim, 10000.0, (8, 12, 12)).cos_sin(positions, dtype)
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(len(context_lens) + 1, dtype=torch.int32, device=DEVICE), context_lens=lens,
        slot_mapping=slot_mapping, block_tables=block_tables, query_lens_cpu=[1] * len(context_lens),
        context_lens_cpu=context_lens, block_size=block_size)
    layer_cache = kv_cache.clone()
    layer_out = PagedAttention(num_heads, num_kv_heads, head_dim)(qkv, cos, sin, layer_cache, metadata)
    expected_cache = kv_cache.clone()
    q = reference_ops.qkv_rotary_cache_reference(qkv, cos, sin, expected_cache, slot_mapping, num_heads, num_kv_heads)
    expected = reference_ops.paged_decode_attention_reference(q, expected_cache, block_tables, lens, scale)
    torch.testing.assert_close(layer_cache.float(), expected_cache.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(layer_out.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_add_rms_norm_matches_layer(dtype):
    generator = torch.Generator().manual_seed(3)
    hidden = 96  # not a power of 2: the row tail is masked
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    norm.weight.copy_(torch.rand(hidden, generator=generator) + 0.5)
    x = (torch.randn(5, hidden, generator=generator) * 3).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=generator).to(DEVICE, dtype)

    # float32 on a GPU: the kernel's 1/sqrt is the fast approximate one, a few steps off torch's rsqrt.
    rtol = (8 if dtype == torch.float32 and DEVICE == "cuda" else 2) * ULP[dtype]
    expected = reference_ops.add_rms_norm_reference(x, norm.weight, norm.eps)
    if DEVICE == "cpu":  # the layer's own torch path is the reference's math
        assert torch.equal(norm(x), expected)
    out = triton_norm.add_rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=0)
    # The layer: this kernel on CUDA in fp16/bf16, torch elsewhere.
    torch.testing.assert_close(norm(x), expected, rtol=rtol, atol=0)
    out, summed = triton_norm.add_rms_norm(x, norm.weight, norm.eps, residual)
    ref_out, ref_summed = reference_ops.add_rms_norm_reference(x, norm.weight, norm.eps, residual)
    assert torch.equal(summed, x + residual) and torch.equal(ref_summed, summed)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_rotary_qk_in_place_matches_the_reference(dtype):
    generator = torch.Generator().manual_seed(4)
    num_heads, num_kv_heads, head_dim, tokens = 6, 2, 64, 7
    rotary = MRotaryEmbedding(head_dim, 1e6, (8, 12, 12))
    positions = torch.randint(0, 500, (3, tokens), generator=generator).to(DEVICE)
    cos, sin = rotary.cos_sin(positions, dtype)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    q_part, k_part, v_part = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q_view, k_view = q_part.unflatten(-1, (num_heads, head_dim)), k_part.unflatten(-1, (num_kv_heads, head_dim))
    expected_q, expected_k = apply_rotary(q_view, cos, sin), apply_rotary(k_view, cos, sin)
    v_before = v_part.clone()

    triton_rotary.apply_rotary_qk_(q_view, k_view, cos, sin)
    scale = float(qkv.abs().max())
    assert_rounding_apart(q_view, expected_q, scale)
    assert_rounding_apart(k_view, expected_k, scale)
    assert torch.equal(v_part, v_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_silu_and_mul_matches_layer(dtype):
    generator = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(2, 3, 2 * 1100, generator=generator) * 4).to(DEVICE, dtype)  # two column blocks
    out = triton_activation.silu_and_mul(gate_up)
    assert out.shape == (2, 3, 1100)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up  # the layer's torch path
    # float32: exp and the division round differently from torch by a few units in the last place
    # (more on a GPU, whose exp and division are the fast approximate instructions).
    float32_steps = 4 if DEVICE == "cpu" else 8
    tolerance = dict(rtol=max(2 * ULP[dtype], float32_steps * ULP[torch.float32]), atol=1e-9)
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(silu_and_mul(gate_up), expected, **tolerance)  # the layer: this kernel on CUDA


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("kind", ["awq", "gptq", "gptq-act-order"])
def test_int4_linear_on_the_triton_backend_equals_the_dequantized_layer(kind, dtype):
    """What the loader swaps in on CUDA: checkpoint layouts packed for Triton, the layer's call."""
    from qwen2vl import kernels
    from qwen2vl.layers.linear import Int4Linear
    from test_kernels_int4 import awq_linear, gptq_linear

    k, g = 128, 32
    if kind == "awq":
        source = awq_linear(64, k, g, seed=21)
    else:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(4)) if kind == "gptq-act-order" else torch.arange(k)
        source = gptq_linear(48, k, g, seed=22, g_idx=(order // g).int())
    source = source.to(DEVICE)
    if source.bias is not None:
        source.bias.data = source.bias.data.to(dtype)
    assert Int4Linear.backend_for(source, dtype, wanted=None if DEVICE == "cuda" else "triton") == "triton"
    assert kernels.int4_backend(source.qweight.device, torch.float32, 64, k, g, "triton") is None
    fast = Int4Linear(source, "triton")
    assert fast.backend == "triton" and (fast.input_order is not None) == (kind == "gptq-act-order")
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    expected = x.float() @ source.dequantized().to(dtype).float().t()
    if source.bias is not None:
        expected += source.bias.float()
    out = fast(x)
    assert out.dtype == dtype and out.shape == (3, source.out_features)
    torch.testing.assert_close(out.float(), expected, rtol=4 * ULP[dtype], atol=4 * ULP[dtype] * expected.abs().max().item())


@pytest.fixture(scope="module")
def tiny_awq_checkpoint(tmp_path_factory):
    from checkpoints import reference_config
    from qwen2vl.tools.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(reference_config("a").to_dict(), tmp_path_factory.mktemp("awq"), dtype="fp16",
                                   quant="awq", group_size=32)


def test_loader_swaps_quantized_linears_for_the_named_backend(tiny_awq_checkpoint):
    from qwen2vl.layers.linear import Int4Linear
    from qwen2vl.loader import load_model

    model = load_model(tiny_awq_checkpoint, device=DEVICE, dtype=torch.bfloat16, int4_kernel="triton")
    swapped = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert swapped and all(m.backend == "triton" for m in swapped)
    assert {"qweight", "qzeros", "scales"} <= {name for name, _ in swapped[0].named_buffers()}


def test_the_gpu_path_generates_what_the_torch_path_does(tiny_awq_checkpoint, monkeypatch):
    """Everything a CUDA decode runs in Triton, together in one model: int4 linears, residual-add +
    RMSNorm, rotary q/k (prefill), SwiGLU, rotary with the KV write and paged decode attention. Greedy tokens and their
    log-probabilities equal the torch path's (whose int4 linears are the same Triton ones)."""
    from PIL import Image

    from qwen2vl import kernels
    from qwen2vl.api import Qwen2VL
    from qwen2vl.engine import LLMEngine
    from qwen2vl.loader import load_model
    from qwen2vl.processor import Processor

    processor = Processor.from_pretrained(tiny_awq_checkpoint)
    image = Image.new("RGB", (56, 84), (200, 30, 30))
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}],
                     [{"role": "user", "content": "Count to three."}]]

    launches = collections.Counter()

    def counted(name):
        kernel = getattr(kernels, name)

        def call(*args, **kwargs):
            launches[name] += 1
            return kernel(*args, **kwargs)
        return call

    def generate(all_triton: bool):
        with monkeypatch.context() as patch:
            if all_triton:  # on the CPU the interpreter stands in for the GPU
                patch.setattr(kernels, "triton_runs", lambda x: x.dtype in kernels.TRITON_DTYPES)
                for name in ("rms_norm", "rotary_qk_", "silu_and_mul", "qkv_decode_attention"):
                    patch.setattr(kernels, name, counted(name))
            model = load_model(tiny_awq_checkpoint, device=DEVICE, dtype=torch.bfloat16, int4_kernel="triton")
            if DEVICE == "cpu":  # the interpreter does not emulate bfloat16 (see BF16)
                model.half()
            llm = Qwen2VL(LLMEngine(model, processor, num_kv_blocks=64), processor, tiny_awq_checkpoint)
            return llm.chat(conversations, temperature=0.0, repetition_penalty=1.0, max_tokens=6, logprobs=1)

    fast, torch_path = generate(True), generate(False)
    assert set(launches) == {"rms_norm", "rotary_qk_", "silu_and_mul", "qkv_decode_attention"}
    for ours, reference in zip(fast, torch_path):
        assert ours.token_ids == reference.token_ids
        chosen = [step[token] for step, token in zip(ours.logprobs, ours.token_ids)]
        expected = [step[token] for step, token in zip(reference.logprobs, reference.token_ids)]
        torch.testing.assert_close(torch.tensor(chosen), torch.tensor(expected), rtol=0, atol=0.05)
    assert all(len(set(c.token_ids)) > 3 for c in fast)  # not one repeated token


def test_decode_steps_replayed_from_cuda_graphs_generate_what_eager_steps_do(tiny_awq_checkpoint, monkeypatch):
    """Three requests of different lengths and output budgets: the batch shrinks from 3 (the
    bucket of 4, one padding row) to 2 to 1 as they finish. Greedy tokens and log-probs through
    the static padded batches of `engine.cuda_graphs` (captured on a GPU, run eagerly on the CPU)
    equal the eager steps', also when each step is launched before the last one's tokens are
    read back (`run_ahead`: the graphs take their input tokens from the device)."""
    from qwen2vl import kernels
    from qwen2vl.engine import LLMEngine
    from qwen2vl.engine.cuda_graphs import graph_batch_sizes
    from qwen2vl.loader import load_model
    from qwen2vl.processor import Processor
    from qwen2vl.sampling_params import SamplingParams

    assert graph_batch_sizes(1) == [1] and graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    processor = Processor.from_pretrained(tiny_awq_checkpoint)
    prompts = [processor.prepare([{"role": "user", "content": text}])
               for text in ("Count to three.", "Name a colour, then another one, then a third.", "Hi")]
    budgets = (9, 5, 3)

    def generate(graphs: bool, run_ahead: bool = False):
        with monkeypatch.context() as patch:
            if DEVICE == "cpu":  # the interpreter stands in for the GPU
                patch.setattr(kernels, "triton_runs", lambda x: x.dtype in kernels.TRITON_DTYPES)
            model = load_model(tiny_awq_checkpoint, device=DEVICE, dtype=torch.bfloat16, int4_kernel="triton")
            if DEVICE == "cpu":
                model.half()
            engine = LLMEngine(model, processor, max_model_len=256, num_kv_blocks=64, max_num_seqs=8, cuda_graphs=graphs,
                               run_ahead=run_ahead)
            assert (engine.runner.graphs is not None) == graphs
            replays = collections.Counter()
            if graphs:
                run = engine.runner.graphs.run

                def counted(inputs):
                    replays[len(inputs.query_lens), inputs.pending is not None] += 1
                    return run(inputs)
                patch.setattr(engine.runner.graphs, "run", counted)
            ids = [engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, logprobs=1, ignore_eos=True))
                   for prompt, n in zip(prompts, budgets)]
            outputs = {}
            while engine.has_unfinished():
                for output in engine.step():
                    outputs[output.request_id] = output
            return [outputs[i] for i in ids], replays

    (graphed, replays), (eager, _) = generate(True), generate(False)
    (ahead, replays_ahead) = generate(True, run_ahead=True)
    assert replays == {(3, False): budgets[2] - 1, (2, False): budgets[1] - budgets[2], (1, False): budgets[0] - budgets[1]}
    # Running ahead, every decode step takes its tokens from the device, but the first after a
    # step that ends a sequence by length (that one is read back first: no wasted row).
    assert replays_ahead == {(3, True): budgets[2] - 1, (2, False): 1, (2, True): budgets[1] - budgets[2] - 1,
                             (1, False): 1, (1, True): budgets[0] - budgets[1] - 1}
    for outputs in (graphed, ahead):
        for ours, reference in zip(outputs, eager):
            assert ours.token_ids == reference.token_ids
            chosen = [step[token] for step, token in zip(ours.logprobs, ours.token_ids)]
            expected = [step[token] for step, token in zip(reference.logprobs, reference.token_ids)]
            torch.testing.assert_close(torch.tensor(chosen), torch.tensor(expected), rtol=0, atol=1e-3)
    assert len({tuple(c.token_ids) for c in graphed}) == 3


triton_int8 = _kernel_module("triton_int8")


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("m", [1, 5, 40])  # one row on the CUDA cores; 16- and 64-row tensor-core tiles
def test_int8_matmul_matches_reference(m, dtype):
    from qwen2vl.kernels import int8_cpu

    generator = torch.Generator().manual_seed(m)
    k, n = 100, 200  # N and K not multiples of the blocks
    values, scales = int8_cpu.quantize_rows(torch.randn(n, k, generator=generator), dtype)
    values[0, :4] = torch.tensor([-128, -127, 127, 0], dtype=torch.int8)  # both ends of the int8 range
    x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
    out = triton_int8.int8_matmul(x, values.to(DEVICE), scales.to(DEVICE))
    expected = int8_cpu.int8_matmul_reference(x, values.to(DEVICE), scales.to(DEVICE))
    assert out.shape == (m, n) and out.dtype == dtype
    # Exact products, float32 sums in another order, the scale applied after the sum instead of
    # to each weight: at most a rounding step of the output apart.
    torch.testing.assert_close(out.float(), expected.float(), rtol=ULP[dtype], atol=ULP[dtype] * 0.25)


def test_a_mixed_steps_decode_rows_take_one_triton_launch(tiny_awq_checkpoint, monkeypatch):
    """Requests added while others decode make mixed steps (new prompts beside decode rows): the
    decode rows go to the Triton paged decode attention together, the prompts to SDPA. Greedy
    tokens equal the torch path's, log-probs within 0.05 (float16)."""
    from qwen2vl import kernels
    from qwen2vl.engine import LLMEngine
    from qwen2vl.loader import load_model
    from qwen2vl.processor import Processor
    from qwen2vl.sampling_params import SamplingParams

    processor = Processor.from_pretrained(tiny_awq_checkpoint)
    prompts = [processor.prepare([{"role": "user", "content": text}])
               for text in ("Count to three.", "Name two colours.", "Hi", "What is a square?")]
    batched = []

    def generate(all_triton: bool):
        with monkeypatch.context() as patch:
            if all_triton:
                patch.setattr(kernels, "triton_runs", lambda x: x.dtype in kernels.TRITON_DTYPES)
                decode = kernels.paged_decode_attention
                patch.setattr(kernels, "paged_decode_attention",
                              lambda query, *args: batched.append(query.shape[0]) or decode(query, *args))
            model = load_model(tiny_awq_checkpoint, device=DEVICE, dtype=torch.bfloat16, int4_kernel="triton")
            if DEVICE == "cpu":
                model.half()
            engine = LLMEngine(model, processor, num_kv_blocks=64, cuda_graphs=False, run_ahead=False)
            params = SamplingParams(max_tokens=10, temperature=0, logprobs=1, ignore_eos=True)
            ids, outputs = [], {}
            for prompt in prompts:  # one more request every two steps: each joins the others' decoding
                ids.append(engine.add_request(prompt, params))
                for _ in range(2):
                    outputs.update((o.request_id, o) for o in engine.step())
            while engine.has_unfinished():
                outputs.update((o.request_id, o) for o in engine.step())
            return [outputs[i] for i in ids]

    fast, torch_path = generate(True), generate(False)
    # mixed steps: 1, 2 and 3 sequences decoding beside a new prompt (pure decode steps take
    # `qkv_decode_attention` instead)
    assert sorted(set(batched)) == [1, 2, 3]
    for ours, reference in zip(fast, torch_path):
        assert ours.token_ids == reference.token_ids
        chosen = [step[token] for step, token in zip(ours.logprobs, ours.token_ids)]
        expected = [step[token] for step, token in zip(reference.logprobs, reference.token_ids)]
        torch.testing.assert_close(torch.tensor(chosen), torch.tensor(expected), rtol=0, atol=0.05)


def _routed_rows(num_experts: int, counts: list[int], num_tokens: int, generator: torch.Generator):
    """`offsets [E + 1]` of rows sorted by expert with these counts, and each row's source token."""
    offsets = torch.tensor([0, *counts]).cumsum(0)
    rows = torch.randint(0, num_tokens, (sum(counts),), generator=generator)
    assert len(counts) == num_experts
    return offsets, rows


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("counts, gather", [
    ([3, 0, 5, 1], True),  # decode-sized: 16-row tiles, an expert without rows
    ([0, 17, 2, 0], False),  # an expert's rows over two tiles
    ([40, 33], True),  # many rows per expert: 64-row tiles, row tails masked
])
def test_moe_grouped_matmul_matches_the_layer(counts, gather, dtype):
    from qwen2vl.layers.moe import grouped_matmul

    generator = torch.Generator().manual_seed(sum(counts))
    num_experts, n, k, num_tokens = len(counts), 96, 40, 11  # N and K tails masked
    offsets, rows = _routed_rows(num_experts, counts, num_tokens, generator)
    a = torch.randn(num_tokens if gather else sum(counts), k, generator=generator)
    weight = torch.randn(num_experts, n, k, generator=generator) * 0.2
    a, weight, offsets, rows = a.to(DEVICE, dtype), weight.to(DEVICE, dtype), offsets.to(DEVICE), rows.to(DEVICE)
    out = triton_moe.grouped_matmul(a, weight, offsets, rows if gather else None)
    # Same products, float32 sums in another order: at most a rounding step of the output apart.
    expected = grouped_matmul(a.float(), weight.float(), offsets, rows if gather else None).to(dtype)
    assert out.shape == (sum(counts), n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=ULP[dtype], atol=ULP[dtype] * 0.25)


def test_sparse_moe_block_on_the_triton_path_equals_the_torch_path(monkeypatch):
    """The block's own choice of path: the grouped kernel (and SwiGLU's) where `triton_runs`, the
    per-expert torch loop elsewhere; one launch per matmul, whatever the routing. Same routing
    (the router is torch's on both), same float16 roundings: a rounding step of the output apart."""
    from qwen2vl import kernels
    from qwen2vl.config import MoEConfig
    from qwen2vl.layers.moe import SparseMoeBlock

    generator = torch.Generator().manual_seed(4)
    block = SparseMoeBlock(64, MoEConfig(8, 3, 48))
    for param in block.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    block.to(DEVICE, torch.float16)
    x = torch.randn(2, 13, 64, generator=generator).to(DEVICE, torch.float16)
    launches = []
    grouped = kernels.moe_grouped_matmul
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "triton_runs", lambda t: t.dtype in kernels.TRITON_DTYPES)
        patch.setattr(kernels, "moe_grouped_matmul", lambda *args, **kw: launches.append(1) or grouped(*args, **kw))
        fast = block(x)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "triton_runs", lambda t: False)
        reference = block(x)
    assert len(launches) == 2 and fast.shape == x.shape and fast.dtype == torch.float16
    scale = float(reference.abs().max())
    torch.testing.assert_close(fast, reference, rtol=2 * ULP[torch.float16], atol=ULP[torch.float16] * scale)
    assert reference.abs().mean() > 0.01 * scale  # not a few large outputs among zeros
