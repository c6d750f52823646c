"""This tree's engine against another revision's, same machine, same run: did a change cost speed?

    python benchmarks/engine_ab.py --base REV [--rounds 3] [--decode-tokens 32] [--models awq demo]

Each revision runs `benchmarks/cpu.py`'s worker for our engine (its own copy of it, from its own
tree: the base revision is checked out into `.cache/ab-REV` as a git worktree), one subprocess per
measurement, alternating the sides and their order round by round; each side's best is kept (the
machine is shared: the minimum is the least disturbed). Models: `awq` is the random-weight 2B AWQ
checkpoint of `benchmarks/cpu.py` (the int4 path: the matmuls dominate), `demo` the bundled demo
model (a few microseconds of math per step: what the engine's host side costs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "qwen2-vl-shapes-demo"


def base_tree(rev: str) -> Path:
    tree = ROOT / ".cache" / f"ab-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def measure(tree: Path, model_dir: Path, image: str, decode_tokens: int) -> dict:
    command = [sys.executable, str(tree / "benchmarks" / "cpu.py"), "--worker", "ours", "--model-dir", str(model_dir),
               "--dtype", "auto", "--image", image, "--decode-tokens", str(decode_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare against (a commit or branch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", choices=["awq", "demo"], default=["awq", "demo"])
    args = parser.parse_args()

    cache = ROOT / ".cache" / "bench"
    models = {"awq": cpu.ensure_checkpoints(cache)[0] if "awq" in args.models else None, "demo": DEMO}
    image = cpu.write_image(cache / "image-448.png")
    sides = {"base": base_tree(args.base), "head": ROOT}
    print(f"{cpu.machine()}\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu.load_note()}", flush=True)
    best: dict[tuple[str, str], dict] = {}
    for round_ in range(args.rounds):
        for model in args.models:
            for side in (("base", "head") if round_ % 2 == 0 else ("head", "base")):
                result = measure(sides[side], models[model], image, args.decode_tokens)
                print(f"round {round_ + 1} {model} {side}: decode {result['decode_tok_s']:.2f} tok/s, "
                      f"image TTFT {result['ttft_image_s']:.3f} s, peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
                kept = best.setdefault((model, side), dict(result))
                kept["decode_tok_s"] = max(kept["decode_tok_s"], result["decode_tok_s"])
                kept["ttft_image_s"] = min(kept["ttft_image_s"], result["ttft_image_s"])
                kept["peak_rss_gib"] = min(kept["peak_rss_gib"], result["peak_rss_gib"])
    print(f"\n| model | side | decode tok/s (best) | image TTFT s (best) | peak RSS GiB |\n|---|---|---|---|---|")
    for model in args.models:
        for side in ("base", "head"):
            r = best[model, side]
            print(f"| {model} | {side} ({args.base if side == 'base' else 'this tree'}) | {r['decode_tok_s']:.2f} | "
                  f"{r['ttft_image_s']:.3f} | {r['peak_rss_gib']:.2f} |")
        head, base = best[model, "head"], best[model, "base"]
        print(f"| {model} | head / base | {head['decode_tok_s'] / base['decode_tok_s']:.3f}x | "
              f"{head['ttft_image_s'] / base['ttft_image_s']:.3f}x | |")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu.load_note()}")


if __name__ == "__main__":
    main()
