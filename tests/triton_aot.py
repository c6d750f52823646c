"""Compile every Triton kernel, at the launch shapes the real 2B model uses, for Hopper (sm_90)
ahead of time: no GPU needed, so CI catches what the interpreter cannot (layouts, dot shapes,
shared memory over the 227 KiB a Hopper block may use).

    python tests/triton_aot.py   # prints one JSON line per variant, exits 1 if any failed

Run it without TRITON_INTERPRET (tests/test_triton_compile.py starts it in a clean process).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOPPER_SHARED_BYTES = 227 * 1024
# The 2B text model: hidden 1536, intermediate 8960, 12 query / 2 kv heads of 128, AWQ groups of 128.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, GROUP = 1536, 8960, 12, 2, 128, 128
LINEARS = {"qkv": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "o": (HEADS * HEAD_DIM, HIDDEN),
           "gate_up": (HIDDEN, 2 * INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}


def variants():
    """(name, kernel, {param: type string or constexpr value}, options) for every launch."""
    from qwen2vl.kernels import (triton_activation, triton_attention, triton_awq, triton_int8, triton_moe, triton_norm,
                                 triton_rotary)

    awq_types = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                 "bias_ptr": "*bf16", "final_ptr": "*bf16", "counters_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32",
                 "stride_split": "i32", "split_k": "i32"}
    configs = {}
    for name, (k, n) in LINEARS.items():
        for m in (1, 16, 2048):
            configs[f"{name} M={m}"] = triton_awq.pick_config(m, n, k, GROUP, num_sms=132)
    configs["M=1 cuda-core gather"] = triton_awq.MatmulConfig(1, 64, 128, 8, gather=True, num_warps=4)
    configs["M=2048 gather"] = triton_awq.MatmulConfig(128, 128, 64, 1, gather=True, num_warps=8)
    configs["M=1 reduced in kernel"] = triton_awq.MatmulConfig(16, 64, 128, 4, reduce_in_kernel=True)
    for label, config in list(configs.items()):
        if config.gemv:  # a measured one-row launch: the GEMV kernel's variants below cover it
            del configs[label]
    for label, config in configs.items():
        split = config.split_k > 1
        yield (f"awq {label} {config}", triton_awq._awq_matmul_kernel,
               {**awq_types, "out_ptr": "*fp32" if split else "*bf16", "GROUP_SIZE": GROUP,
                "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "SPLIT": split,
                "HAS_BIAS": not split or config.reduce_in_kernel, "GATHER": config.gather,
                "REDUCE_IN_KERNEL": config.reduce_in_kernel},
               {"num_warps": config.num_warps, "num_stages": config.num_stages})
    for name, (k, n) in LINEARS.items():
        for block_n, block_k, warps, in_kernel in ((128, 32, 4, False), (256, 16, 8, False), (256, 32, 4, True)):
            yield (f"awq gemv {name} block_n={block_n} block_k={block_k} reduce_in_kernel={in_kernel}",
                   triton_awq._awq_gemv_kernel,
                   {"x_ptr": "*bf16", "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                    "bias_ptr": "*bf16", "out_ptr": "*fp32", "final_ptr": "*bf16", "counters_ptr": "*i32",
                    "N": "i32", "N_WORDS": "i32", "K": "i32", "stride_split": "i32",
                    "split_k": "i32", "GROUP_SIZE": GROUP, "BLOCK_W": block_n // 8, "BLOCK_K": block_k,
                    "SPLIT": True, "HAS_BIAS": in_kernel, "REDUCE_IN_KERNEL": in_kernel, "PREFETCH": in_kernel},
                   {"num_warps": warps, "num_stages": 3})
    yield ("awq dequantize", triton_awq._dequantize_kernel,
           {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "out_ptr": "*bf16", "N": "i32",
            "GROUP_SIZE": GROUP, "BLOCK_K": 32, "BLOCK_N": 128}, {})
    yield ("awq split sum", triton_awq._sum_splits_kernel,
           {"partial_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "size": "i32", "N": "i32",
            "split_k": "i32", "HAS_BIAS": True, "BLOCK": triton_awq.SUM_BLOCK}, {})
    for block_m, block_n, block_k in ((1, 32, 256), (16, 128, 64), (64, 128, 64)):  # triton_int8.int8_matmul's
        yield (f"int8 head block_m={block_m}", triton_int8._int8_matmul_kernel,
               {"x_ptr": "*bf16", "values_ptr": "*i8", "scales_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32",
                "N": "i32", "K": "i32", "stride_xm": "i32", "BLOCK_M": block_m, "BLOCK_N": block_n,
                "BLOCK_K": block_k}, {"num_warps": 4})
    for index in ("i32", "i64"):  # the eager metadata's int32, the decode graphs' int64 buffers
        yield from paged_decode_variants(triton_attention, index)
    for residual in (False, True):
        yield (f"add_rms_norm residual={residual}", triton_norm._add_rms_norm_kernel,
               {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
                "summed_ptr": "*bf16", "stride_x": "i32", "stride_r": "i32", "hidden": "i32", "eps": "fp32",
                "HAS_RESIDUAL": residual, "BLOCK": 2048},
               {"num_warps": 8})
    yield ("rotary q,k", triton_rotary._rotary_qk_kernel,
           {"q_ptr": "*bf16", "k_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "stride_q": "i32",
            "stride_k": "i32", "num_heads": "i32", "num_kv_heads": "i32", "HALF": HEAD_DIM // 2,
            "HEADS_PAD": 16, "KV_HEADS_PAD": KV_HEADS}, {})
    yield ("qkv rotary + cache write", triton_rotary._qkv_rotary_cache_kernel,
           {"qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "q_ptr": "*bf16", "kv_ptr": "*bf16",
            "slot_mapping_ptr": "*i64", "stride_row": "i32", "stride_kv": "i64", "stride_block": "i32",
            "stride_token": "i32", "block_size": "i32", "num_heads": "i32", "num_kv_heads": "i32",
            "HALF": HEAD_DIM // 2, "HEADS_PAD": 16, "KV_HEADS_PAD": KV_HEADS}, {})
    yield ("silu_and_mul", triton_activation._silu_and_mul_kernel,
           {"gate_up_ptr": "*bf16", "out_ptr": "*bf16", "stride": "i32", "width": "i32",
            "BLOCK": triton_activation.BLOCK}, {})
    for block_m in (16, 64):  # triton_moe.grouped_matmul's: few rows per expert, many
        for gather in (True, False):  # gate_up gathers the tokens' rows, down reads its own
            yield (f"moe grouped matmul block_m={block_m} gather={gather}", triton_moe._grouped_matmul_kernel,
                   {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "offsets_ptr": "*i64",
                    "tile_expert_ptr": "*i32", "tile_first_row_ptr": "*i64", "rows_ptr": "*i64" if gather else "*bf16",
                    "N": "i32", "K": "i32", "stride_am": "i32", "num_experts": "i32", "GATHER": gather,
                    "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 32}, {"num_warps": 4})


def paged_decode_variants(triton_attention, index: str):
    yield (f"paged decode attention ({index})", triton_attention._partition_kernel,
           {"query_ptr": "*bf16", "kv_ptr": "*bf16", "block_tables_ptr": f"*{index}", "context_lens_ptr": f"*{index}",
            "partial_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*bf16", "counters_ptr": "*i32", "scale": "fp32",
            "stride_qb": "i32", "stride_qh": "i32", "stride_kv": "i64", "stride_block": "i32", "stride_token": "i32",
            "stride_head": "i32", "stride_table": "i32", "stride_stats": "i32", "stride_ob": "i32", "stride_oh": "i32",
            "block_size": "i32", "num_heads": "i32", "num_kv_heads": "i32", "max_partitions": "i32",
            "GROUP": HEADS // KV_HEADS, "GROUP_PAD": 16, "HEAD_DIM": HEAD_DIM,
            "PARTITION": triton_attention.PARTITION_SIZE, "BLOCK_N": triton_attention.BLOCK_TOKENS,
            "DOT_PRECISION": "tf32"}, {})


def compile_sm90(kernel, params: dict, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in kernel.params]
    if set(names) != set(params):
        raise ValueError(f"parameters differ: kernel has {names}, the check lists {sorted(params)}")
    signature = {name: "constexpr" if kernel.params[i].is_constexpr else params[name] for i, name in enumerate(names)}
    constexprs = {(i,): params[name] for i, name in enumerate(names) if kernel.params[i].is_constexpr}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def main() -> int:
    failed = 0
    for name, kernel, params, options in variants():
        try:
            compiled = compile_sm90(kernel, params, options)
            shared = compiled.metadata.shared
            ok = shared <= HOPPER_SHARED_BYTES
            report = {"variant": name, "ok": ok, "shared_bytes": shared}
        except Exception as error:  # report every variant, not just the first failure
            ok, report = False, {"variant": name, "ok": False, "error": f"{type(error).__name__}: {error}"[:400]}
        failed += not ok
        print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
