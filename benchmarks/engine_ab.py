"""This tree's engine against another revision's, same machine, same run: did a change cost speed?

    python benchmarks/engine_ab.py --base REV [--rounds 3] [--decode-tokens 32] [--models awq demo]

Each side runs `benchmarks/cpu.py`'s measurement of our engine (decode tok/s at batch 1, the
448x448 image's time to first token) in a subprocess that imports that revision's qwen2vl (the
base revision is checked out into `.cache/ab-REV` as a git worktree), prefix and vision caches
off where the revision has them (the prompts repeat), one subprocess per measurement, alternating the sides and their order round by round; each side's best is kept (the
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
    """One measurement in a subprocess that imports `tree`'s qwen2vl."""
    command = [sys.executable, __file__, "--worker", str(model_dir), image, str(decode_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def worker(model_dir: str, image: str, decode_tokens: int) -> None:
    """`benchmarks/cpu.py`'s measurement of our engine, with the caches off where the tree has
    them: the prompts repeat, and reusing them would time the cache, not the engine."""
    import qwen2vl
    from qwen2vl import Qwen2VL

    options = {"max_model_len": cpu.MAX_MODEL_LEN}
    if "EngineArgs" in qwen2vl.__all__:
        options.update(prefix_caching=False, vision_cache_bytes=0)
    llm = Qwen2VL.from_pretrained(model_dir, dtype="auto", **options)

    def generate(messages, tokens):
        out = llm.chat(messages, max_tokens=tokens, temperature=0.0, ignore_eos=True)
        assert out.usage.completion_tokens == tokens

    result = cpu.measure(generate, image, decode_tokens)
    print("RESULT " + json.dumps({**result, "peak_rss_gib": cpu.peak_rss_gib(), "tree": qwen2vl.__file__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the revision to compare against (a commit or branch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", choices=["awq", "demo"], default=["awq", "demo"])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, image, decode_tokens = args.worker
        worker(model_dir, image, int(decode_tokens))
        return
    if args.base is None:
        parser.error("--base REV is required")

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
                assert result["tree"].startswith(str(sides[side])), (side, result["tree"])
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
