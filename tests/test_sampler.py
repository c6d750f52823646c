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


@pytest.mark.parametrize("field, value, words", [
    ("seed", 1 << 63, r"seed=9223372036854775808.*int64"),  # would wrap onto the seed -2**63
    ("seed", -(1 << 63) - 1, "seed="),
    ("min_tokens", -1, "min_tokens=-1"),
    ("logit_bias", {5: 100.5}, r"bias of token id 5 is 100.5, expected a number in \[-100, 100\]"),
    ("logit_bias", {-1: 1.0}, "logit_bias"),
])
def test_new_sampling_fields_are_validated(field, value, words):
    with pytest.raises(InputError, match=words) as caught:
        SamplingParams(**{field: value}).resolve({})
    assert caught.value.field == field


def test_validation_errors_carry_the_field_and_the_callers_name():
    with pytest.raises(InputError, match="max_tokens=-1") as caught:
        SamplingParams(max_tokens=-1).validate()
    assert caught.value.field == "max_tokens"
    with pytest.raises(InputError, match=r"^sampling parameter top_logprobs=50 is invalid") as caught:
        SamplingParams(logprobs=50).validate(names={"logprobs": "top_logprobs"})
    assert caught.value.field == "top_logprobs"
    with pytest.raises(InputError, match="min_tokens=5 is invalid: expected at most max_completion_tokens=3"):
        SamplingParams(max_tokens=3, min_tokens=5).validate(names={"max_tokens": "max_completion_tokens"})
    for seed in ((1 << 63) - 1, -(1 << 63), 0):
        SamplingParams(seed=seed).validate()


def test_token_ids_are_checked_against_the_vocabulary():
    SamplingParams(stop_token_ids=[49], logit_bias={49: -3}).validate(vocab_size=V)
    with pytest.raises(InputError, match=r"stop_token_ids: token id 50 is outside the vocabulary \[0, 50\)") as caught:
        SamplingParams(stop_token_ids=[3, 50]).validate(vocab_size=V)
    assert caught.value.field == "stop_token_ids"
    with pytest.raises(InputError, match=r"logit_bias: token id 70 is outside the vocabulary \[0, 50\)") as caught:
        SamplingParams(logit_bias={70: 1.0}).validate(vocab_size=V)
    assert caught.value.field == "logit_bias"


def test_logit_bias_shifts_greedy_and_sampled_rows_and_bans(logits):
    from qwen2vl.layers.sampler import LogitBias

    least = logits.argmin(-1)
    rows = torch.arange(6)
    forced = LogitBias(rows, least, torch.full((6,), 100.0))
    greedy = make_batch([{"temperature": 0.0}] * 6, num_logprobs=1)
    greedy.logit_bias = forced
    out = Sampler()(logits, greedy)
    assert torch.equal(out.token_ids, least)
    # logprobs stay the model's own: before the bias
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).gather(1, least[:, None])[:, 0])
    best = logits.argmax(-1)
    banned = make_batch([{"temperature": 0.0}, {"temperature": 1.0}] * 3, generators=[seeded(r) for r in range(6)])
    banned.logit_bias = LogitBias(rows, best, torch.full((6,), float("-inf")))
    for _ in range(20):
        assert not (Sampler()(logits, banned).token_ids == best).any()


@pytest.fixture(scope="module")
def tiny_llm(tiny_ckpt):
    from qwen2vl import Qwen2VL

    return Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", num_kv_blocks=64)


@pytest.mark.parametrize("run_ahead", [False, True])
def test_min_tokens_holds_back_stop_tokens(tiny_ckpt, tiny_llm, run_ahead):
    from qwen2vl import Qwen2VL

    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", num_kv_blocks=64, run_ahead=True) if run_ahead else tiny_llm
    hello = [{"role": "user", "content": "Hello"}]
    first = llm.chat(hello, temperature=0, max_tokens=1).token_ids[0]
    stopped = llm.chat(hello, temperature=0, max_tokens=8, stop_token_ids=[first])
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.chat(hello, temperature=0, max_tokens=8, stop_token_ids=[first], min_tokens=3)
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]
    if held.finish_reason == "stop":  # allowed from the 4th token on
        assert len(held.token_ids) > 3 and held.token_ids[-1] in {first, *llm.engine.eos_token_ids}
    else:
        assert (held.finish_reason, len(held.token_ids)) == ("length", 8)


def test_logit_bias_through_the_engine(tiny_llm):
    hello = [{"role": "user", "content": "Hello"}]
    token = tiny_llm.processor.tokenizer.encode(" blue")[0]
    forced = tiny_llm.chat(hello, temperature=0, max_tokens=4, ignore_eos=True, logit_bias={token: 100})
    assert forced.token_ids == [token] * 4
    first = tiny_llm.chat(hello, temperature=0, max_tokens=1).token_ids[0]
    assert tiny_llm.chat(hello, temperature=0, max_tokens=1, logit_bias={first: -100}).token_ids[0] != first
