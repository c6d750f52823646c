"""The Python API never deadlocks or leaks a request: a stream collected from a reference cycle in
the middle of a step, a KeyboardInterrupt at any point of a call, a stream dropped unread."""
from __future__ import annotations

import gc
import queue
import threading

import pytest
import torch
from PIL import Image

from qwen2vl import Qwen2VL, SamplingParams
from qwen2vl.engine.driver import EngineDriver, EngineFailure, NewRequest

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
HUNG = 120  # seconds: only a hung call takes this long; the test then fails instead of hanging the suite


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "a.png"
    pixels = (torch.rand(60, 90, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return {"text": [{"role": "user", "content": "Who are you?"}],
            "image": [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                   {"type": "text", "text": "Describe this image."}]}]}


# Without the prefix and vision caches every call runs the same steps (the image is encoded each time).
NO_CACHES = {"prefix_caching": False, "vision_cache_bytes": 0}


@pytest.fixture(scope="module", params=[{**NO_CACHES, "run_ahead": False}, {**NO_CACHES, "run_ahead": True},
                                        {"run_ahead": False}], ids=["in_turn", "run_ahead", "cached"])
def llm(request, tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=64, **request.param)


@pytest.fixture(scope="module")
def answers(llm, conversations):
    """Each conversation's greedy answer, from an engine nothing happened to."""
    return {name: llm.chat(messages, max_tokens=12, ignore_eos=True, **GREEDY).token_ids
            for name, messages in conversations.items()}


