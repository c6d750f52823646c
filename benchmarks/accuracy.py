"""The model card's accuracy table, reproduced on the bundled demo model: BF16 vs AWQ vs RTN.

    python benchmarks/accuracy.py [--model models/qwen2-vl-shapes-demo] [--n 500] [--group-size 64] [--write]

Quantizes MODEL with our AWQ (built-in calibration set) and with plain round-to-nearest, both
4-bit with zero points in the AutoAWQ GEMM format, then evaluates all three with our engine
(greedy) on the same N fresh samples of each prompt type of the shapes task. Prints a markdown
section; `--write` also puts it into docs/benchmarks.md (replacing an earlier version of it).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.engine import LLMEngine  # noqa: E402
from qwen2vl.evals.runner import box_gap, evaluate, teacher_forced  # noqa: E402
from qwen2vl.evals.shapes import TASKS, make_samples  # noqa: E402
from qwen2vl.layers.linear import Int4Linear  # noqa: E402
from qwen2vl.loader import load_model  # noqa: E402
from qwen2vl.processor import Processor  # noqa: E402
from qwen2vl.quantize import default_calibration, quantize  # noqa: E402
from prefill import prefill_logits  # noqa: E402  (benchmarks/prefill.py)
from report import write_section  # noqa: E402  (benchmarks/report.py)

ROOT = Path(__file__).resolve().parent.parent
# The BF16 checkpoint twice: as the CPU runs it by default (float32 compute), and in bfloat16 like
# the 4-bit columns, which measures what 4 bits cost at the same activation precision.
BF16_COLUMNS = {"BF16": "auto", "BF16 (bf16 compute)": "bfloat16"}
AWQ, AWQ_FLOAT32 = "AWQ 4-bit (ours)", "AWQ 4-bit (float32 compute)"
COLUMNS = (*BF16_COLUMNS, AWQ, AWQ_FLOAT32, "RTN 4-bit")
# (4-bit column, BF16 column, what the pair measures): the engine's defaults (bfloat16 activations
# on the int4 kernel against float32), then 4 bits alone at equal activation precision.
COMPARISONS = ((AWQ, "BF16", "each as the engine runs it by default"),
               (AWQ_FLOAT32, "BF16", "both with float32 activations"),
               (AWQ, "BF16 (bf16 compute)", "both with bfloat16 activations"))


def load(path: Path, dtype: str = "auto", int4_kernel: bool | None = None) -> Qwen2VL:
    """Our engine on the CPU in `dtype` as a user gets it; with `int4_kernel` True or False, a
    4-bit checkpoint's linears on the int4 kernel or dequantized once, all else equal."""
    if int4_kernel is None:
        return Qwen2VL.from_pretrained(path, device="cpu", dtype=dtype)
    processor = Processor.from_pretrained(path)
    network = load_model(path, device="cpu", dtype=getattr(torch, dtype), int4_kernel=int4_kernel)
    generation_config = json.loads((path / "generation_config.json").read_text())
    return Qwen2VL(LLMEngine(network, processor, generation_config=generation_config), processor, path)


