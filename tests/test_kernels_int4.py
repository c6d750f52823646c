"""The CPU int4 kernel against its pure-torch reference, and the checkpoint layouts converted to it."""
from __future__ import annotations

import types

import pytest
import torch

import reference_ops
from qwen2vl import kernels
from qwen2vl.kernels import int4_cpu
from qwen2vl.layers import quantization as q
from qwen2vl.layers.linear import AWQLinear, GPTQLinear, Int4Linear, Linear
from qwen2vl.loader import int8_vocabulary

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="this torch has no CPU int4 kernel")


def random_layout(n: int, k: int, group_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.001).half()
    return values, zeros, scales


def rows_of(values: torch.Tensor):
    return lambda start, end: values[start:end]


def bf16_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# 2048 and 1040 rows: packed in more than one block of rows, 1040 with a short last block.
# DEQUANTIZE_MIN_ROWS inputs: the unpacked weight and a dense product (1040: not whole tiles,
# the kernel).
@pytest.mark.parametrize("n,k,group_size,rows", [(16, 32, 32, 1), (128, 64, 32, 5), (2048, 1536, 128, 3),
                                                 (1040, 64, 32, 2), (96, 256, 64, 1), (48, 512, 256, 7),
                                                 (192, 256, 64, int4_cpu.DEQUANTIZE_MIN_ROWS),
                                                 (1040, 64, 32, int4_cpu.DEQUANTIZE_MIN_ROWS + 1)])
