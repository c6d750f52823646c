"""The prefix cache and the vision cache: outputs as without them (and as transformers'), with
the blocks and encodings of earlier requests reused, and the block accounting exact."""
from __future__ import annotations

import random

import pytest
import torch

from qwen2vl import Qwen2VL
from qwen2vl.engine.block_manager import block_digest, salt_digest
from qwen2vl.errors import InputError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams
from test_engine import (CONVERSATIONS, GREEDY, drain, hf_model, make_engine, model, picture,  # noqa: F401
                         processor, prompts, reference, run, singles, user)

TOP5 = SamplingParams.from_overrides(GREEDY, logprobs=5)


def cached(outputs) -> list[int]:
    return [output.num_cached_tokens for output in outputs]


def test_the_conversations_answered_twice_in_one_engine(model, processor, prompts, reference):  # noqa: F811
    names = list(CONVERSATIONS)
    engine = make_engine(model, processor)
    first = run(engine, [prompts[n] for n in names], TOP5)
    second = run(engine, [prompts[n] for n in names], TOP5)  # one batch, every prompt from the cache
    assert cached(first) == [0] * len(names)
    assert all(hit >= len(prompts[n]) - 16 for hit, n in zip(cached(second), names))
    for name, a, b in zip(names, first, second):
        assert a.token_ids == b.token_ids == reference[name][0], name
        for step, (ours, again) in enumerate(zip(a.logprobs, b.logprobs)):
            assert ours.keys() == again.keys()
            assert all(abs(ours[t] - again[t]) < 1e-4 for t in ours), (name, step)
        top, top_ids = reference[name][1][0].topk(5)
        assert all(abs(b.logprobs[0][t] - v) < 1e-4 for t, v in zip(top_ids.tolist(), top.tolist()))
    assert engine.num_free_blocks == engine.num_total_blocks


