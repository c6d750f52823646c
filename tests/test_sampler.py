"""The batched sampler against transformers' logits processors, and its per-row seeding."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen2vl.errors import InputError
from qwen2vl.layers.sampler import Sampler, SamplingBatch, apply_filters, apply_penalties
from qwen2vl.sampling_params import SamplingParams

V = 50


def make_batch(rows: list[dict], prompt=None, output=None, generators=None, num_logprobs=None) -> SamplingBatch:
    def col(name, default, dtype):
        return torch.tensor([row.get(name, default) for row in rows], dtype=dtype)

    batch = SamplingBatch(
        temperature=col("temperature", 1.0, torch.float32),
        top_k=col("top_k", 0, torch.long),
        top_p=col("top_p", 1.0, torch.float32),
        min_p=col("min_p", 0.0, torch.float32),
        repetition_penalty=col("repetition_penalty", 1.0, torch.float32),
        presence_penalty=col("presence_penalty", 0.0, torch.float32),
        frequency_penalty=col("frequency_penalty", 0.0, torch.float32),
        prompt_tokens=prompt,
        output_tokens=output,
        generators=generators or [None] * len(rows),
        num_logprobs=num_logprobs,
        all_greedy=all(row.get("temperature", 1.0) == 0 for row in rows),
        any_penalty=prompt is not None,
        any_filter=any("top_k" in row or "top_p" in row or "min_p" in row for row in rows),
    )
    return batch


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=seeded(0)) * 3


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax(logits):
    out = Sampler()(logits, make_batch([{"temperature": 0.0}] * 6, num_logprobs=5))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    reference = torch.log_softmax(logits, -1)
    top, top_ids = reference.topk(5, -1)
    assert torch.equal(out.top_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs, top, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_candidates", [4, 1024])  # 4: most rows are redone over the vocabulary
@pytest.mark.parametrize("row", [
    {"top_k": 7}, {"top_p": 0.6}, {"min_p": 0.2}, {"top_p": 0.99}, {"min_p": 0.001},
    {"top_k": 10, "top_p": 0.8, "min_p": 0.05}, {"top_k": 1}, {"top_p": 0.01},
])
def test_filters_match_transformers(logits, row, num_candidates):
    batch = make_batch([row] * 6)
    ours = apply_filters(logits, batch.top_k, batch.top_p, batch.min_p, num_candidates)
    expected = logits
    if "top_k" in row:
        expected = TopKLogitsWarper(row["top_k"])(None, expected)
    if "top_p" in row:
        expected = TopPLogitsWarper(row["top_p"])(None, expected)
    if "min_p" in row:
        expected = MinPLogitsWarper(row["min_p"])(None, expected)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert not torch.isinf(ours).all(dim=-1).any()
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_filters_apply_per_row(logits):
    rows = [{"top_k": 3}, {"top_p": 0.5}, {}, {"min_p": 0.3}, {"top_k": 1}, {"top_p": 0.999}]
    batch = make_batch(rows)
    batched = apply_filters(logits, batch.top_k, batch.top_p, batch.min_p, num_candidates=8)
    for r, row in enumerate(rows):
        single = make_batch([row])
        alone = apply_filters(logits[r:r + 1], single.top_k, single.top_p, single.min_p, num_candidates=8)
        assert torch.equal(batched[r:r + 1], alone)
    assert not torch.isinf(batched[2]).any()
    assert (~torch.isinf(batched[0])).sum() == 3


def test_repetition_penalty_matches_transformers_and_other_penalties(logits):
    prompt = torch.tensor([[1, 2, 3, V, V]] * 6)
    output = torch.tensor([[3, 4, 4, 4]] * 6)
    batch = make_batch([{"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25}] * 6,
                       prompt=prompt, output=output)
    ours = apply_penalties(logits, batch)
    seen = torch.tensor([[1, 2, 3, 3, 4, 4, 4]] * 6)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    expected[:, 3] -= 0.5 + 0.25 * 1
    expected[:, 4] -= 0.5 + 0.25 * 3
    torch.testing.assert_close(ours, expected)
    untouched = [t for t in range(V) if t not in (1, 2, 3, 4)]
    assert torch.equal(ours[:, untouched], logits[:, untouched])


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    out = Sampler()(logits, make_batch([{"temperature": 0.7}] * 20000))
    frequency = torch.bincount(out.token_ids, minlength=4).float() / 20000
    expected = TemperatureLogitsWarper(0.7)(None, logits[:1]).softmax(-1)[0]
    torch.testing.assert_close(frequency, expected, atol=0.015, rtol=0)


def test_seeded_rows_do_not_depend_on_the_batch(logits):
    rows = [{"temperature": 1.5}] * 6
    alone = [Sampler()(logits[r:r + 1], make_batch(rows[:1], generators=[seeded(10 + r)])).token_ids.item()
             for r in range(6)]
    draws = [Sampler()(logits, make_batch(rows, generators=[seeded(10 + r) for r in range(6)])).token_ids.tolist()]
    torch.manual_seed(123)  # unseeded rows beside seeded ones leave them unchanged
    mixed = make_batch(rows, generators=[seeded(10 + r) if r % 2 else None for r in range(6)])
    mixed_ids = Sampler()(logits, mixed).token_ids.tolist()
    assert draws[0] == alone
    assert [mixed_ids[r] for r in (1, 3, 5)] == [alone[r] for r in (1, 3, 5)]


def test_seeded_generator_stream_is_reproducible(logits):
    def run(seed):
        generator = seeded(seed)
        return [Sampler()(logits, make_batch([{"temperature": 2.0}] * 6, generators=[generator] * 6)).token_ids.tolist()
                for _ in range(4)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_is_greedy_and_mixed_greedy_rows(logits):
    rows = [{"top_k": 1, "temperature": 1.3}, {"temperature": 0.0}] * 3
    out = Sampler()(logits, make_batch(rows))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_sampling_params_resolve_from_generation_config():
    config = {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}
    p = SamplingParams().resolve(config)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.1, 0.001, 1, 1.05, 256)
    p = SamplingParams(temperature=0.0, top_k=-1, stop="x").resolve(config)
    assert (p.temperature, p.top_k, p.stop, p.greedy) == (0.0, 0, ["x"], True)
    p = SamplingParams().resolve({"do_sample": False, "temperature": 0.7, "max_new_tokens": 12})
    assert (p.temperature, p.max_tokens) == (0.0, 12)
    p = SamplingParams().resolve(None)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)


def test_sampling_params_overrides_follow_transformers_names():
    p = SamplingParams.from_overrides(SamplingParams(temperature=0.5, seed=3), max_new_tokens=9, do_sample=False)
    assert (p.max_tokens, p.temperature, p.seed) == (9, 0.0, 3)
    assert SamplingParams.from_overrides(None, do_sample=True, top_p=0.9).temperature is None
    with pytest.raises(InputError, match="unknown sampling parameter.*max_lenght"):
        SamplingParams.from_overrides(None, max_lenght=3)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.5, "temperature=-0.5.*>= 0"),
    ("top_p", 0.0, r"top_p=0.0.*\(0, 1\]"),
    ("top_p", 1.5, "top_p=1.5"),
    ("top_k", -2, "top_k=-2"),
    ("min_p", 2.0, "min_p=2.0"),
    ("max_tokens", 0, "max_tokens=0"),
    ("repetition_penalty", 0.0, "repetition_penalty=0.0"),
    ("presence_penalty", 3.0, "presence_penalty=3.0"),
    ("logprobs", 21, "logprobs=21"),
    ("stop", ["ok", ""], "stop="),
    ("seed", 1.5, "seed=1.5"),
])
def test_sampling_params_validation_names_the_field(field, value, words):
    with pytest.raises(InputError, match=words):
        SamplingParams(**{field: value}).resolve({})