def test_kernel_equals_reference(n, k, group_size, rows):
    values, zeros, scales = random_layout(n, k, group_size, seed=n + k)
    weight = kernels.pack_int4("cpu", rows_of(values), scales, zeros)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    y = kernels.int4_linear("cpu", x, weight, group_size)
    expected = reference_ops.int4_matmul_reference(x, values, weight["scales_and_zeros"], group_size)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    # Same bf16 inputs on both sides; the kernel rounds its output to bf16 (2^-9 relative).
    assert bf16_relative_error(y, expected) < 4e-3
    assert torch.allclose(y, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.skipif(not int4_cpu.converter_writes_64_row_tiles(), reason="this CPU's int4 layout has other tiles")
@pytest.mark.parametrize("n,k,group_size", [(64, 32, 32), (2048, 1536, 128), (192, 512, 256)])
def test_unpacked_weight_is_the_layouts_weight_rounded_once(n, k, group_size):
    values, zeros, scales = random_layout(n, k, group_size, seed=n)
    weight = kernels.pack_int4("cpu", rows_of(values), scales, zeros)
    unpacked = int4_cpu.dequantize_packed(weight["packed"], weight["scales_and_zeros"], group_size)
    expected = reference_ops.int4_cpu_dequantize(values, weight["scales_and_zeros"], group_size).to(torch.bfloat16).t()
    assert unpacked.dtype == torch.bfloat16 and torch.equal(unpacked, expected)


def test_kernel_keeps_leading_dims_and_dtype():
    values, zeros, scales = random_layout(32, 64, 32, seed=3)
    weight = kernels.pack_int4("cpu", rows_of(values), scales, zeros)
    x = torch.randn(2, 3, 64).bfloat16()
    y = kernels.int4_linear("cpu", x, weight, 32)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    flat = kernels.int4_linear("cpu", x.reshape(6, 64), weight, 32)
    assert torch.equal(y.reshape(6, 32), flat)


def test_zero_point_maps_to_offset():
    """`(q - z) * s == (q - 8) * s + (8 - z) * s`: the layout stands for the checkpoint's weight."""
    values, zeros, scales = random_layout(64, 128, 32, seed=5)
    scales_and_zeros = kernels.pack_int4("cpu", rows_of(values), scales, zeros)["scales_and_zeros"]
    exact = ((values.float() - zeros.float().repeat_interleave(32, 0).t())
             * scales.float().repeat_interleave(32, 0).t())
    # Hand check of one element, then all within the bf16 rounding of scale and offset.
    n, k = 3, 70
    s, z = scales[k // 32, n].float(), zeros[k // 32, n].float()
    assert torch.isclose(exact[n, k], (values[n, k] - z) * s)
    assert bf16_relative_error(reference_ops.int4_cpu_dequantize(values, scales_and_zeros, 32), exact) < 4e-3


def test_supported_shapes():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert kernels.int4_backend(cpu, bf16, 2048, 1536, 128) == "cpu"
    assert kernels.int4_backend(cpu, torch.float32, 2048, 1536, 128) == "cpu"  # activations cast around it
    assert kernels.int4_backend(cpu, bf16, 24, 64, 32) is None  # N not a multiple of 16
    assert kernels.int4_backend(cpu, bf16, 32, 64, 16) is None  # group size the kernel lacks
    assert kernels.int4_backend(torch.device("meta"), bf16, 2048, 1536, 128) is None  # no kernel there
    with pytest.raises(ValueError, match="unknown int4 backend 'cuda'"):
        kernels.int4_backend(cpu, bf16, 2048, 1536, 128, wanted="cuda")


@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
def test_triton_backend_by_name_or_on_cuda(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def on_gpu(capability):  # what the Triton paths decide on a GPU of this compute capability
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        kernels.triton_gpu_dtype.cache_clear()

    on_gpu((9, 0))  # H100
    assert kernels.int4_backend(cuda, torch.bfloat16, 2048, 1536, 128) == "triton"
    assert kernels.int4_backend(cuda, torch.float16, 24, 64, 32) == "triton"  # N a multiple of 8 is enough
    assert kernels.int4_backend(cuda, torch.float32, 2048, 1536, 128) is None  # float32 stays dequantized
    assert kernels.cuda_graphs_run(cuda, torch.bfloat16, 128) and not kernels.cuda_graphs_run(cuda, torch.float32, 128)
    # the vocabulary as int8 rows: where the 4-bit linears run on Triton
    four_bit, dense = types.SimpleNamespace(four_bit=True), types.SimpleNamespace(four_bit=False)
    assert int8_vocabulary(four_bit, cuda, torch.bfloat16, True) and int8_vocabulary(four_bit, cuda, torch.bfloat16, "triton")
    assert not int8_vocabulary(four_bit, cuda, torch.bfloat16, "cpu") and not int8_vocabulary(dense, cuda, torch.bfloat16, True)
    assert not int8_vocabulary(four_bit, cuda, torch.float32, False)
    on_gpu((7, 5))  # T4: Triton has no bfloat16 there, so bfloat16 models keep the torch paths
    assert kernels.int4_backend(cuda, torch.bfloat16, 2048, 1536, 128) is None
    assert kernels.int4_backend(cuda, torch.float16, 2048, 1536, 128) == "triton"
    assert not kernels.cuda_graphs_run(cuda, torch.bfloat16, 128) and kernels.cuda_graphs_run(cuda, torch.float16, 128)
    assert not int8_vocabulary(four_bit, cuda, torch.bfloat16, True)
    kernels.triton_gpu_dtype.cache_clear()
    assert kernels.int4_backend(cpu, torch.float16, 2048, 1536, 128, wanted="triton") == "triton"  # interpreter


def filled(module, **tensors):
    for name, tensor in tensors.items():
        setattr(module, name, tensor)
    return module


def awq_linear(n, k, group_size, seed, bias=True):
    values, zeros, scales = random_layout(n, k, group_size, seed)
    with torch.device("meta"):
        module = AWQLinear(Linear(k, [n // 2, n // 2], bias=bias), 4, group_size)
    bias_tensor = torch.nn.Parameter(torch.randn(n), requires_grad=False) if bias else None
    return filled(module, qweight=q.pack_awq(values.t()), qzeros=q.pack_awq(zeros), scales=scales, bias=bias_tensor)


def gptq_linear(n, k, group_size, seed, bits=4, g_idx=None):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits - 1, (k // group_size, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(k, dtype=torch.int32) // group_size if g_idx is None else g_idx
    with torch.device("meta"):
        module = GPTQLinear(Linear(k, n), bits, group_size, zero_offset=1)
    return filled(module, qweight=q.pack_gptq_rows(values, bits), qzeros=q.pack_gptq_zeros(zeros, bits),
                  scales=scales, g_idx=g_idx, bias=None)


def check_int4_equals_dequantized(source):
    x = torch.randn(4, source.in_features, generator=torch.Generator().manual_seed(9))
    expected = x.bfloat16().float() @ source.dequantized().t()
    if source.bias is not None:
        expected += source.bias
    fast = Int4Linear(source, "cpu")
    assert fast.output_sizes == source.output_sizes and not hasattr(fast, "weight")
    assert bf16_relative_error(fast(x), expected) < 4e-3


def test_awq_linear_converts():
    source = awq_linear(64, 96, 32, seed=11)
    assert Int4Linear.backend_for(source, torch.float32) == "cpu"
    check_int4_equals_dequantized(source)


def test_gptq_linear_converts():
    source = gptq_linear(32, 128, 32, seed=12)
    assert Int4Linear.backend_for(source, torch.float32) == "cpu"
    check_int4_equals_dequantized(source)
    assert Int4Linear(source, "cpu").input_order is None


def test_gptq_act_order_reads_the_input_in_group_order():
    k, g = 128, 32
    g_idx = (torch.randperm(k, generator=torch.Generator().manual_seed(4)) // g).int()
    source = gptq_linear(32, k, g, seed=13, g_idx=g_idx)
    assert Int4Linear.backend_for(source, torch.float32) == "cpu"
    fast = Int4Linear(source, "cpu")
    assert fast.input_order is not None and torch.equal(g_idx[fast.input_order].sort().values, g_idx.sort().values)
    check_int4_equals_dequantized(source)


def test_layers_the_kernel_cannot_run_stay_dequantized():
    assert Int4Linear.backend_for(gptq_linear(32, 128, 32, seed=14, bits=8), torch.bfloat16) is None
    uneven = torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32)
    assert Int4Linear.backend_for(gptq_linear(32, 128, 32, seed=15, g_idx=uneven), torch.bfloat16) is None
    assert Int4Linear.backend_for(awq_linear(24, 64, 32, seed=16), torch.bfloat16) is None  # N = 24


@pytest.mark.parametrize("n,k,group_size", [(64, 32, 32), (1024, 256, 128), (1040, 64, 32)])
def test_awq_columns_pack_to_the_converters_layout(n, k, group_size):
    """AWQ's values unpacked as bytes and packed directly give the bytes torch's converter gives
    (1040 rows, not whole tiles: the converter, as everywhere the direct layout is not this CPU's)."""
    values, zeros, scales = random_layout(n, k, group_size, seed=k)
    qweight = q.pack_awq(values.t())
    assert torch.equal(q.unpack_awq_bytes(qweight), values.t().to(torch.uint8))
    assert torch.equal(q.unpack_awq_bytes(qweight[:, 8:16]), values[64:128].t().to(torch.uint8))
    columns = lambda start, end: q.unpack_awq_bytes(qweight[:, start // 8: end // 8])  # noqa: E731
    direct = kernels.pack_int4("cpu", rows_of(values), scales, zeros, columns=columns)
    converted = kernels.pack_int4("cpu", rows_of(values), scales, zeros)
    assert all(torch.equal(direct[name], converted[name]) for name in converted)
    if int4_cpu.converter_writes_64_row_tiles():
        assert torch.equal(int4_cpu.pack_columns(values.t().to(torch.uint8).contiguous()[:, :64]),
                           torch.ops.aten._convert_weight_to_int4pack_for_cpu(values[:64].contiguous(), 1))
