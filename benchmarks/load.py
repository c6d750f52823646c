"""Load time and peak memory of `qwen2vl.loader.load_model`.

    python benchmarks/load.py MODEL_DIR [--dtype fp32|bf16|fp16] [--device cpu] [--forward]

Prints the load time, the bytes of the weights as they sit in memory after loading (parameters
and buffers, packed quantized tensors included) and the process's peak RSS, baseline (Python +
torch imported) subtracted. Peak RSS over weight bytes near 1 means no second copy was made.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

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


def measure(model_dir, device="cpu", dtype=None, forward: bool = False) -> dict:
    baseline = current_rss_bytes()
    start = time.perf_counter()
    model = load_model(model_dir, device=device, dtype=dtype)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--forward", action="store_true", help="then prefill 8 tokens as a smoke test")
    args = parser.parse_args(argv)
    result = measure(args.model_dir, args.device, DTYPES.get(args.dtype), args.forward)
    print(f"load {result['load_s']:.2f} s, weights {result['weight_bytes'] / 2**30:.2f} GiB, "
          f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"({result['peak_rss_over_weights']:.3f}x the weights), {result['dtype']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
