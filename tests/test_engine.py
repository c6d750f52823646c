"""LLMEngine end to end on a tiny random checkpoint, against transformers' `generate`.

Every run goes through `run`, which also checks that the streamed text deltas of each request
concatenate to its final text.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qwen2vl.engine import LLMEngine, Sequence
from qwen2vl.engine.step_batch import output_tokens
from qwen2vl.engine.scheduler import StepPlan, make_span
from qwen2vl.errors import InputError
from qwen2vl.loader import load_model
from qwen2vl.processor import IncrementalDetokenizer, Processor
from qwen2vl.processor.types import PreparedPrompt, VisionItem
from qwen2vl.sampling_params import SamplingParams

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour pattern plus noise, so patches differ from each other."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([xs, ys, (xs + ys) / 2]) * torch.rand(3, 1, 1, generator=g)
    pixels = (base + 0.3 * torch.rand(3, height, width, generator=g)).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy())


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


CONVERSATIONS = {
    "text": [user("Hello, who are you? Answer in one sentence.")],
    "image": [user({"type": "image", "image": picture(84, 56, 1)}, "Describe this image.")],
    "multi_image": [user({"type": "image", "image": picture(56, 112, 2)}, "and",
                         {"type": "image", "image": picture(112, 84, 3)}, "What differs?")],
    "video": [user({"type": "video", "video": [picture(56, 56, 10 + i) for i in range(4)]}, "What happens?")],
    "multi_turn": [{"role": "system", "content": "Be brief."}, user("Hi!"),
                   {"role": "assistant", "content": "Hello."}, user("Count to five.")],
    "image_and_video": [user({"type": "image", "image": picture(112, 56, 4)},
                             {"type": "video", "video": [picture(84, 56, 20 + i) for i in range(2)]}, "Compare.")],
}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Processor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def prompts(processor) -> dict[str, PreparedPrompt]:
    return {name: processor.prepare(messages) for name, messages in CONVERSATIONS.items()}


def make_engine(model, processor, **options) -> LLMEngine:
    options.setdefault("num_kv_blocks", 128)
    return LLMEngine(model, processor, **options)


def run(engine: LLMEngine, prompts: list[PreparedPrompt], params=GREEDY) -> list:
    """Run to completion; final outputs in order. Checks every request's streamed deltas."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
    final = drain(engine)
    return [final[request_id] for request_id in ids]


def drain(engine: LLMEngine, on_step=None) -> dict:
    """Step until nothing is left; final outputs by request id."""
    final, streamed, tokens = {}, {}, {}
    while engine.has_unfinished():
        for output in engine.step():
            streamed[output.request_id] = streamed.get(output.request_id, "") + output.text_delta
            tokens[output.request_id] = tokens.get(output.request_id, []) + output.new_token_ids
            if output.finished:
                final[output.request_id] = output
        if on_step is not None:
            on_step()
    for request_id, output in final.items():
        assert streamed[request_id] == output.text
        assert tokens[request_id] == output.token_ids
    return final


@pytest.fixture(scope="module")
def singles(model, processor, prompts):
    """Each conversation alone in a fresh engine, greedy."""
    return {name: run(make_engine(model, processor), [prompt])[0] for name, prompt in prompts.items()}


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


def hf_generate(hf, prompt: PreparedPrompt, **kwargs):
    """transformers `generate` on the same token ids and pixels, greedy, NEW_TOKENS long by default."""
    input_ids = torch.tensor([prompt.input_ids])
    # M-RoPE needs to know which tokens are image (1) and video (2) pads
    token_types = (input_ids == hf.config.image_token_id).long() + 2 * (input_ids == hf.config.video_token_id).long()
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": token_types}
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        items = [item for item in prompt.vision_items if item.kind == kind]
        if items:
            inputs[pixels_key] = torch.cat([item.pixel_values for item in items])
            inputs[grid_key] = torch.tensor([item.grid_thw for item in items])
    kwargs.setdefault("min_new_tokens", NEW_TOKENS)
    with torch.no_grad():
        return hf.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **kwargs)


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    """transformers greedy ids and log-softmax of the raw logits of the first 8 steps."""
    results = {}
    for name, prompt in prompts.items():
        out = hf_generate(hf_model, prompt, repetition_penalty=1.0, output_logits=True)
        logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits[:8]]
        results[name] = (out.sequences[0, len(prompt):].tolist(), logprobs)
    return results


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_equals_transformers(singles, reference, prompts, name):
    ids, _ = reference[name]
    assert len(ids) == NEW_TOKENS
    assert singles[name].token_ids == ids
    assert singles[name].finish_reason == "length"
    if prompts[name].vision_items:
        assert prompts[name].rope_delta != 0  # decode positions are shifted


