"""Kernels, and the one place that says which one runs (their pure-torch references, which the
tests check them against, are in tests/reference_ops.py).

Layers call the functions here, never a kernel module directly. On CUDA with fp16/bf16
activations (`triton_runs`), residual-add + RMSNorm, rotary q/k, SwiGLU and each matmul of a
mixture-of-experts MLP's experts (a grouped GEMM) run as single Triton launches, and a batch of
decode steps runs rotary + KV write (one launch) and paged decode attention in Triton.
Two packed 4-bit backends:
`"cpu"` (torch's int4 CPU kernel, `int4_cpu`) and `"triton"` (the W4A16 Triton kernel over the
AWQ layout, `triton_awq`: on CUDA, or on the CPU under `TRITON_INTERPRET=1` when asked for by
name, which is how CI runs it). Where no backend runs a layer (a shape, dtype or format the
kernels lack), `int4_backend` says None and the layer keeps the dequantized reference path.
Block-scaled FP8 weights (`triton_fp8`) run on CUDA devices with FP8 (compute capability 8.9 on:
Ada, Hopper) where `fp8_kernel_runs`; elsewhere they are dequantized at load.
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from qwen2vl.kernels import int4_cpu, int8_cpu

INT4_BACKENDS = ("cpu", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_gpu_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether Triton compiles for `dtype` on this CUDA device: float16 anywhere, bfloat16 from
    compute capability 8.0 (Ampere) on; on a T4 or V100 the torch paths run instead."""
    if dtype not in TRITON_DTYPES or not triton_available():
        return False
    return dtype == torch.float16 or torch.cuda.get_device_capability(device) >= (8, 0)


def triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton elementwise kernels (norm, rotary, SwiGLU) run on `x`: CUDA, fp16/bf16."""
    return x.is_cuda and triton_gpu_dtype(x.device, x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`layers.norm.RMSNorm` (of `x + residual`, returned too, when given) in one Triton launch
    (call where `triton_runs(x)`)."""
    from qwen2vl.kernels import triton_norm

    return triton_norm.add_rms_norm(x, weight, eps, residual)


def rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """`layers.rotary.apply_rotary` on q and k, in place, in one Triton launch (call where
    `triton_runs(q)`; q and k may be views of the fused qkv projection's output)."""
    from qwen2vl.kernels import triton_rotary

    triton_rotary.apply_rotary_qk_(q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`layers.activation.silu_and_mul` in one Triton launch (call where `triton_runs(gate_up)`)."""
    from qwen2vl.kernels import triton_activation

    return triton_activation.silu_and_mul(gate_up)


def moe_grouped_matmul(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """`layers.moe.grouped_matmul` (each expert's rows times its weight) in one Triton launch
    (call where `triton_runs(a)`)."""
    from qwen2vl.kernels import triton_moe

    return triton_moe.grouped_matmul(a, weight, offsets, rows)


def cuda_graphs_run(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether decode steps of a model on `device` with activations in `dtype` can be captured in
    CUDA graphs: where the Triton decode attention runs (the torch path loops on the host)."""
    return device.type == "cuda" and triton_gpu_dtype(device, dtype) and head_dim & (head_dim - 1) == 0


def decode_attention_runs(x: torch.Tensor, attn_query_lens: list[int], head_dim: int) -> bool:
    """Whether a batch's attention runs as Triton paged decode attention: CUDA, fp16/bf16 `x` (the
    qkv projection), one new token per sequence (pure decode), a power-of-2 head size."""
    return triton_runs(x) and max(attn_query_lens) == 1 and head_dim & (head_dim - 1) == 0


def qkv_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         num_heads: int, num_kv_heads: int, scale: float) -> torch.Tensor:
    """`layers.attention.PagedAttention` for a pure-decode batch (call where
    `decode_attention_runs`): q and k rotated and k, v written to the cache in one Triton launch,
    then paged decode attention."""
    from qwen2vl.kernels import triton_attention, triton_rotary

    query = triton_rotary.qkv_rotary_cache(qkv, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads)
    return triton_attention.paged_decode_attention(query, kv_cache, block_tables, context_lens, scale)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence (query `[B, heads, D]`) over its keys and values in the paged
    cache, written already: one Triton launch (call where `decode_attention_runs`). A mixed
    step's decode rows take it (a pure-decode step takes `qkv_decode_attention`)."""
    from qwen2vl.kernels import triton_attention

    return triton_attention.paged_decode_attention(query, kv_cache, block_tables, context_lens, scale)


def own_int4_backend(device: torch.device) -> str | None:
    """The 4-bit backend of `device`'s kind: "triton" on CUDA, "cpu" on the CPU."""
    return {"cuda": "triton", "cpu": "cpu"}.get(device.type)


def int4_backend(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int, group_size: int,
                 wanted: str | None = None) -> str | None:
    """The packed 4-bit backend that runs a linear of this shape on `device` with activations in
    `dtype` (Triton on CUDA, torch's CPU kernel on the CPU), or None. `wanted` names one backend
    (e.g. "triton" on the CPU under the interpreter), None is the device's own."""
    if wanted not in (None, *INT4_BACKENDS):
        raise ValueError(f"unknown int4 backend {wanted!r} (expected one of {', '.join(INT4_BACKENDS)})")
    backend = wanted or own_int4_backend(device)
    triton_here = device.type == "cpu" or (device.type == "cuda" and triton_gpu_dtype(device, dtype))
    if backend == "triton" and triton_available() and dtype in TRITON_DTYPES and triton_here:
        from qwen2vl.kernels import triton_awq

        return backend if triton_awq.supported(out_features, in_features, group_size) else None
    if backend == "cpu" and device.type == "cpu" and int4_cpu.supported(out_features, in_features, group_size):
        return backend
    return None


def pack_int4(backend: str, rows: Callable[[int, int], torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
              reuse: torch.Tensor | None = None,
              columns: Callable[[int, int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """4-bit values `[N, K]` (read as `rows(start, end)`, or where the source has them so as uint8
    `columns(start, end) -> [K, end - start]`), `scales [G, N]`, integer zero points `[G, N]` ->
    the named tensors of `backend`'s layout (the CPU layout is written into `reuse`'s memory where
    it fits)."""
    if backend == "cpu":
        packed, scales_and_zeros = int4_cpu.pack(rows, scales, zeros, reuse, columns)
        return {"packed": packed, "scales_and_zeros": scales_and_zeros}
    from qwen2vl.kernels import triton_awq

    qweight, qzeros, scales = triton_awq.pack(rows(0, scales.shape[1]), scales, zeros)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}


def int4_linear(backend: str, x: torch.Tensor, weight: dict[str, torch.Tensor], group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W^T + bias` for a weight in the layout `pack_int4(backend, ...)` made, in x's dtype."""
    if backend == "cpu":
        y = int4_cpu.int4_matmul(x, weight["packed"], weight["scales_and_zeros"], group_size)
        return y if bias is None else y + bias
    from qwen2vl.kernels import triton_awq

    return triton_awq.awq_matmul(x, weight["qweight"], weight["qzeros"], weight["scales"], group_size, bias)


def int8_rows_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `int8_matmul` runs on `device` for activations in `dtype`: torch's int8 kernel on
    the CPU, Triton on CUDA (fp16/bf16)."""
    if device.type == "cuda":
        return triton_gpu_dtype(device, dtype)
    return device.type == "cpu" and int8_cpu.available()


def int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` -> (int8 values `[N, K]`, one scale per row `[N]` in `scale_dtype`): the
    layout `int8_matmul` reads, on any device."""
    return int8_cpu.quantize_rows(weight, scale_dtype)


def int8_matmul(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ W^T` in x's dtype for int8 rows `values [N, K]` with one scale each (scales in
    x's dtype), where `int8_rows_run`."""
    if x.is_cuda:
        from qwen2vl.kernels import triton_int8

        return triton_int8.int8_matmul(x, values, scales)
    return int8_cpu.int8_matmul(x, values, scales)


def fp8_kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `fp8_block_linear` runs on `device` for activations in `dtype`: CUDA with FP8
    conversions (compute capability 8.9 on), fp16/bf16, Triton installed."""
    return (device.type == "cuda" and triton_gpu_dtype(device, dtype)
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, scale_rows: torch.Tensor,
                     block_cols: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W^T + bias` in x's dtype for block-scaled FP8 weights, `W[n, k] = weight[n, k] *
    scale_inv[scale_rows[n], k // block_cols]` (`layers.linear.FP8Linear`): one Triton launch
    (call where `fp8_kernel_runs`, or on the CPU under `TRITON_INTERPRET=1`)."""
    from qwen2vl.kernels import triton_fp8

    return triton_fp8.fp8_block_matmul(x, weight, scale_inv, scale_rows, block_cols, bias)
