"""Where a model's descriptions of the shapes task go wrong, shape by shape.

    .venv/bin/python scripts/describe_errors.py [--model models/qwen2-vl-shapes-demo] [--n 300] [--seed 2024]

Greedy answers to N fresh "Describe this image." samples; prints accuracy per number of shapes,
then each wrongly named shape (the k-th named against the k-th left to right) by kind of error:
another shape of the image named at that place (the order, i.e. which shape the row looked at),
a colour or kind read wrong, or a wrong number of items. For order errors, the left-edge gap
between the two shapes in pixels after the processor's resize: shapes are ordered by the left
edge of their box, and a gap of a few pixels is a fraction of one 14-pixel patch.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.evals.runner import evaluate  # noqa: E402
from qwen2vl.evals.shapes import is_correct, left_to_right, make_samples  # noqa: E402


def named_shapes(answer: str) -> list[list[str]]:
    """`a red circle, a blue square and ...` -> [["red", "circle"], ["blue", "square"], ...]."""
    text = answer.replace("<|im_end|>", "").strip().replace(" and ", ", ")
    return [item.split()[1:] for item in text.split(", ")]


def error_kind(truth, place: int, named: list[list[str]]) -> tuple[str, object]:
    """What went wrong with the shape at `place` (left to right), and for an order error the other shape."""
    if len(named) != len(truth) or len(named[place]) != 2:
        return "number of items", None
    color, kind = named[place]
    other = next((o for o in truth if o is not truth[place] and (o.color, o.kind) == (color, kind)), None)
    if other is not None:
        return "another shape of the image (order)", other
    if color != truth[place].color and kind != truth[place].kind:
        return "colour and kind", None
    return ("colour" if color != truth[place].color else "kind"), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/qwen2-vl-shapes-demo")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    llm = Qwen2VL.from_pretrained(args.model)
    samples = make_samples(args.n, args.seed, ("describe",))
    answers: list[str] = []
    evaluate(llm, samples, on_answer=answers.append)
    by_count = collections.defaultdict(lambda: [0, 0])
    errors, order_gaps = collections.Counter(), []
    for sample, answer in zip(samples, answers):
        by_count[len(sample.shapes)][0] += is_correct(sample, answer)
        by_count[len(sample.shapes)][1] += 1
        image = sample.messages[0]["content"][0]["image"]
        scale = min(1.0, (llm.processor.max_pixels / (image.width * image.height)) ** 0.5)
        truth, named = left_to_right(sample.shapes), named_shapes(answer)
        for place, shape in enumerate(truth):
            if place < len(named) and named[place] == [shape.color, shape.kind]:
                continue
            kind, other = error_kind(truth, place, named)
            errors[kind] += 1
            if other is not None:
                order_gaps.append(round(abs(other.x - shape.x) * scale))
    print("right, by number of shapes:", ", ".join(f"{count}: {right}/{total}" for count, (right, total) in sorted(by_count.items())))
    print("wrongly named shapes:", ", ".join(f"{kind} {count}" for kind, count in errors.most_common()))
    if order_gaps:
        print(f"order errors, left-edge gap after resize (px): under 14: {sum(g < 14 for g in order_gaps)}, "
              f"14-27: {sum(14 <= g < 28 for g in order_gaps)}, 28 or more: {sum(g >= 28 for g in order_gaps)}; "
              f"all: {sorted(order_gaps)}")


if __name__ == "__main__":
    main()
