"""CPU side by side: our engine (4-bit AWQ through the int4 kernel) against transformers.

    python benchmarks/cpu.py [--model qwen2-vl-2b|qwen2.5-vl-3b|qwen3-vl-2b] [--cache-dir .cache/bench]
                             [--decode-tokens 32] [--no-accuracy] [--doc docs/benchmarks.md]

On the random-weight Qwen2-VL-2B-Instruct-AWQ checkpoint and its BF16 sibling (both written by
`qwen2vl.tools.random_checkpoint` into the cache dir when absent), each side runs in its own
subprocess, so its peak RSS is its own:

- decode tokens/s at batch 1 after a short text prompt: `N / (time(N + 1 tokens) - time(1 token))`,
  greedy, EOS ignored, same prompt both sides (each time the best of 3);
- time to first token for one 448x448 image (processing + vision + prefill + one token);
- peak RSS of the process (Python, torch, weights, KV cache, activations).

transformers runs the BF16 sibling in bf16 and fp32; it cannot run AWQ on the CPU (its AWQ
linears need the CUDA kernels of autoawq), so it has no AWQ row. Our engine runs the AWQ
checkpoint with `dtype="auto"`, and the BF16 sibling too for reference. With `--accuracy` (the
default) it also compares logits over 64 teacher-forced positions with the dequantized float32
path. Prints a table and writes it as the "CPU" section of `--doc`.

`--model qwen2.5-vl-3b` runs the same on Qwen2.5-VL-3B-Instruct's shape (AWQ ours, BF16
transformers in bf16; its fp32 copy, 15 GB, is left out) into a section of its own;
`--model qwen3-vl-2b` on Qwen3-VL-2B-Instruct's (transformers' Qwen3VLForConditionalGeneration
in bf16), likewise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "qwen2vl" / "assets"
# --model: (published config, checkpoint name in the cache dir, doc section, transformers dtypes)
MODELS = {
    "qwen2-vl-2b": (ASSETS / "qwen2-vl-2b-instruct-awq.config.json", "qwen2-vl-2b",
                    "## CPU: 4-bit AWQ, our engine vs transformers", ("bf16", "fp32")),
    "qwen2.5-vl-3b": (ASSETS / "qwen2.5-vl-3b-instruct.config.json", "qwen2.5-vl-3b",
                      "## CPU: Qwen2.5-VL-3B, 4-bit AWQ, our engine vs transformers", ("bf16",)),
    "qwen3-vl-2b": (ASSETS / "qwen3-vl-2b-instruct.config.json", "qwen3-vl-2b",
                    "## CPU: Qwen3-VL-2B, 4-bit AWQ, our engine vs transformers", ("bf16",)),
}
PROMPT = "Write a long story about a lighthouse keeper and a cat."
IMAGE_SIZE = 448
MAX_MODEL_LEN = 1024  # our KV cache: 4 sequences of this length (the prompts here are < 400 tokens)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def text_messages() -> list[dict]:
    return [{"role": "user", "content": PROMPT}]


def image_messages(path: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": path},
                                         {"type": "text", "text": "Describe this image."}]}]


def vision_tokens(model: str) -> int:
    """The merged vision tokens of the IMAGE_SIZE-square image (it is a multiple of the model's factor)."""
    vision = json.loads(MODELS[model][0].read_text())["vision_config"]
    return (IMAGE_SIZE // (vision.get("patch_size", 14) * vision.get("spatial_merge_size", 2))) ** 2


def write_image(path: Path) -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return str(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- workers: one side each, in its own process -----------------------------------------------

def measure(generate, image: str, decode_tokens: int, repeats: int = 3) -> dict:
    """Decode rate and image TTFT of `generate(messages, num_tokens)`. Each time is the best of
    `repeats`: on a shared machine the minimum is the closest to the undisturbed time."""
    generate(text_messages(), 2)  # warm-up
    first = min(timed(lambda: generate(text_messages(), 1)) for _ in range(repeats))
    full = min(timed(lambda: generate(text_messages(), decode_tokens + 1)) for _ in range(repeats))
    ttft = min(timed(lambda: generate(image_messages(image), 1)) for _ in range(repeats))
    return {"decode_tok_s": decode_tokens / (full - first), "ttft_image_s": ttft}


def run_ours(model_dir: str, dtype: str, image: str, decode_tokens: int) -> dict:
    from qwen2vl import Qwen2VL

    start = time.perf_counter()
    # caches off: the prompts repeat (best of 3), and the table is about a first sight
    llm = Qwen2VL.from_pretrained(model_dir, dtype=dtype, max_model_len=MAX_MODEL_LEN, prefix_caching=False,
                                  vision_cache_bytes=0)
    load_s = time.perf_counter() - start

    def generate(messages, tokens):
        out = llm.chat(messages, max_tokens=tokens, temperature=0.0, ignore_eos=True)
        assert out.usage.completion_tokens == tokens

    return {"load_s": load_s, **measure(generate, image, decode_tokens),
            "dtype": str(llm.engine.model.dtype).removeprefix("torch.")}


def run_transformers(model_dir: str, dtype: str, image: str, decode_tokens: int) -> dict:
    import transformers
    from PIL import Image
    from transformers import AutoProcessor

    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    model_class = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
                   "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
                   "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[model_type]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    start = time.perf_counter()
    model = model_class.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    load_s = time.perf_counter() - start

    def generate(messages, tokens):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [Image.open(part["image"]).convert("RGB") for message in messages
                  if isinstance(message["content"], list) for part in message["content"] if part["type"] == "image"]
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens

    return {"load_s": load_s, **measure(generate, image, decode_tokens), "dtype": dtype}


def teacher_forced_logits(model, num_tokens: int = 64) -> torch.Tensor:
    """Float32 logits at every position of one fixed random prompt, prefilled in one pass."""
    from prefill import prefill_logits

    ids = torch.randint(0, model.config.text.vocab_size - 1000, (num_tokens,), generator=torch.Generator().manual_seed(0))
    return prefill_logits(model, ids, torch.arange(num_tokens).expand(3, -1))


def run_accuracy(model_dir: str, reference_path: str, variant: str) -> dict:
    """Relative logits error of one way of running the AWQ checkpoint against the dequantized
    float32 path (variant "reference" computes and saves that)."""
    from qwen2vl.loader import load_model

    dtype, int4_kernel, int8_vocab = {
        "reference": (torch.float32, False, False), "auto": (None, None, True),  # dtype="auto": the loader's choice
        "auto-bf16-table": (None, None, False), "int4-fp32": (torch.float32, True, False),
        "dequantized-bf16": (torch.bfloat16, False, False)}[variant]
    logits = teacher_forced_logits(load_model(model_dir, dtype=dtype, int4_kernel=int4_kernel, int8_vocab=int8_vocab))
    if variant == "reference":
        torch.save(logits, reference_path)
        return {}
    reference = torch.load(reference_path)
    rows = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    return {"relative": ((logits - reference).norm() / reference.norm()).item(), "worst_row": rows.max().item(),
            "argmax_agree": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}


WORKERS = {"ours": run_ours, "transformers": run_transformers}


def worker(args) -> None:
    torch_rss = current_rss_gib()  # Python + torch imported, before either side loads anything
    torch.manual_seed(0)
    if args.worker == "accuracy":
        result = run_accuracy(args.model_dir, args.reference, args.dtype)
    else:
        result = WORKERS[args.worker](args.model_dir, args.dtype, args.image, args.decode_tokens)
    result["peak_rss_gib"], result["torch_rss_gib"] = peak_rss_gib(), torch_rss
    print("RESULT " + json.dumps(result))


# --- the driver -------------------------------------------------------------------------------

def ensure_checkpoints(cache_dir: Path, model: str = "qwen2-vl-2b") -> tuple[Path, Path]:
    """(AWQ, BF16) random checkpoints of `model` (a `MODELS` key) in `cache_dir`, written when absent."""
    from qwen2vl.tools.random_checkpoint import write_random_checkpoint

    config_path, stem, _, _ = MODELS[model]
    config = json.loads(config_path.read_text())
    dirs = []
    for name, quant in ((f"{stem}-awq-random", "awq"), (f"{stem}-bf16-random", None)):
        out = cache_dir / name
        if not (out / "config.json").is_file():
            print(f"writing {out} ...", flush=True)
            write_random_checkpoint(config, out, quant=quant)
        dirs.append(out)
    return dirs[0], dirs[1]


def spawn(name: str, *args: str) -> dict:
    command = [sys.executable, __file__, "--worker", name, *args]
    print(f"running {name} {' '.join(args[:2])} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{name} {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if re.search(rf"\b{f}\b", flags)]
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    return (f"{cpu}, {os.cpu_count()} cores ({', '.join(isa)}), {mem:.0f} GiB RAM, {platform.system()}; "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")


def run_lines(command: str, started: str, note: str) -> list[str]:
    """A benchmark section's first lines: its command, the machine, when it ran and the load."""
    return [f"Command: `{command}`  ", f"Machine: {machine()}  ",
            f"Run: {started}, {note} at the start; ended {time.strftime('%H:%M UTC', time.gmtime())}, "
            f"{load_note()} then.", ""]


def load_note() -> str:
    load1, load5, _ = os.getloadavg()
    return f"load average {load1:.2f} (1 min) / {load5:.2f} (5 min)"


def table(rows: list[tuple[str, dict]], baseline: float) -> str:
    lines = ["| engine | weights | compute dtype | decode tok/s (batch 1) | vs best transformers | "
             "TTFT 448x448 image (s) | peak RSS GiB (GB) | of which Python + torch |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        weights, engine = label.split(" / ")
        lines.append(f"| {engine} | {weights} | {r['dtype']} | {r['decode_tok_s']:.2f} | "
                     f"{r['decode_tok_s'] / baseline:.1f}x | {r['ttft_image_s']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} ({r['peak_rss_gib'] * 2**30 / 1e9:.2f}) | {r['torch_rss_gib']:.2f} |")
    return "\n".join(lines)


def accuracy_table(results: dict[str, dict]) -> str:
    names = {"auto": "int4 kernel, int8 vocabulary table, bf16 elsewhere (`dtype=\"auto\"`)",
             "auto-bf16-table": "int4 kernel, bf16 everywhere (`int8_vocab=False`)",
             "int4-fp32": "int4 kernel (bf16 in/out), float32 elsewhere",
             "dequantized-bf16": "dequantized weights, bf16 everywhere (no int4)"}
    lines = ["| AWQ path | relative logits error | worst position | argmax agreement |", "|---|---|---|---|"]
    for key, r in results.items():
        lines.append(f"| {names[key]} | {r['relative']:.3g} | {r['worst_row']:.3g} | {r['argmax_agree']:.0%} |")
    return "\n".join(lines)


def write_section(doc: Path, body: str) -> None:
    """Put `body` (a section: its first line is its `## ` title) in `doc`, in place of the section
    of that title if there is one."""
    section = body.split("\n", 1)[0]
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\nSide-by-side tables, each with the command that made it.\n"
    start = text.find(section)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    else:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + body + ("\n\n" + text[end + 1:] if end != -1 else "\n")
    doc.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2-vl-2b")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "bench"))
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    cache_dir = Path(args.cache_dir)
    _, _, section, reference_dtypes = MODELS[args.model]
    awq, bf16 = ensure_checkpoints(cache_dir, args.model)
    image = write_image(cache_dir / "image-448.png")
    started, note = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_note()
    common = ["--image", image, "--decode-tokens", str(args.decode_tokens)]
    runs = [("AWQ 4-bit / ours", "ours", awq, "auto"), ("BF16 / ours", "ours", bf16, "bf16"),
            *(("BF16 / transformers", "transformers", bf16, dtype) for dtype in reference_dtypes)]
    rows = [(label, spawn(name, "--model-dir", str(path), "--dtype", dtype, *common))
            for label, name, path, dtype in runs]
    best = max(r["decode_tok_s"] for label, r in rows if "transformers" in label)
    body = [section, "",
            *run_lines(f"python benchmarks/cpu.py --model {args.model} --decode-tokens {args.decode_tokens}", started, note),
            table(rows, best), "",
            f"Decode: greedy after a {len(PROMPT.split())}-word text prompt, "
            f"{args.decode_tokens} tokens, EOS ignored, `N / (t(N+1 tokens) - t(1 token))`, each time the best of "
            "3 runs (the machine is shared: the minimum is the least disturbed). TTFT: one "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} image ({vision_tokens(args.model)} vision tokens) + a short question, from messages to the "
            "first token, processing included (our prefix and vision caches off: the runs repeat the prompt). Peak RSS: the whole process (Python, torch, weights, KV "
            f"cache, activations); our engine with `max_model_len={MAX_MODEL_LEN}`. Weights are random "
            "(the published architecture, `qwen2vl.tools.random_checkpoint`), so speed and memory are "
            "those of the real model, the answers are not. transformers cannot run AWQ checkpoints on the "
            "CPU (its AWQ linears need autoawq's CUDA kernels), so it runs the BF16 sibling."]
    if args.accuracy:
        reference = str(cache_dir / "awq-reference-logits.pt")
        spawn("accuracy", "--model-dir", str(awq), "--dtype", "reference", "--reference", reference)
        accuracy = {v: spawn("accuracy", "--model-dir", str(awq), "--dtype", v, "--reference", reference)
                    for v in ("auto", "auto-bf16-table", "int4-fp32", "dequantized-bf16")}
        body += ["", "Logits of the AWQ checkpoint over 64 teacher-forced positions, against the dequantized "
                 "float32 path (relative error = norm of the difference / norm of the reference):", "",
                 accuracy_table(accuracy)]
    body = "\n".join(body)
    print(body)
    write_section(Path(args.doc), body)


if __name__ == "__main__":
    main()
