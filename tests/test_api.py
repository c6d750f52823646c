"""The Python API as the model card's users call it, against the card's own code path."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from processor_reference import reference_inputs, reference_processor
from qwen2vl import Completion, InputError, MediaError, Qwen2VL, SamplingParams

NEW_TOKENS = 24


def picture(path, width, height, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=256)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    image = picture(folder / "a.png", 90, 60, 1)
    return {
        "image": [{"role": "user", "content": [{"type": "image", "image": f"file://{image}"},
                                               {"type": "text", "text": "Describe this image."}]}],
        "two_images": [{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "image", "image": picture(folder / "b.png", 50, 120, 2)},
                                                    {"type": "text", "text": "What differs?"}]}],
        "text": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}],
    }


@pytest.fixture(scope="module")
def card_outputs(tiny_ckpt, conversations):
    """The card's snippet: AutoProcessor + process_vision_info + generate(max_new_tokens), whose
    defaults come from generation_config.json (top_k=1, repetition_penalty=1.05)."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    processor = reference_processor(tiny_ckpt)
    results = {}
    for name, messages in conversations.items():
        _, inputs, _ = reference_inputs(processor, messages)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        results[name] = (ids, processor.batch_decode([ids], skip_special_tokens=True)[0])
    return results


@pytest.mark.parametrize("name", ["image", "two_images", "text"])
def test_chat_with_checkpoint_defaults_equals_the_cards_code(llm, conversations, card_outputs, name):
    completion = llm.chat(conversations[name], max_new_tokens=NEW_TOKENS)
    ids, text = card_outputs[name]
    assert completion.token_ids == ids
    assert completion.text == text
    assert completion.usage.completion_tokens == len(ids)
    assert completion.finish_reason == ("length" if len(ids) == NEW_TOKENS else "stop")


def test_answers_differ_between_conversations(card_outputs):
    answers = [ids for ids, _ in card_outputs.values()]
    assert len({tuple(a) for a in answers}) == len(answers)
    assert all(len(set(a)) > 3 for a in answers)


def test_batch_equals_single_calls_and_keeps_order(llm, conversations):
    names = list(conversations)
    singles = [llm.chat(conversations[n], temperature=0, max_tokens=12) for n in names]
    batch = llm.chat([conversations[n] for n in names], SamplingParams(temperature=0, max_tokens=12))
    assert isinstance(batch, list) and all(isinstance(c, Completion) for c in batch)
    assert [c.token_ids for c in batch] == [c.token_ids for c in singles]
    assert [c.usage.prompt_tokens for c in batch] == [c.usage.prompt_tokens for c in singles]


def test_stream_yields_deltas_then_the_completion(llm, conversations):
    whole = llm.chat(conversations["image"], temperature=0, max_tokens=16)
    stream = llm.chat(conversations["image"], temperature=0, max_tokens=16, stream=True)
    assert "".join(stream) == whole.text
    assert stream.completion.token_ids == whole.token_ids
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_abandoned_stream_frees_its_blocks(llm, conversations):
    stream = iter(llm.chat(conversations["text"], temperature=0, max_tokens=64, ignore_eos=True, stream=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_running_ahead_changes_no_answer(tiny_ckpt, llm, conversations):
    """`run_ahead` (the GPU default) through the API: batches with the checkpoint's defaults and
    greedy, a stream and an abandoned stream answer as stepping in turn does."""
    ahead = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=256, run_ahead=True)
    launch, ran_ahead = ahead.engine.runner.launch, []
    ahead.engine.runner.launch = lambda plan, previous, rows: ran_ahead.append(previous is not None) or launch(plan, previous, rows)
    names = list(conversations)
    # the checkpoint's defaults (repetition penalty 1.05, top_k 1) and plain greedy both run ahead
    for kwargs in ({"max_new_tokens": NEW_TOKENS}, {"temperature": 0, "max_tokens": 12, "repetition_penalty": 1.0}):
        ran_ahead.clear()
        batch = ahead.chat([conversations[n] for n in names], **kwargs)
        assert [c.token_ids for c in batch] == [llm.chat(conversations[n], **kwargs).token_ids for n in names]
        assert sum(ran_ahead) >= 8
    greedy = {"temperature": 0, "repetition_penalty": 1.0}
    stream = ahead.chat(conversations["image"], max_tokens=16, stream=True, **greedy)
    assert "".join(stream) == llm.chat(conversations["image"], max_tokens=16, **greedy).text
    abandoned = iter(ahead.chat(conversations["text"], max_tokens=64, ignore_eos=True, stream=True, **greedy))
    next(abandoned)
    abandoned.close()
    assert not ahead.engine.has_unfinished()
    assert ahead.engine.num_free_blocks == ahead.engine.num_total_blocks


def test_transformers_names_and_explicit_params(llm, conversations):
    greedy = llm.chat(conversations["text"], SamplingParams(temperature=0, max_tokens=8))
    assert llm.chat(conversations["text"], do_sample=False, max_new_tokens=8).token_ids == greedy.token_ids
    sampled = [llm.chat(conversations["text"], temperature=1.0, top_k=0, top_p=1.0, seed=s, max_tokens=8)
               for s in (1, 1, 2)]
    assert sampled[0].token_ids == sampled[1].token_ids != sampled[2].token_ids


def test_logprobs_are_per_token_dicts_holding_the_sampled_token(llm, conversations):
    completion = llm.chat(conversations["image"], temperature=0, max_tokens=6, logprobs=3)
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for token, step in zip(completion.token_ids, completion.logprobs):
        assert token in step and len(step) == 3
        assert step[token] == max(step.values()) <= 0


def test_grounding_boxes_in_pixels_of_the_input_image(conversations):
    completion = Completion(
        text="the cat", token_ids=[], finish_reason="stop", usage=None,
        raw_text="<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,500),(600,1000)<|box_end|>",
        image_sizes=[(90, 60), (50, 120)])
    [box] = completion.boxes()  # the last image's: 50x120
    assert (box.label, box.x1, box.y1, box.x2, box.y2) == ("the cat", 5.0, 60.0, 30.0, 120.0)
    assert completion.boxes(image_index=1) == completion.boxes(image_index=-1) == [box]
    [first] = completion.boxes(image_index=0)
    assert (first.label, first.x1, first.y1, first.x2, first.y2) == ("the cat", 9.0, 30.0, 54.0, 60.0)
    with pytest.raises(InputError, match="image_index 2"):
        completion.boxes(image_index=2)


def test_chat_records_the_original_image_sizes(llm, conversations):
    completion = llm.chat(conversations["two_images"], temperature=0, max_tokens=1)
    assert completion.image_sizes == [(90, 60), (50, 120)]
    assert completion.resized_image_sizes == [(84, 56), (56, 112)]  # 28-multiples: round(90/28) = 3, ...
    assert completion.model_type == "qwen2_vl"


@pytest.mark.parametrize("messages, match", [
    ([], "empty|no messages"),
    ([{"role": "robot", "content": "hi"}], "robot"),
    ([{"role": "user", "content": [{"type": "image", "image": __file__}]}], r"messages\[0\]\.content\[0\]"),
])
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(llm, conversations, messages, match):
    with pytest.raises(InputError, match=match):
        llm.chat(messages)
    assert llm.chat(conversations["text"], temperature=0, max_tokens=4).usage.completion_tokens == 4


def test_bad_conversation_in_a_batch_is_named(llm, conversations, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    broken = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "notes.png")}]}]
    with pytest.raises(MediaError, match=r"conversations\[1\]: messages\[0\]\.content\[0\]"):
        llm.chat([conversations["text"], broken])
    assert not llm.engine.has_unfinished()


