"""Accuracy of a loaded model on freshly generated shapes samples, per prompt type."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen2vl.evals.shapes import TASKS, Sample, is_correct, make_samples
from qwen2vl.processor.types import PreparedPrompt

# The longest answer (a grounding box) is ~24 tokens; a wrong answer should stop, not ramble.
MAX_ANSWER_TOKENS = 48


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (expected, answered), first few

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class TeacherForced:
    """A sample's prompt followed by its true answer and <|im_end|>: what teacher forcing feeds
    the model (training, logit comparisons). Rows `answer_start - 1 ..` predict the answer."""

    prompt: PreparedPrompt
    ids: list[int]
    positions: torch.Tensor  # M-RoPE `[3, len(ids)]`: the prompt's, then text positions after it

    @property
    def answer_start(self) -> int:
        return len(self.prompt.input_ids)


def teacher_forced(processor, sample: Sample) -> TeacherForced:
    prompt = processor.prepare(sample.messages)
    answer = processor.tokenizer.encode(sample.answer) + [processor.tokenizer.token_to_id("<|im_end|>")]
    tail = torch.arange(len(prompt.input_ids), len(prompt.input_ids) + len(answer)) + prompt.rope_delta
    return TeacherForced(prompt, prompt.input_ids + answer, torch.cat([prompt.positions, tail.expand(3, -1)], dim=1))


def evaluate(llm, samples: list[Sample], batch_size: int = 32,
             progress: Callable[[int, int], None] | None = None,
             on_answer: Callable[[str], None] | None = None) -> dict[str, TaskScore]:
    """Greedy answers of `llm` (a `Qwen2VL`) to `samples`, scored per task; `on_answer` sees
    every raw answer (special tokens kept) in sample order."""
    scores = {task: TaskScore() for task in dict.fromkeys(s.task for s in samples)}
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        completions = llm.chat([s.messages for s in chunk], temperature=0.0, repetition_penalty=1.0,
                               max_tokens=MAX_ANSWER_TOKENS)
        for sample, completion in zip(chunk, completions):
            score = scores[sample.task]
            score.total += 1
            if on_answer:
                on_answer(completion.raw_text)
            if is_correct(sample, completion.raw_text):
                score.correct += 1
            elif len(score.failures) < 5:
                score.failures.append((sample.answer, completion.raw_text))
        if progress:
            progress(min(first + batch_size, len(samples)), len(samples))
    return scores


def evaluate_fresh(llm, n: int, seed: int, tasks: tuple[str, ...] = TASKS, **options) -> dict[str, TaskScore]:
    """`n` fresh samples in all, generated from `seed` and dealt to the tasks in turn (each gets
    n // len(tasks), the first n % len(tasks) one more): the first n of `make_samples`' sequence."""
    return evaluate(llm, make_samples(-(-n // len(tasks)), seed, tasks)[:n], **options)


def format_scores(scores: dict[str, TaskScore]) -> str:
    lines = [f"{'task':<10} {'accuracy':>9} {'correct':>9}"]
    for task, score in scores.items():
        lines.append(f"{task:<10} {100 * score.accuracy:>8.1f}% {score.correct:>4}/{score.total:<4}")
    mean = sum(s.accuracy for s in scores.values()) / max(1, len(scores))
    lines.append(f"{'mean':<10} {100 * mean:>8.1f}%")
    return "\n".join(lines)