def test_outputs_vary_between_conversations(singles):
    assert len({tuple(output.token_ids) for output in singles.values()}) == len(singles)
    assert all(len(set(output.token_ids)) > 8 for output in singles.values())


def test_top5_logprobs_match_transformers(model, processor, prompts, reference):
    names = ["text", "image", "video"]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    only_sampled = SamplingParams.from_overrides(params, logprobs=0)
    *outputs, image_sampled_only = run(make_engine(model, processor), [prompts[n] for n in names] + [prompts["image"]],
                                       [params] * 3 + [only_sampled])
    assert [list(step) for step in image_sampled_only.logprobs] == [[t] for t in image_sampled_only.token_ids]
    for name, output in zip(names, outputs):
        expected = reference[name][1]
        assert len(output.logprobs) == 8
        for step, (ours, theirs) in enumerate(zip(output.logprobs, expected)):
            top, top_ids = theirs.topk(5)
            assert set(ours) == set(top_ids.tolist()) | {output.token_ids[step]}
            for token_id, logprob in zip(top_ids.tolist(), top.tolist()):
                assert abs(ours[token_id] - logprob) < 1e-4


def test_batch_of_six_equals_single_runs(model, processor, prompts, singles):
    names = list(CONVERSATIONS)
    outputs = run(make_engine(model, processor), [prompts[n] for n in names])
    assert [o.token_ids for o in outputs] == [singles[n].token_ids for n in names]
    assert [o.text for o in outputs] == [singles[n].text for n in names]


def test_same_length_prompts_share_one_attention_call_per_layer(model, processor, prompts, singles, monkeypatch):
    """Prompts computed from their start in one step are attended by prompt length: three copies
    of one conversation and a second one make two causal calls per layer, not four, and their
    answers equal the single runs'."""
    from qwen2vl.layers import attention

    calls = []
    packed = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *args, **kwargs: calls.append(
        sorted(count for _, count, _ in args[3].groups)) or packed(*args, **kwargs))
    names = ["image", "image", "text", "image"]
    outputs = run(make_engine(model, processor), [prompts[n] for n in names])
    assert [o.token_ids for o in outputs] == [singles[n].token_ids for n in names]
    layers = model.config.text.num_layers
    assert calls[:layers] == [[1, 3]] * layers  # the prefill step; decode steps have no prompt rows
    assert all(groups == [] for groups in calls[layers:])


def test_chunked_prefill_equals_single_runs(model, processor, prompts, singles):
    names = list(CONVERSATIONS)
    engine = make_engine(model, processor, max_num_batched_tokens=7)
    outputs = run(engine, [prompts[n] for n in names])
    assert max(len(prompts[n]) for n in names) > 7 * 4  # every prompt takes several steps
    assert [o.token_ids for o in outputs] == [singles[n].token_ids for n in names]