def test_bad_sampling_values_name_the_field(llm, conversations):
    with pytest.raises(InputError, match="temperature"):
        llm.chat(conversations["text"], temperature=-1)
    with pytest.raises(InputError, match="stream=True"):
        llm.chat([conversations["text"]], stream=True)


GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


def test_a_chat_while_a_stream_is_open_answers_both(llm, conversations):
    """One driver steps the engine and routes outputs by request: a blocking chat while a
    stream is half read gets its own answer, and the stream goes on with its own."""
    alone = {name: llm.chat(conversations[name], max_tokens=16, ignore_eos=True, **GREEDY) for name in ("image", "text")}
    stream = llm.chat(conversations["image"], max_tokens=16, ignore_eos=True, stream=True, **GREEDY)
    deltas = iter(stream)
    first = next(deltas)
    assert llm.chat(conversations["text"], max_tokens=16, ignore_eos=True, **GREEDY).token_ids == alone["text"].token_ids
    assert first + "".join(deltas) == alone["image"].text
    assert stream.completion.token_ids == alone["image"].token_ids
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_two_threads_chat_at_once(llm, conversations):
    import threading

    names = ["image", "two_images", "text"]
    alone = {name: llm.chat(conversations[name], max_tokens=12, **GREEDY).token_ids for name in names}
    answers, errors = {}, []

    def ask(name):
        try:
            for _ in range(2):
                answers.setdefault(name, []).append(llm.chat(conversations[name], max_tokens=12, **GREEDY).token_ids)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(not thread.is_alive() for thread in threads)
    assert answers == {name: [alone[name]] * 2 for name in names}
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_a_stream_abandoned_half_way_then_a_chat(llm, conversations):
    expected = llm.chat(conversations["text"], max_tokens=8, **GREEDY).token_ids
    abandoned = iter(llm.chat(conversations["image"], max_tokens=64, ignore_eos=True, stream=True, **GREEDY))
    next(abandoned)
    next(abandoned)
    assert llm.chat(conversations["text"], max_tokens=8, **GREEDY).token_ids == expected
    abandoned.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_a_refused_conversation_in_a_batch_runs_none_of_them(llm, conversations):
    long_text = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(InputError, match=r"conversations\[1\]: .*max_model_len"):
        llm.chat([conversations["text"], long_text], max_tokens=4)
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_engine_arguments_are_checked_once_where_they_are_given(tiny_ckpt):
    from qwen2vl.engine_args import EngineArgs

    with pytest.raises(InputError, match="max_num_seqs=0 is invalid") as caught:
        Qwen2VL.from_pretrained(tiny_ckpt, max_num_seqs=0)
    assert caught.value.field == "max_num_seqs"
    with pytest.raises(InputError, match="unknown engine argument.*max_batch.*known: .*max_num_seqs"):
        Qwen2VL.from_pretrained(tiny_ckpt, max_batch=4)
    llm = Qwen2VL.from_pretrained(args=EngineArgs(model=str(tiny_ckpt), num_kv_blocks=32, max_num_seqs=3))
    assert llm.engine.args.max_num_seqs == llm.engine.scheduler.max_num_seqs == 3
    assert llm.engine.num_total_blocks == 32