def test_a_second_turn_reuses_the_first_and_its_answer(tiny_ckpt):
    on = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=256)
    off = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=256, prefix_caching=False)
    turn = [user({"type": "image", "image": picture(84, 56, 1)}, "Describe this image.")]
    greedy = dict(max_tokens=40, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    first = on.chat(turn, **greedy)
    assert first.usage.cached_tokens == 0 and first.token_ids == off.chat(turn, **greedy).token_ids
    history = turn + [{"role": "assistant", "content": first.text}, user("And the colours?")]
    second, reference_second = on.chat(history, **greedy), off.chat(history, **greedy)
    assert second.token_ids == reference_second.token_ids
    assert reference_second.usage.cached_tokens == 0
    # the first turn's full prompt blocks come from the cache (the random model's answer need not
    # tokenize back to the tokens it generated; the next test reuses generated tokens exactly)
    assert second.usage.cached_tokens >= 16 * (first.usage.prompt_tokens // 16) > 0
    assert on.engine.block_manager.num_hit_tokens == second.usage.cached_tokens


def test_full_blocks_of_generated_tokens_are_cached_too(model, processor, prompts):  # noqa: F811
    """A follow-up whose tokens continue the first answer exactly starts after all its full blocks."""
    first_prompt = prompts["image"]
    engine = make_engine(model, processor, block_size=4)
    [first] = run(engine, [first_prompt])
    more = processor.tokenizer.encode(" and then?")
    ids = first_prompt.input_ids + first.token_ids + more
    length = len(first_prompt)
    tail = torch.arange(length, len(ids)) + first_prompt.rope_delta
    follow_up = PreparedPrompt(ids, torch.cat([first_prompt.positions, tail.expand(3, -1)], dim=1),
                               first_prompt.rope_delta, first_prompt.vision_items)
    alone = run(make_engine(model, processor, prefix_caching=False), [follow_up])[0]
    [second] = run(engine, [follow_up])
    assert second.num_cached_tokens == 4 * ((length + len(first.token_ids) - 1) // 4)
    assert second.token_ids == alone.token_ids


def test_positions_depend_only_on_the_prefix(processor):  # noqa: F811
    """What makes reuse exact: a prompt's M-RoPE positions are those of any prompt it starts, and
    a generated token's (index + rope_delta) is what the next turn's prompt gives it."""
    turn = [user({"type": "image", "image": picture(84, 56, 1)}, "Describe this image.")]
    first = processor.prepare(turn)
    answer = "A small picture of colours."
    second = processor.prepare(turn + [{"role": "assistant", "content": answer}, user("More?")])
    length = len(first)
    assert second.input_ids[:length] == first.input_ids
    assert torch.equal(second.positions[:, :length], first.positions)
    answer_ids = processor.tokenizer.encode(answer)
    assert second.input_ids[length:length + len(answer_ids)] == answer_ids
    expected = torch.arange(length, length + len(answer_ids)) + first.rope_delta
    assert torch.equal(second.positions[:, length:length + len(answer_ids)], expected.expand(3, -1))


def test_a_shared_system_prompt_across_a_batch(model, processor, singles):  # noqa: F811
    system = {"role": "system", "content": "You are a careful assistant who looks closely. " * 6}
    questions = ["What is this?", "Count the colours.", "Is it bright?", "Describe it in one word."]
    image = {"type": "image", "image": picture(84, 56, 1)}
    conversations = [[system, user(image, q)] for q in questions]
    batch = [processor.prepare(c) for c in conversations]
    alone = [run(make_engine(model, processor, prefix_caching=False), [p])[0] for p in batch]
    engine = make_engine(model, processor)
    run(engine, batch[:1])
    outputs = run(engine, batch[1:])
    assert [o.token_ids for o in outputs] == [a.token_ids for a in alone[1:]]
    shared = len(batch[0].input_ids) - len("Describe it in one word.") // 2
    assert all(hit >= 16 * ((shared - 40) // 16) for hit in cached(outputs))
    assert engine.num_free_blocks == engine.num_total_blocks


def test_a_cached_prefix_ending_inside_an_image(model, processor, prompts, singles):  # noqa: F811
    """The first request is aborted after a chunk that ends inside its image: the second starts
    from those blocks and needs the image's embeddings from the middle (the vision cache off, so
    they are encoded again)."""
    prompt = prompts["image"]
    pads = [i for i, t in enumerate(prompt.input_ids) if t == model.config.image_token_id]
    engine = make_engine(model, processor, block_size=4, max_num_batched_tokens=pads[0] + 3, vision_cache_bytes=0)
    doomed = engine.add_request(prompt, GREEDY)
    engine.step()
    engine.abort(doomed)
    [output] = run(engine, [prompt])
    assert pads[0] < output.num_cached_tokens < pads[-1]
    assert output.token_ids == singles["image"].token_ids
    assert engine.num_free_blocks == engine.num_total_blocks


def test_two_same_size_images_never_share_blocks(model, processor):  # noqa: F811
    question = "Describe this image in detail please."
    a, b = (processor.prepare([user({"type": "image", "image": picture(84, 56, seed)}, question)]) for seed in (1, 2))
    assert a.input_ids == b.input_ids  # the same pad tokens: only the pixels differ
    alone = run(make_engine(model, processor, prefix_caching=False), [b])[0]
    engine = make_engine(model, processor, block_size=4)
    run(engine, [a])
    [second] = run(engine, [b])
    first_pad = a.input_ids.index(model.config.image_token_id)
    assert second.num_cached_tokens <= first_pad  # the blocks before the image, none of it
    assert second.token_ids == alone.token_ids


def test_block_digests_are_chained_and_take_the_media():
    one = block_digest(b"", [1, 2, 3, 4], [])
    assert len(one) == 32 and one == block_digest(b"", [1, 2, 3, 4], [])
    assert block_digest(one, [5, 6], []) != block_digest(b"", [5, 6], [])
    assert block_digest(b"", [9, 9], [(b"a" * 32, 0)]) != block_digest(b"", [9, 9], [(b"b" * 32, 0)])
    assert block_digest(b"", [9, 9], [(b"a" * 32, 0)]) != block_digest(b"", [9, 9], [(b"a" * 32, 2)])


def test_preemption_and_eviction_with_shared_blocks(model, processor, prompts, singles):  # noqa: F811
    """A pool of a few blocks: sequences sharing a prefix are preempted and recomputed, cached
    blocks are evicted and taken again; every output is the one of a run alone."""
    names = ["image", "image", "text", "multi_turn", "image", "text"]
    longest = max(len(prompts[n]) for n in names) + GREEDY.max_tokens
    engine = make_engine(model, processor, block_size=4, num_kv_blocks=-(-longest // 4) + 12, max_num_batched_tokens=48)
    outputs = run(engine, [prompts[n] for n in names])
    assert engine.num_preemptions > 0
    assert [o.token_ids for o in outputs] == [singles[n].token_ids for n in names]
    assert engine.num_free_blocks == engine.num_total_blocks
    assert engine.block_manager.num_hit_tokens > 0


def test_block_accounting_under_random_arrival_abort_and_preemption(model, processor, prompts, singles):  # noqa: F811
    rng = random.Random(0)
    names = list(CONVERSATIONS)
    longest = max(len(p) for p in prompts.values()) + GREEDY.max_tokens
    engine = make_engine(model, processor, block_size=4, num_kv_blocks=-(-longest // 4) + 20, max_num_batched_tokens=40)
    start = engine.num_free_blocks
    ids, aborted = {}, set()
    for _ in range(6):
        name = rng.choice(names)
        ids[engine.add_request(prompts[name], GREEDY)] = name

    def chaos():
        if rng.random() < 0.3 and len(ids) < 16:
            name = rng.choice(names)
            ids[engine.add_request(prompts[name], GREEDY)] = name
        live = [i for i in ids if i not in aborted]
        if live and rng.random() < 0.1:
            victim = rng.choice(live)
            if engine.abort(victim) is not None:
                aborted.add(victim)

    final = drain(engine, on_step=chaos)
    assert engine.num_free_blocks == start == engine.num_total_blocks
    for request_id, name in ids.items():
        if request_id not in aborted and request_id in final:
            assert final[request_id].token_ids == singles[name].token_ids, name


def test_the_vision_cache_encodes_an_image_once(model, processor, prompts, singles, monkeypatch):  # noqa: F811
    engine = make_engine(model, processor, prefix_caching=False)
    encoded = []
    encode = engine.runner.encode_vision
    monkeypatch.setattr(engine.runner, "encode_vision", lambda works: encoded.append(len(works)) or encode(works))
    outputs = run(engine, [prompts["image"]]) + run(engine, [prompts["image"]])
    assert encoded == [1] and engine.vision_cache.num_hits == 1
    assert [o.token_ids for o in outputs] == [singles["image"].token_ids] * 2


def _salted(engine, prompt, cache_salt):
    """Run `prompt` alone under `cache_salt`; its final output."""
    request_id = engine.add_request(prompt, GREEDY, cache_salt=cache_salt)
    return drain(engine)[request_id]


def _count_encodings(engine, monkeypatch) -> list[int]:
    """The number of vision items each call of the vision encoder gets, as it is called."""
    encoded = []
    encode = engine.runner.encode_vision
    monkeypatch.setattr(engine.runner, "encode_vision",
                        lambda works: encoded.append(sum(len(w.items) for w in works)) or encode(works))
    return encoded


def test_a_cache_salt_shares_blocks_only_within_itself(model, processor, prompts, singles, monkeypatch):  # noqa: F811
    """The same image prompt under two salts shares no block and is encoded for each; under one
    salt (or none, as before) it is shared."""
    prompt = prompts["image"]
    engine = make_engine(model, processor)
    encoded = _count_encodings(engine, monkeypatch)
    outputs = [_salted(engine, prompt, salt) for salt in ("alice", "bob", None, "alice", None, "bob")]
    full = 16 * ((len(prompt) - 1) // 16)
    assert cached(outputs) == [0, 0, 0, full, full, full]
    # once per salt; each repeat starts from its salt's blocks (which end inside the image: the
    # rest of its rows come from its salt's vision cache)
    assert encoded == [1, 1, 1] and engine.vision_cache.num_hits == 3
    assert [o.token_ids for o in outputs] == [singles["image"].token_ids] * 6
    assert engine.num_free_blocks == engine.num_total_blocks


def test_the_vision_cache_is_shared_only_within_a_salt(model, processor, prompts, singles, monkeypatch):  # noqa: F811
    engine = make_engine(model, processor, prefix_caching=False)
    encoded = _count_encodings(engine, monkeypatch)
    outputs = [_salted(engine, prompts["image"], salt) for salt in ("alice", "bob", "alice", None, None)]
    assert encoded == [1, 1, 1] and engine.vision_cache.num_hits == 2  # alice's and the unsalted repeat
    assert [o.token_ids for o in outputs] == [singles["image"].token_ids] * 5


def test_a_salt_is_the_first_blocks_parent():
    first = block_digest(salt_digest("alice"), [1, 2, 3, 4], [])
    assert salt_digest(None) == b"" and len(salt_digest("alice")) == 32
    assert first != block_digest(b"", [1, 2, 3, 4], []) != block_digest(salt_digest("bob"), [1, 2, 3, 4], [])
    assert first == block_digest(salt_digest("alice"), [1, 2, 3, 4], [])
    assert salt_digest("\ud800") != salt_digest("\ud801")  # lone surrogates hash too


@pytest.mark.parametrize("salt, message", [(7, "cache_salt must be a string, not int"),
                                           ("", "cache_salt has 0 characters; give 1 to 256"),
                                           ("x" * 257, "cache_salt has 257 characters; give 1 to 256")])
def test_a_bad_cache_salt_is_refused_by_name(model, processor, prompts, salt, message):  # noqa: F811
    engine = make_engine(model, processor)
    with pytest.raises(InputError, match=message) as caught:
        engine.add_request(prompts["text"], GREEDY, cache_salt=salt)
    assert caught.value.field == "cache_salt" and not engine.has_unfinished()


def test_the_python_api_takes_a_cache_salt(tiny_ckpt):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=64)
    turn = [user({"type": "image", "image": picture(84, 56, 1)}, "Describe this image.")]
    greedy = dict(max_tokens=2, temperature=0)
    first = llm.chat(turn, cache_salt="alice", **greedy)
    assert llm.chat(turn, cache_salt="bob", **greedy).usage.cached_tokens == 0
    streamed = llm.chat(turn, cache_salt="carol", stream=True, **greedy)
    assert "".join(streamed) == first.text and streamed.completion.usage.cached_tokens == 0
    assert llm.complete([llm.processor.prepare(turn)], cache_salt="dave", **greedy)[0].usage.cached_tokens == 0
    assert llm.chat(turn, cache_salt="alice", **greedy).usage.cached_tokens > 0
    with pytest.raises(InputError, match="cache_salt must be a string, not bytes"):
        llm.chat(turn, cache_salt=b"alice")