def answers(llm: Qwen2VL, samples, column: str) -> tuple[dict, list[str]]:
    """Accuracy per task and every raw answer."""
    raw = []
    scores = evaluate(llm, samples, on_answer=raw.append, progress=lambda done, total: print(
        f"\r[{column}: {done}/{total}]", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    return {task: score.accuracy for task, score in scores.items()}, raw


def teacher_forced_logits(model, processor: Processor, samples, positions: int = 64) -> torch.Tensor:
    """Float32 logits `[positions, vocab]` at the rows that predict each sample's true answer
    tokens (prompt + answer in one forward per sample), over as many samples as it takes."""
    rows = []
    for sample in samples:
        forced = teacher_forced(processor, sample)
        ids, items = torch.tensor(forced.ids), forced.prompt.vision_items
        with torch.no_grad():
            embeds = model.encode_vision(torch.cat([i.pixel_values for i in items]),
                                         torch.tensor([i.grid_thw for i in items])) if items else None
        mask = (ids == processor.image_token_id) | (ids == processor.video_token_id)
        rows.append(prefill_logits(model, ids, forced.positions, embeds, mask,
                                   torch.arange(forced.answer_start - 1, len(ids) - 1)))
        if sum(len(r) for r in rows) >= positions:
            break
    return torch.cat(rows)[:positions]


def logits_error(awq_dir: Path, samples) -> dict:
    """The CPU fast path's accuracy (issue "CPU fast path"): teacher-forced logits of the AWQ
    checkpoint as `dtype="auto"` runs it (bf16 activations, int4 kernel) against its
    dequantized float32 path, as relative error (norm of the difference / norm of the reference)."""
    processor = Processor.from_pretrained(awq_dir)
    reference = teacher_forced_logits(load_model(awq_dir, dtype=torch.float32, int4_kernel=False), processor, samples)
    auto = teacher_forced_logits(load_model(awq_dir), processor, samples)
    return {"relative": ((auto - reference).norm() / reference.norm()).item(), "positions": len(reference),
            "argmax_agree": (auto.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def run(model: Path, n: int, seed: int, group_size: int, work_dir: Path) -> tuple[dict, dict, tuple[list, int], dict]:
    """Accuracy per column and task (`AWQ_FLOAT32`: the AWQ checkpoint dequantized once, float32
    throughout), seconds spent per column, (the `box_gap` between the greedy AWQ answers of the
    int4 kernel and of the dequantized path, both with float32 activations elsewhere, per sample;
    linears on the kernel), and the AWQ checkpoint's `logits_error`."""
    dirs = dict.fromkeys(BF16_COLUMNS, model)
    for column, method in ((AWQ, "awq"), ("RTN 4-bit", "rtn")):
        out = work_dir / f"{model.name}-{method}-g{group_size}"
        quantize(model, out, method=method, group_size=group_size, overwrite=True,  # a rerun replaces them
                 calibration=default_calibration(),  # the shapes task: the one these columns are scored on
                 log=lambda line: print(line, file=sys.stderr))
        dirs[column] = out
    samples = make_samples(n, seed)
    results, seconds, raw = {}, {}, {}
    for column, path in dirs.items():
        start = time.perf_counter()
        results[column], raw[column] = answers(load(path, BF16_COLUMNS.get(column, "auto")), samples, column)
        seconds[column] = time.perf_counter() - start
    start = time.perf_counter()
    results[AWQ_FLOAT32], dequantized = answers(load(dirs[AWQ], "float32", int4_kernel=False), samples, AWQ_FLOAT32)
    seconds[AWQ_FLOAT32] = time.perf_counter() - start
    on_kernel_llm = load(dirs[AWQ], "float32", int4_kernel=True)
    kernel_linears = sum(isinstance(m, Int4Linear) for m in on_kernel_llm.engine.model.modules())
    on_kernel = answers(on_kernel_llm, samples, "AWQ, float32, int4 kernel")[1]
    gaps = [box_gap(a, b) for a, b in zip(on_kernel, dequantized)]
    logits = logits_error(dirs[AWQ], samples)
    return results, seconds, (gaps, kernel_linears), logits


def markdown(results: dict, model: Path, n: int, seed: int, group_size: int, seconds: dict,
             kernel_vs_dequantized: tuple[list, int], logits: dict) -> str:
    pct = lambda value: f"{100 * value:.1f}"  # noqa: E731
    lines = ["## Accuracy: BF16 vs AWQ vs RTN on the demo model", "",
             f"The model card's first table (BF16 / GPTQ / AWQ), reproduced on the bundled demo model "
             f"`{model.relative_to(ROOT) if model.is_relative_to(ROOT) else model}` "
             f"(a Qwen2-VL of the exact architecture, trained by `scripts/train_demo.py` on the synthetic "
             f"shapes task). {n} fresh samples per prompt type (seed {seed}), greedy, our engine on the CPU "
             f"({platform.machine()}, torch {torch.__version__}); boxes count as correct at IoU >= 0.5. "
             f"Both 4-bit columns quantize every decoder linear with zero points, group size {group_size} "
             f"(the demo's hidden size is 64, below the card's 128), AutoAWQ GEMM layout; the vision tower "
             "stays unquantized, as in the card's checkpoint. AWQ used the built-in calibration set "
             "(shapes conversations of another seed).", "",
             "| Prompt type | " + " | ".join(COLUMNS) + " | "
             + " | ".join(f"{quantized.replace(' (ours)', '')} - {bf16}" for quantized, bf16, _ in COMPARISONS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) + len(COMPARISONS))]
    results = {c: {**results[c], "mean": sum(results[c][t] for t in TASKS) / len(TASKS)} for c in COLUMNS}
    for task in (*TASKS, "mean"):
        row = [pct(results[c][task]) for c in COLUMNS]
        deltas = [100 * (results[quantized][task] - results[bf16][task]) for quantized, bf16, _ in COMPARISONS]
        bold = (lambda text: f"**{text}**") if task == "mean" else str
        lines.append(f"| {bold(task)} | " + " | ".join(bold(value) for value in row) + " | "
                     + " | ".join(f"{delta:+.1f}" for delta in deltas) + " |")
    correct = {c: sum(round(n * results[c][task]) for task in TASKS) for c in COLUMNS}
    path_gaps, kernel_linears = kernel_vs_dequantized
    box_digits = [gap for gap in path_gaps if 0 < gap < math.inf]
    lines.append("")
    for quantized, bf16, how in COMPARISONS:
        # in answers, not float fractions: 10 of 500 is 2 points, not 2.0000000000000018
        gaps = {t: abs(round(n * results[quantized][t]) - round(n * results[bf16][t])) for t in TASKS}
        worst = max(TASKS, key=gaps.get)
        worst_gap = 100 * gaps[worst] / n
        lines.append(f"- {quantized} within 2 points of {bf16} on every prompt type, {how}: "
                     f"**{'yes' if gaps[worst] * 100 <= 2 * n else 'no'}** (largest gap {worst_gap:.1f} points, {worst}).")
    lines += [
              f"- AWQ no worse than RTN on average: **{'yes' if correct[AWQ] >= correct['RTN 4-bit'] else 'no'}** "
              f"({correct[AWQ]} vs {correct['RTN 4-bit']} of {n * len(TASKS)} answers right).",
              f"- AWQ greedy answers, int4 CPU kernel vs weights dequantized once, float32 activations "
              f"elsewhere in both (the kernel itself reads bfloat16; {kernel_linears} decoder linears on it): "
              f"{path_gaps.count(0)}/{len(path_gaps)} identical, {len(box_digits)} differ in box coordinates alone "
              f"(by at most {max(box_digits, default=0):.0f} of 1000, {sum(g < 10 for g in box_digits)} of them "
              f"by less than 10), {path_gaps.count(math.inf)} otherwise.",
              f"- AWQ teacher-forced logits at {logits['positions']} answer positions, `dtype=\"auto\"` (bfloat16 "
              f"activations, int4 CPU kernel) vs the dequantized float32 path: relative error "
              f"{logits['relative']:.4f}, argmax agreement {100 * logits['argmax_agree']:.1f}%.",
              "- The BF16 column computes in float32 from the bf16 weights (the engine's CPU default for "
              "unquantized checkpoints), the next one in bfloat16; the AWQ and RTN columns run the engine's "
              "default 4-bit CPU path (bfloat16 activations on the int4 kernel), the float32 one the same AWQ "
              "checkpoint dequantized once at load (`dtype=\"float32\"`, float32 throughout).",
              "- Evaluation time (load + all samples): " + ", ".join(f"{c} {seconds[c]:.0f} s" for c in COLUMNS) + ".",
              "",
              f"Reproduce: `python benchmarks/accuracy.py --n {n} --seed {seed} --group-size {group_size} --write`; "
              f"one column alone: `qwen2vl quantize MODEL OUT --method awq --group-size {group_size} "
              f"--calibration shapes` then `qwen2vl eval OUT --task shapes --n {n * len(TASKS)} --seed {seed}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "qwen2-vl-shapes-demo"))
    parser.add_argument("--n", type=int, default=500, help="samples per prompt type")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--work-dir", default=str(ROOT / ".cache" / "accuracy"), help="where the 4-bit checkpoints go")
    parser.add_argument("--write", action="store_true", help="put the section into docs/benchmarks.md")
    args = parser.parse_args()
    model = Path(args.model).resolve()
    results, seconds, kernel_vs_dequantized, logits = run(model, args.n, args.seed, args.group_size, Path(args.work_dir))
    section = markdown(results, model, args.n, args.seed, args.group_size, seconds, kernel_vs_dequantized, logits)
    print(section)
    if args.write:
        write_section(ROOT / "docs" / "benchmarks.md", "accuracy", section)


if __name__ == "__main__":
    main()