def test_preemption_with_a_small_pool_keeps_outputs(model, processor, prompts, singles, monkeypatch):
    encoded = []
    encode = model.encode_vision
    monkeypatch.setattr(model, "encode_vision", lambda pixels, grid: encoded.append(len(grid)) or encode(pixels, grid))
    names = list(CONVERSATIONS)
    longest = max(len(prompts[n]) for n in names) + NEW_TOKENS
    engine = make_engine(model, processor, block_size=4, num_kv_blocks=-(-longest // 4) + 4)
    start = engine.num_free_blocks
    outputs = run(engine, [prompts[n] for n in names])
    assert engine.num_preemptions > 0
    # each request's items encoded once (requests admitted together share a call), never again
    # after preemption
    assert sum(encoded) == sum(len(prompts[n].vision_items) for n in names)
    assert len(encoded) <= sum(1 for n in names if prompts[n].vision_items)
    assert [o.token_ids for o in outputs] == [singles[n].token_ids for n in names]
    assert engine.num_free_blocks == start


def test_requests_admitted_together_share_one_vision_encoder_call(model, processor, prompts, singles, monkeypatch):
    encoded = []
    encode = model.encode_vision
    monkeypatch.setattr(model, "encode_vision", lambda pixels, grid: encoded.append(len(grid)) or encode(pixels, grid))
    names = [n for n in CONVERSATIONS if prompts[n].vision_items]
    outputs = run(make_engine(model, processor), [prompts[n] for n in names])
    assert encoded == [sum(len(prompts[n].vision_items) for n in names)]
    assert [o.token_ids for o in outputs] == [singles[n].token_ids for n in names]


def test_requests_added_while_others_decode(model, processor, prompts, singles):
    engine = make_engine(model, processor, max_num_batched_tokens=64)
    pending = list(CONVERSATIONS)
    ids = {}
    steps = 0

    def add_next():
        name = pending.pop(0)
        ids[name] = engine.add_request(prompts[name], GREEDY)


    def add_every_third_step():
        nonlocal steps
        steps += 1
        if pending and steps % 3 == 0:
            assert engine.has_unfinished()
            add_next()

    add_next()
    outputs = drain(engine, on_step=add_every_third_step)
    assert not pending and steps < len(CONVERSATIONS) * NEW_TOKENS
    assert {name: outputs[ids[name]].token_ids for name in ids} == {name: singles[name].token_ids for name in ids}


def test_abort_frees_blocks_and_others_go_on(model, processor, prompts, singles):
    engine = make_engine(model, processor)
    start = engine.num_free_blocks
    keep = engine.add_request(prompts["image"], GREEDY)
    doomed = engine.add_request(prompts["video"], GREEDY)
    aborted, steps = [], [0]

    def abort_at_step_five():
        steps[0] += 1
        if steps[0] == 5:
            assert engine.num_free_blocks < start
            aborted.append(engine.abort(doomed))
            assert engine.abort(doomed) is None

    outputs = drain(engine, on_step=abort_at_step_five)
    assert aborted[0].finished and aborted[0].finish_reason == "abort" and 0 < len(aborted[0].token_ids) < NEW_TOKENS
    assert doomed not in outputs
    assert outputs[keep].token_ids == singles["image"].token_ids
    assert engine.num_free_blocks == start


def test_seeded_sampling_is_reproducible_and_batch_independent(model, processor, prompts):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    engine = make_engine(model, processor)
    (first,) = run(engine, [prompts["image"]], params)
    (again,) = run(engine, [prompts["image"]], params)
    batched = run(engine, [prompts["text"], prompts["image"], prompts["video"]],
                  [SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True), params, GREEDY])
    (other_seed,) = run(engine, [prompts["image"]], SamplingParams.from_overrides(params, seed=99))
    assert first.token_ids == again.token_ids == batched[1].token_ids
    assert other_seed.token_ids != first.token_ids


def test_repetition_penalty_and_eos_equal_transformers(model, processor, prompts, hf_model, singles, tiny_ckpt):
    # The penalty counts the prompt's tokens too, image pads included, as transformers does. The
    # random model never repeats a token by itself; a penalty below 1 (a reward) makes it repeat
    # the prompt, up to its <|im_end|>, an end-of-sequence id of generation_config.json.
    generation_config = json.loads((tiny_ckpt / "generation_config.json").read_text())
    expected = hf_generate(hf_model, prompts["image"], repetition_penalty=0.3, min_new_tokens=0).sequences
    engine = make_engine(model, processor, generation_config=generation_config)
    (output,) = run(engine, [prompts["image"]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=0.3))
    assert output.token_ids == expected[0, len(prompts["image"]):].tolist()
    assert output.finish_reason == "stop" and output.token_ids[-1] in generation_config["eos_token_id"]
    assert output.token_ids != singles["image"].token_ids[:len(output.token_ids)] and len(output.token_ids) > 4
    assert output.text == processor.tokenizer.decode(output.token_ids[:-1])


def test_top_k_one_equals_greedy(model, processor, prompts, singles):
    """top_k 1 at any temperature is greedy (the card's checkpoints ship top_k 1): the argmax,
    without drawing, alone and beside a sampled row."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_k=1, ignore_eos=True)
    assert params.greedy and not SamplingParams(temperature=1.0, top_k=2).greedy
    outputs = run(make_engine(model, processor), [prompts["text"], prompts["image"]], params)
    assert [o.token_ids for o in outputs] == [singles["text"].token_ids, singles["image"].token_ids]
    sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=3, ignore_eos=True)
    beside, _ = run(make_engine(model, processor), [prompts["text"], prompts["video"]], [params, sampled])
    assert beside.token_ids == singles["text"].token_ids


def test_stop_string_cuts_the_text_exactly(model, processor, prompts, singles):
    full = singles["image"].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    (output,) = run(make_engine(model, processor), [prompts["image"]],
                    SamplingParams.from_overrides(GREEDY, stop=["never-in-text", stop]))
    assert output.finish_reason == "stop"
    assert output.text == full[:cut]
    assert output.token_ids == singles["image"].token_ids[:len(output.token_ids)]
    assert len(output.token_ids) < NEW_TOKENS


def test_stop_token_ids_and_max_tokens(model, processor, prompts, singles):
    expected = singles["text"].token_ids
    stop_id = expected[5]
    first = expected.index(stop_id)
    outputs = run(make_engine(model, processor), [prompts["text"]] * 2,
                  [SamplingParams.from_overrides(GREEDY, stop_token_ids=[stop_id]),
                   SamplingParams.from_overrides(GREEDY, max_tokens=3)])
    assert outputs[0].finish_reason == "stop" and outputs[0].token_ids == expected[:first + 1]
    assert outputs[1].finish_reason == "length" and outputs[1].token_ids == expected[:3]


def test_streamed_text_has_multibyte_characters(singles, processor):
    # `run` checked the deltas; the random model's texts do hold multi-byte characters.
    texts = "".join(output.text for output in singles.values())
    assert any(ord(c) > 0x7F for c in texts)
    for output in singles.values():
        assert output.text == processor.tokenizer.decode(output.token_ids)


@pytest.mark.parametrize("stop, expected", [
    ([], "Grüße 🦜🐔 ꧁ done"),
    (["꧁ d"], "Grüße 🦜🐔 "),
    (["🐔 ꧁", "ße 🦜"], "Grü"),
])
def test_deltas_split_multibyte_characters_and_hold_back_stop_strings(processor, stop, expected):
    tokenizer = processor.tokenizer
    ids = tokenizer.encode("Grüße 🦜🐔 ꧁ done")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some characters span tokens
    params = SamplingParams(stop=stop, ignore_eos=True).resolve({})
    seq = Sequence("s", PreparedPrompt([1, 2], torch.zeros(3, 2, dtype=torch.long), 0), params,
                   vision_token_ids=[], stop_token_ids=set(),
                   detokenizer=IncrementalDetokenizer(tokenizer), generator=None)
    streamed = ""
    for token_id in ids:
        seq.append_token(token_id, None, max_model_len=100)
        output = seq.take_output()
        streamed += output.text_delta
        assert "\ufffd" not in output.text_delta and expected.startswith(streamed)
        if output.finished:
            break
    assert streamed == output.text == expected
    assert output.finish_reason == ("stop" if stop else None)


def test_bad_requests_fail_alone(model, processor, prompts, singles, monkeypatch):
    engine = make_engine(model, processor, max_model_len=200)
    encoded = []
    encode = engine.runner.encode_vision
    monkeypatch.setattr(engine.runner, "encode_vision", lambda seqs: encoded.append(len(seqs)) or encode(seqs))
    start = engine.num_free_blocks
    too_long = PreparedPrompt(list(prompts["text"].input_ids) * 20, prompts["text"].positions.repeat(1, 20), 0)
    with pytest.raises(InputError, match=f"{len(too_long)} tokens.*max_model_len is 200"):
        engine.add_request(too_long, GREEDY)
    with pytest.raises(InputError, match="temperature=-1"):
        engine.add_request(prompts["text"], SamplingParams(temperature=-1.0))
    image = prompts["image"]
    item = image.vision_items[0]
    broken_item = VisionItem(item.kind, item.pixel_values[:, :100], item.grid_thw, item.original_size, item.resized_size)
    broken = PreparedPrompt(image.input_ids, image.positions, image.rope_delta, [broken_item])
    outputs = run(engine, [prompts["text"], broken, prompts["image"]])
    assert outputs[1].finish_reason == "error" and "vision encoding failed" in outputs[1].error
    assert encoded == [2, 1, 1]  # admitted together; when their batch fails, each alone
    assert outputs[0].token_ids == singles["text"].token_ids
    assert outputs[2].token_ids == singles["image"].token_ids
    assert engine.num_free_blocks == start


def test_running_ahead_gives_the_same_outputs(model, processor, prompts, singles):
    """`run_ahead`: each step is launched before the last one's tokens are read back (they reach
    it on the device). The outputs equal stepping in turn, through chunked prefill, preemption in
    a small pool, requests added and aborted mid-way, a stop token, a stop string, max_tokens,
    logprobs, seeded sampling and a penalty (which takes the pending token on the device)."""
    names = list(CONVERSATIONS)
    params = {
        "text": GREEDY,
        "image": SamplingParams.from_overrides(GREEDY, stop_token_ids=[singles["image"].token_ids[6]]),
        "multi_image": SamplingParams.from_overrides(GREEDY, max_tokens=5, logprobs=2),
        "video": SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
        "multi_turn": SamplingParams.from_overrides(GREEDY, stop=[singles["multi_turn"].text[10:13]]),
        "image_and_video": SamplingParams.from_overrides(GREEDY, repetition_penalty=1.3),
    }
    doomed = "text"  # aborted at step 9

    def generate(run_ahead: bool):
        longest = max(len(prompts[n]) for n in names) + NEW_TOKENS
        engine = make_engine(model, processor, block_size=4, num_kv_blocks=-(-longest // 4) + 10,
                             max_num_batched_tokens=64, run_ahead=run_ahead)
        start = engine.num_free_blocks
        launch, ran_ahead = engine.runner.launch, []

        def counted(plan, previous, vision_rows):
            ran_ahead.append({span.request_id for span in plan.spans if span.pending})
            return launch(plan, previous, vision_rows)
        engine.runner.launch = counted
        ids, waiting, steps, aborted = {}, list(names), [0], []

        def add(name):
            ids[name] = engine.add_request(prompts[name], params[name])

        def every_step():
            steps[0] += 1
            if waiting and steps[0] % 2 == 0:
                add(waiting.pop(0))
            if steps[0] == 9:
                aborted.append(engine.abort(ids[doomed]))

        for name in waiting[:3]:
            add(name)
        del waiting[:3]
        final = drain(engine, on_step=every_step)
        assert engine.num_free_blocks == start
        return {name: final.get(request_id) or aborted[0] for name, request_id in ids.items()}, engine, ran_ahead

    (ahead, engine, ran_ahead), (in_turn, _, never) = generate(True), generate(False)
    assert sum(map(bool, ran_ahead)) > len(ran_ahead) // 2 and not any(never)
    assert sum("req-5" in pending for pending in ran_ahead) > 20  # the penalty row (added last) too
    assert engine.num_preemptions > 0
    # aborted at the same step, the one running ahead has read back one token fewer
    assert ahead[doomed].token_ids == in_turn[doomed].token_ids[:-1] and ahead[doomed].finish_reason == "abort"
    for name in set(names) - {doomed}:
        assert (ahead[name].token_ids, ahead[name].text, ahead[name].finish_reason, ahead[name].logprobs) == (
            in_turn[name].token_ids, in_turn[name].text, in_turn[name].finish_reason, in_turn[name].logprobs), name
    assert ahead["image"].finish_reason == ahead["multi_turn"].finish_reason == "stop"
    assert ahead["multi_image"].finish_reason == "length" and len(ahead["multi_image"].token_ids) == 5
    assert ahead["image"].token_ids == singles["image"].token_ids[:7]


def test_penalties_count_the_token_still_on_the_device(model, processor, prompts):
    """Running ahead, a sequence's last sampled token is not read back when the next step samples:
    the penalties' output tokens take it from the device, after those read back."""
    engine = make_engine(model, processor, run_ahead=True)
    request = engine.add_request(prompts["text"], SamplingParams.from_overrides(GREEDY, presence_penalty=0.5))
    engine.step()  # the prompt; its token stays on the device
    engine.step()  # the next step runs ahead; the first token is read back, the second is pending
    seq = engine.scheduler.requests[request]
    assert seq.num_pending == 1 and len(seq.output_token_ids) == 1
    pending = engine._in_flight.result()[0].token_id
    plan = StepPlan([make_span(seq, seq.num_tokens - 1, 1)], [])
    tokens = output_tokens(plan, engine._in_flight, vocab_size=engine.runner.vocab_size, to_device=engine.runner.to_device)
    assert tokens.tolist() == [seq.output_token_ids + [pending]]


