"""Load time and peak memory of `qwen2vl.loader.load_model`, beside the time a plain read of
the checkpoint's files takes.

    python benchmarks/load.py MODEL_DIR [--dtype fp32|bf16|fp16] [--device cpu] [--forward]
                              [--cache-dir DIR | --no-cache]

Reads the checkpoint's safetensors files once (the plain read time; this also brings them into
the OS page cache, so both loads read from memory), then loads the model in two fresh processes
sharing a load cache folder (`qwen2vl.load_cache`): cold (no entry yet: the load computes the
repacked layout and writes the entry) and warm (the entry is read). Without --cache-dir the
folder is a new temporary one, removed at the end; --no-cache makes one load with the cache off.
For each load: the time, the bytes of the weights as they sit in memory after loading
(parameters and buffers, packed quantized tensors included) and the process's peak RSS, baseline
(Python + torch imported) subtracted. Peak RSS over weight bytes near 1 means no second copy was
made. Also prints the machine's load average: the times are only comparable on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefill import prefill_logits  # benchmarks/prefill.py
from qwen2vl.loader import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_seconds(model_dir) -> tuple[float, int]:
    """(seconds, bytes) of reading every safetensors file of `model_dir` into one reused buffer."""
    buffer = bytearray(64 * 1024**2)
    start, total = time.perf_counter(), 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return time.perf_counter() - start, total


def measure(model_dir, device="cpu", dtype=None, forward: bool = False, cache=None) -> dict:
    baseline = current_rss_bytes()
    start = time.perf_counter()
    model = load_model(model_dir, device=device, dtype=dtype, cache=cache)
    seconds = time.perf_counter() - start
    weights = weight_bytes(model)
    peak = peak_rss_bytes() - baseline
    result = {"load_s": round(seconds, 2), "weight_bytes": weights, "peak_rss_bytes": peak,
              "peak_rss_over_weights": round(peak / weights, 3), "dtype": str(model.dtype)}
    return {**result, **smoke_forward(model)} if forward else result


def smoke_forward(model, num_tokens: int = 8) -> dict:
    """Prefill a few token ids (one sequence, fresh cache): the loaded model runs end to end."""
    start = time.perf_counter()
    logits = prefill_logits(model, torch.arange(100, 100 + num_tokens), torch.arange(num_tokens).expand(3, -1),
                            logits_indices=torch.tensor([num_tokens - 1]))
    return {"forward_s": round(time.perf_counter() - start, 2), "logits_finite": bool(torch.isfinite(logits).all()),
            "logits_shape": list(logits.shape)}


def load_in_child(args, cache: str | None) -> dict:
    """`measure` in a fresh process (its own peak RSS, nothing warm but the OS page cache)."""
    command = [sys.executable, __file__, args.model_dir, "--device", args.device, "--one-load",
               *(["--dtype", args.dtype] if args.dtype else []), *(["--forward"] if args.forward else []),
               *(["--cache-dir", cache] if cache else ["--no-cache"])]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def describe(name: str, result: dict) -> str:
    return (f"{name} load {result['load_s']:.2f} s, weights {result['weight_bytes'] / 2**30:.2f} GiB, "
            f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"({result['peak_rss_over_weights']:.3f}x the weights), {result['dtype']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--forward", action="store_true", help="then prefill 8 tokens as a smoke test")
    parser.add_argument("--cache-dir", help="the load cache folder (default: a new temporary one)")
    parser.add_argument("--no-cache", action="store_true", help="one load with the load cache off")
    parser.add_argument("--one-load", action="store_true", help=argparse.SUPPRESS)  # a child's single load
    args = parser.parse_args(argv)
    if args.one_load:
        cache = False if args.no_cache else args.cache_dir
        print(json.dumps(measure(args.model_dir, args.device, DTYPES.get(args.dtype), args.forward, cache)))
        return
    read_s, read_bytes = read_seconds(args.model_dir)
    result = {"read_s": round(read_s, 2), "read_bytes": read_bytes}
    print(f"plain read {read_s:.2f} s ({read_bytes / 1e9:.2f} GB of safetensors)", file=sys.stderr)
    if args.no_cache:
        result["uncached"] = load_in_child(args, None)
        print(describe("uncached", result["uncached"]), file=sys.stderr)
    else:
        cache = args.cache_dir or tempfile.mkdtemp(prefix="qwen2vl-load-cache-")
        try:
            for name in ("cold", "warm"):
                result[name] = load_in_child(args, cache)
                print(describe(name, result[name]), file=sys.stderr)
        finally:
            if not args.cache_dir:
                shutil.rmtree(cache, ignore_errors=True)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    print(f"load average {result['load_average'][0]:.2f} on {result['cpus']} cores", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
