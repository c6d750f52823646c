"""Where a CPU batch-1 decode step's time goes, on the random-weight 2B AWQ checkpoint.

    python benchmarks/cpu_profile.py [--cache-dir .cache/bench] [--tokens 32] [--threads 2]

Runs our engine as benchmarks/cpu.py does (`dtype="auto"`: the int4 kernel, the int8 vocabulary
table, bf16 elsewhere), greedy after a short text prompt, EOS ignored. Two runs under torch's
profiler, of 1 and of `--tokens + 1` tokens, and their difference divided by `--tokens` is the
cost of one decode step by kind of work; the wall time not spent inside any operator is Python,
dispatch and waiting (thread wake-ups). Prints a table in milliseconds per step, with the rate
at which each matmul reads its weights, and the step's time without the profiler.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu  # noqa: E402


def kind_of(name: str, shapes) -> str:
    """The kind of work of one profiled operator call: a matmul by projection, or a family."""
    if name == "aten::_weight_int4pack_mm_for_cpu":
        n, k = shapes[1][0], shapes[0][-1]
        return {(2048, 1536): "int4 q|k|v projection", (1536, 1536): "int4 o projection",
                (17920, 1536): "int4 gate|up projection", (1536, 8960): "int4 down projection"}.get((n, k), f"int4 {n}x{k}")
    if name == "aten::_weight_int8pack_mm":
        return "int8 LM head (151936 x 1536)"
    if "scaled_dot_product" in name:
        return "attention (SDPA)"
    if name in ("aten::index", "aten::index_copy_"):
        return "KV cache gather and write"
    return "other operators (norms, rotary, SwiGLU, copies, sampling)"


# bytes each decode step reads per projection (4-bit values + bf16 scale and offset per 128)
WEIGHT_BYTES = {"int4 q|k|v projection": 2048 * 1536, "int4 o projection": 1536 * 1536,
                "int4 gate|up projection": 17920 * 1536, "int4 down projection": 1536 * 8960}


def profiled(generate, tokens: int):
    """(wall seconds, {kind: operator self time in seconds}, {kind: calls}) of one generation."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        generate(tokens)
        wall = time.perf_counter() - start
    times, calls = defaultdict(float), defaultdict(int)
    for event in prof.key_averages(group_by_input_shape=True):
        kind = kind_of(event.key, event.input_shapes)
        times[kind] += event.self_cpu_time_total / 1e6
        calls[kind] += event.count
    return wall, times, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=str(cpu.ROOT / ".cache" / "bench"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from qwen2vl import Qwen2VL

    awq, _ = cpu.ensure_checkpoints(Path(args.cache_dir))
    llm = Qwen2VL.from_pretrained(str(awq), dtype="auto", max_model_len=cpu.MAX_MODEL_LEN, prefix_caching=False,
                                  vision_cache_bytes=0)

    def generate(tokens):
        llm.chat(cpu.text_messages(), max_tokens=tokens, temperature=0.0, ignore_eos=True)

    generate(4)  # warm-up
    note = cpu.load_note()
    plain = (min(cpu.timed(lambda: generate(args.tokens + 1)) for _ in range(3))
             - min(cpu.timed(lambda: generate(1)) for _ in range(3))) / args.tokens
    first = min((profiled(generate, 1) for _ in range(3)), key=lambda r: r[0])
    full = min((profiled(generate, args.tokens + 1) for _ in range(3)), key=lambda r: r[0])
    steps = args.tokens
    step_wall = (full[0] - first[0]) / steps
    rows, accounted = [], 0.0
    for kind in sorted(full[1], key=lambda k: -(full[1][k] - first[1].get(k, 0.0))):
        per_step = (full[1][kind] - first[1].get(kind, 0.0)) / steps
        calls = (full[2][kind] - first[2].get(kind, 0)) / steps
        accounted += per_step
        rate = ""
        if kind in WEIGHT_BYTES:
            rate = f"{WEIGHT_BYTES[kind] * 28 / 2 * (1 + 4 / 64) / per_step / 1e9:.1f} GB/s"
        elif kind.startswith("int8 LM head"):
            rate = f"{151936 * 1536 / per_step / 1e9:.1f} GB/s"
        rows.append((kind, per_step, calls, rate))
    rows.append(("Python, dispatch, waiting (wall minus operators)", step_wall - accounted, 0, ""))
    print(f"decode step: {plain * 1e3:.1f} ms ({1 / plain:.1f} tokens/s) unprofiled, {step_wall * 1e3:.1f} ms under "
          f"the profiler (its own cost lands in the last two rows); {torch.get_num_threads()} threads; {note} at the start")
    print("| work | ms per step | share | operator calls per step | weight read rate |")
    print("|---|---|---|---|---|")
    for kind, per_step, calls, rate in rows:
        print(f"| {kind} | {per_step * 1e3:.2f} | {per_step / step_wall:.0%} | {calls:.0f} | {rate} |")


if __name__ == "__main__":
    main()