def test_prompt_logprobs_are_the_models_and_survive_chunks_and_preemption(model, processor, prompts, hf_model):
    """`prompt_logprobs`: each prompt token's log-probability given those before it, as
    transformers' logits give it, the same prefilled whole, in chunks, or recomputed after a
    preemption; such a prompt is never taken from the prefix cache."""
    prompt = prompts["image"]
    params = SamplingParams.from_overrides(GREEDY, max_tokens=4, prompt_logprobs=3)
    token_types = (torch.tensor([prompt.input_ids]) == hf_model.config.image_token_id).long()
    item = prompt.vision_items[0]
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([prompt.input_ids]), mm_token_type_ids=token_types,
                          pixel_values=item.pixel_values, image_grid_thw=torch.tensor([item.grid_thw])).logits[0]
    expected = torch.log_softmax(logits.float(), -1)
    whole_engine = make_engine(model, processor)
    [whole] = run(whole_engine, [prompt], params)
    assert whole.prompt_logprobs[0] is None and len(whole.prompt_logprobs) == len(prompt)
    for position, (token, scores) in enumerate(zip(prompt.input_ids[1:], whole.prompt_logprobs[1:])):
        assert abs(scores[token] - expected[position, token].item()) < 1e-4
        top = expected[position].topk(3)
        assert all(abs(scores[t] - v) < 1e-4 for t, v in zip(top.indices.tolist(), top.values.tolist()))
    [again] = run(whole_engine, [prompt], params)
    assert again.num_cached_tokens == 0 and again.prompt_logprobs == whole.prompt_logprobs
    chunked = run(make_engine(model, processor, block_size=4, max_num_batched_tokens=7), [prompt], params)[0]
    small = make_engine(model, processor, block_size=4, num_kv_blocks=-(-(len(prompt) + 4) // 4) + 2,
                        max_num_batched_tokens=7)
    preempted = run(small, [prompt, prompt], params)
    assert small.num_preemptions > 0
    for output in [chunked, *preempted]:
        assert len(output.prompt_logprobs) == len(prompt) and output.prompt_logprobs[0] is None
        for ours, reference_scores in zip(output.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
            assert ours.keys() == reference_scores.keys()
            assert all(abs(ours[t] - reference_scores[t]) < 1e-4 for t in ours)