def in_a_thread(call):
    """`call()`'s result, run on a thread of its own: a deadlocked call fails the test."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    thread.join(timeout=HUNG)
    assert not thread.is_alive(), "the call deadlocked"
    return result["value"]


def assert_idle(llm):
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_a_stream_collected_from_a_reference_cycle_inside_a_step(tiny_ckpt, conversations):
    """The garbage collector runs an abandoned stream's cleanup wherever it runs: here inside a
    step, on the stepping thread. The cleanup only marks its request aborted."""
    llm = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=64)  # its own: a deadlock would keep it
    expected = llm.chat(conversations["text"], max_tokens=8, **GREEDY).token_ids
    step, collected = llm.engine.step, []
    llm.engine.step = lambda: collected.append(gc.collect()) or step()
    gc.disable()  # the cycle is collected in the step, not at some allocation before
    try:
        deltas = iter(llm.chat(conversations["image"], max_tokens=64, ignore_eos=True, stream=True, **GREEDY))
        next(deltas)
        cycle = [deltas]
        cycle.append(cycle)
        del deltas, cycle
        answer = in_a_thread(lambda: llm.chat(conversations["text"], max_tokens=8, **GREEDY).token_ids)
    finally:
        gc.enable()
    assert collected[0] > 0
    assert answer == expected
    assert_idle(llm)


class Interrupt:
    """Stands in for `real`, raising KeyboardInterrupt on its `at`-th call."""

    def __init__(self, real, at: int):
        self.real, self.at, self.calls = real, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def interrupt_at(monkeypatch, llm, point: str) -> Interrupt:
    owner, name, at = POINTS[point]
    if point == "vision" and llm.engine.vision_cache.max_bytes:
        pytest.skip("the image is in the vision cache: it is not encoded again")
    owner = getattr(llm.engine, owner)
    interrupt = Interrupt(getattr(owner, name), at)
    monkeypatch.setattr(owner, name, interrupt)
    return interrupt


# Where Ctrl-C lands: the first step (the prompt's, run while the call hands it to the engine),
# a later step's forward, the read-back of a step's tokens, the encoding of the image.
POINTS = {"prompt_step": ("runner", "launch", 1), "decode_step": ("runner", "launch", 3),
          "read_back": ("scheduler", "update", 3), "vision": ("runner", "encode_vision", 1)}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "chat"])
@pytest.mark.parametrize("point", POINTS)
def test_keyboard_interrupt_aborts_the_request_and_leaves_the_engine_usable(llm, conversations, answers, monkeypatch,
                                                                             point, stream):
    interrupt = interrupt_at(monkeypatch, llm, point)
    with pytest.raises(KeyboardInterrupt):
        if stream:
            for _ in llm.chat(conversations["image"], max_tokens=12, ignore_eos=True, stream=True, **GREEDY):
                pass
        else:
            llm.chat(conversations["image"], max_tokens=12, ignore_eos=True, **GREEDY)
    assert interrupt.calls == interrupt.at
    assert_idle(llm)
    monkeypatch.undo()
    for name in ("text", "image"):
        assert llm.chat(conversations[name], max_tokens=12, ignore_eos=True, **GREEDY).token_ids == answers[name]
    assert_idle(llm)


def test_keyboard_interrupt_in_the_consumers_loop_aborts_the_stream(llm, conversations, answers):
    with pytest.raises(KeyboardInterrupt):
        for _ in llm.chat(conversations["image"], max_tokens=64, ignore_eos=True, stream=True, **GREEDY):
            raise KeyboardInterrupt
    assert_idle(llm)
    assert llm.chat(conversations["text"], max_tokens=12, ignore_eos=True, **GREEDY).token_ids == answers["text"]


@pytest.mark.parametrize("iterated", [False, True], ids=["never_iterated", "iterator_never_started"])
def test_a_stream_dropped_unread_is_aborted(llm, conversations, answers, iterated):
    stream = llm.chat(conversations["image"], max_tokens=64, ignore_eos=True, stream=True, **GREEDY)
    deltas = iter(stream) if iterated else None
    assert llm.engine.has_unfinished()
    del stream, deltas
    assert_idle(llm)
    assert llm.chat(conversations["text"], max_tokens=12, ignore_eos=True, **GREEDY).token_ids == answers["text"]
    assert_idle(llm)


@pytest.mark.parametrize("point", POINTS)
def test_an_interrupted_step_restarts_its_requests_which_answer_as_before(llm, conversations, answers, monkeypatch,
                                                                          point):
    """The engine itself: after a step raised anywhere, no token is left pending with no step to
    bring it, and every request goes on to the answer it would have given."""
    engine = llm.engine
    interrupt_at(monkeypatch, llm, point)
    params = SamplingParams.from_overrides(None, max_tokens=12, ignore_eos=True, **GREEDY)
    names = {engine.add_request(llm.processor.prepare(messages, context_len=engine.max_model_len), params): name
             for name, messages in conversations.items()}
    finals = {}

    def run():
        while engine.has_unfinished():
            finals.update((output.request_id, output.token_ids) for output in engine.step() if output.finished)

    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    run()
    assert {names[request_id]: token_ids for request_id, token_ids in finals.items()} == answers
    assert_idle(llm)


def test_keyboard_interrupt_while_a_batch_is_handed_to_the_engine(llm, conversations, answers, monkeypatch):
    """Ctrl-C after the first conversation of a batch was added: it is aborted too."""
    monkeypatch.setattr(llm.engine, "add_request", Interrupt(llm.engine.add_request, at=2))
    with pytest.raises(KeyboardInterrupt):
        llm.chat([conversations["text"], conversations["image"]], max_tokens=12, ignore_eos=True, **GREEDY)
    assert_idle(llm)
    monkeypatch.undo()
    batch = llm.chat([conversations["text"], conversations["image"]], max_tokens=12, ignore_eos=True, **GREEDY)
    assert [completion.token_ids for completion in batch] == [answers["text"], answers["image"]]


class LosingEngine:
    """An engine whose step finishes every request, then is interrupted before returning their outputs."""

    def __init__(self):
        self.requests = set()

    def compile_constraint(self, params):
        return None  # no structured output

    def add_request(self, prompt, params, request_id, cache_salt=None):
        self.requests.add(request_id)
        return request_id

    def has_unfinished(self):
        return bool(self.requests)

    def has_request(self, request_id):
        return request_id in self.requests

    def step(self):
        self.requests.clear()
        raise KeyboardInterrupt

    def abort(self, request_id):
        self.requests.discard(request_id)


def test_a_consumer_whose_output_an_interrupted_step_lost_is_answered():
    """Another consumer (a thread, the server) must not wait for ever for an output the
    interrupted step took with it."""
    driver = EngineDriver(LosingEngine())
    other = queue.SimpleQueue()
    driver.submit([NewRequest(None, None, "other")], other.put)
    mine = driver.submit([NewRequest(None, None, "mine")], lambda item: None)
    with pytest.raises(KeyboardInterrupt):
        driver.pump(mine.done)
    assert isinstance(other.get_nowait(), EngineFailure)


def test_an_interrupted_add_answers_its_consumer_and_loses_no_other_command():
    engine = LosingEngine()
    driver = EngineDriver(engine)
    engine.add_request = Interrupt(engine.add_request, at=2)
    accepted = driver.submit([NewRequest(None, None, "a"), NewRequest(None, None, "b")], lambda item: None)
    later = driver.submit([NewRequest(None, None, "c")], lambda item: None)
    with pytest.raises(KeyboardInterrupt):
        driver.pump(accepted.done)
    first, second = accepted.result(timeout=0)
    assert first == "a" and isinstance(second, EngineFailure)
    assert not later.done()
    engine.step = lambda: engine.requests.clear() or []
    driver.pump(later.done)
    assert later.result(timeout=0) == ["c"]
