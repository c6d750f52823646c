"""The OpenAI-compatible server on a tiny random checkpoint, on 127.0.0.1, through the official
`openai` client and raw HTTP: replies equal `Qwen2VL.chat` token for token, many clients at once,
every bad input gets its documented status, disconnects free the cache."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import http.server
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.processor.chat import media_parts  # noqa: E402
from qwen2vl.server import MediaAccess, ServerLimits, create_app  # noqa: E402
from qwen2vl.server.connections import uvicorn_options  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny-qwen2vl"
MAX_MODEL_LEN = 512
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]


class ManualTimer:
    """Request time limits that run out only when the test calls `expire()` (the server's `timer`).
    A limit is registered when the server asks for it, not when its task first runs."""

    def __init__(self):
        self._waiting: dict[asyncio.Future, asyncio.AbstractEventLoop] = {}

    def __call__(self, seconds: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        expired = loop.create_future()
        self._waiting[expired] = loop
        expired.add_done_callback(self._waiting.pop)
        return expired

    def expire(self) -> None:
        """The time limit of every request now in the server runs out."""
        for expired, loop in list(self._waiting.items()):
            loop.call_soon_threadsafe(lambda future=expired: future.done() or future.set_result(None))


class HeldSteps:
    """Engine steps that wait, from the first one on, until `release()` or an abort is asked for:
    a request in the engine cannot finish before the test has done its part."""

    def __init__(self, llm):
        self.llm = llm
        self.entered = threading.Event()  # a step is waiting
        self.released = threading.Event()
        self.count = 0  # steps taken

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> HeldSteps:
        engine, driver = self.llm.engine, self.llm.driver
        step, abort = engine.step, driver.abort

        def held_step():
            self.entered.set()
            assert self.released.wait(60), "the test never released the engine"
            self.count += 1
            return step()

        def abort_and_release(request_id):
            done = abort(request_id)
            self.release()
            return done

        engine.step, driver.abort = held_step, abort_and_release
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
        del self.llm.engine.step, self.llm.driver.abort


class RunningServer:
    """A uvicorn server in a thread on a free 127.0.0.1 port, with the connection settings of `serve`."""

    def __init__(self, llm, model_name: str = MODEL, **options):
        self.llm = llm
        self.app = create_app(llm, model_name=model_name, **options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                    **uvicorn_options(self.state.limits)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.server

    @property
    def timer(self):
        return self.state.timer

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is in flight and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while self.state.admission.in_flight or self.state.engine.num_requests or self.state.engine.kv_cache_usage:
            assert time.monotonic() < deadline, (self.state.admission.in_flight, self.state.engine.num_requests,
                                                 self.state.engine.kv_cache_usage)
            time.sleep(0.02)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    Image.new("RGB", (56, 56), (10, 200, 30)).save(folder / "green.png")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(tiny_ckpt, media_dir):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, api_key=API_KEY, media=MediaAccess(allowed_dir=media_dir),
                            limits=ServerLimits(max_body_bytes=2 << 20, max_media_per_request=4))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_server(tiny_ckpt):
    """Remote media allowed, room for only two requests in flight, and request time limits (1.5 s
    as the server says) that run out when the test expires them (`open_server.timer`)."""
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, media=MediaAccess(allow_remote=True, fetch_timeout_s=2),
                            limits=ServerLimits(request_timeout_s=1.5, max_requests_in_flight=2), timer=ManualTimer())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _png_uri(width=64, height=48, color=(200, 10, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_messages(*urls: str, text: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": url}} for url in urls),
                                         {"type": "text", "text": text}]}]


def _our_messages(*images, text: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": text}]}]


# --- replies equal the Python API -----------------------------------------------------------

def test_chat_equals_python_api_token_for_token(client, reference):
    expected = reference.chat(HELLO, max_tokens=8, temperature=0, logprobs=3)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected.usage.prompt_tokens, expected.usage.completion_tokens)
    tokenizer = reference.processor.tokenizer
    assert len(choice.logprobs.content) == len(expected.token_ids)
    for entry, token_id, distribution in zip(choice.logprobs.content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(distribution[token_id], abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 3
        best = sorted(distribution.values(), reverse=True)[:3]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(best, abs=1e-5)
    joined = b"".join(bytes(entry.bytes) for entry in choice.logprobs.content)
    assert joined.decode("utf-8", "replace") == tokenizer.decode(expected.token_ids, skip_special_tokens=False)
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")


def test_stream_equals_python_api(client, reference):
    expected = reference.chat(HELLO, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected.text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens


def test_data_uri_image(client, reference):
    uri = _png_uri()
    expected = reference.chat(_our_messages(uri), max_tokens=8, temperature=0)
    reply = client.chat.completions.create(model=MODEL, messages=_image_messages(uri), max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens > 20  # the image's pad tokens are in


def test_image_from_the_allowed_dir_and_per_part_resize(client, reference, media_dir):
    path = str(media_dir / "green.png")
    part = {"type": "image", "image": path, "resized_height": 28, "resized_width": 56}
    expected = reference.chat([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
                              max_tokens=6, temperature=0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{path}"}, "resized_height": 28, "resized_width": 56},
        {"type": "text", "text": "?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens


def test_video_data_uri(client, reference):
    from test_server_units import _video_uri

    uri = _video_uri(frames=8)
    expected = reference.chat([{"role": "user", "content": [{"type": "video", "video": uri, "fps": 2.0},
                                                             {"type": "text", "text": "What happens?"}]}],
                              max_tokens=6, temperature=0)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}, "fps": 2.0},
                                             {"type": "text", "text": "What happens?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens


def test_n_choices_with_a_seed(client, reference):
    # the checkpoint's generation config samples with top_k=1 (as Qwen2-VL's does): open it up
    sampling = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, top_p=1.0, n=2, seed=7,
                    extra_body={"top_k": 0})
    reply = client.chat.completions.create(**sampling)
    texts = [choice.message.content for choice in sorted(reply.choices, key=lambda c: c.index)]
    expected = [reference.chat(HELLO, max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, seed=7 + i).text
                for i in range(2)]
    assert texts == expected
    assert texts[0] != texts[1]
    again = client.chat.completions.create(**sampling)
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts
    assert reply.usage.completion_tokens == 16


def test_text_completions(client, reference):
    from qwen2vl.processor.types import PreparedPrompt
    from qwen2vl.sampling_params import SamplingParams

    ids = reference.processor.tokenizer.encode("The quick brown fox")
    positions, rope_delta = reference.processor.mrope(ids, [])
    engine = reference.engine
    request_id = engine.add_request(PreparedPrompt(ids, positions, rope_delta),
                                    SamplingParams(max_tokens=6, temperature=0, logprobs=1))
    output = None
    while output is None:
        output = next((o for o in engine.step() if o.request_id == request_id and o.finished), None)
    reply = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=1)
    assert reply.choices[0].text == output.text
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(output.token_ids)
    assert reply.choices[0].logprobs.token_logprobs == pytest.approx(
        [lp[t] for t, lp in zip(output.token_ids, output.logprobs)], abs=1e-5)
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == output.text


def test_models_health_metrics(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(server.url + "/metrics").status_code == 401
    metrics = httpx.get(server.url + "/metrics", headers=HEADERS).text
    for name in ("qwen2vl_http_requests_total", "qwen2vl_generation_tokens_total", "qwen2vl_requests_waiting",
                 "qwen2vl_kv_cache_usage_ratio", "qwen2vl_time_to_first_token_seconds_bucket"):
        assert name in metrics
    assert 'qwen2vl_http_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics


# --- protocol details, as OpenAI's clients expect them ----------------------------------------

def test_retrieve_a_model(client):
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "qwen2vl")
    assert card.model_dump()["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == f"model 'gpt-4o' does not exist; this server serves '{MODEL}'"


def test_retrieve_a_model_whose_name_has_a_slash(tiny_ckpt):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, model_name="Qwen/Qwen2-VL-2B-Instruct-AWQ")
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=30)
        assert client.models.retrieve("Qwen/Qwen2-VL-2B-Instruct-AWQ").id == "Qwen/Qwen2-VL-2B-Instruct-AWQ"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("Qwen/other")
    finally:
        running.stop()


def test_completion_logprobs_zero_holds_the_sampled_token(client):
    reply = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0, logprobs=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == 5
    assert logprobs.top_logprobs == [{token: value} for token, value in zip(logprobs.tokens, logprobs.token_logprobs)]
    two = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0, logprobs=2)
    for token, value, top in zip(two.choices[0].logprobs.tokens, two.choices[0].logprobs.token_logprobs,
                                 two.choices[0].logprobs.top_logprobs):
        assert top[token] == value and len(top) in (2, 3)  # the 2 most likely, and the sampled one if it is not
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_echo_puts_the_prompt_before_the_completion(client, reference):
    plain = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The quick brown fox" + plain.choices[0].text
    assert echoed.usage == plain.usage
    streamed = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0,
                                         echo=True, stream=True)
    chunks = list(streamed)
    assert chunks[0].choices[0].text == "The quick brown fox"
    assert "".join(chunk.choices[0].text for chunk in chunks) == echoed.choices[0].text
    ids = reference.processor.tokenizer.encode("Two prompts")
    both = client.completions.create(model=MODEL, prompt=[ids, [ids[0]]], max_tokens=2, temperature=0, echo=True, n=2)
    texts = [choice.text for choice in sorted(both.choices, key=lambda c: c.index)]
    first = reference.processor.tokenizer.decode([ids[0]], skip_special_tokens=False)
    assert [text.startswith(prefix) for text, prefix in zip(texts, ["Two prompts"] * 2 + [first] * 2)] == [True] * 4


def test_echo_with_logprobs_scores_the_prompt_as_transformers(client, reference, tiny_ckpt):
    """OpenAI's legacy echo + logprobs: the prompt's tokens come first, the first with no logprob,
    each other with its log-probability given the tokens before it (transformers' own), streamed
    or not."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    ids = reference.processor.tokenizer.encode("The quick brown fox jumps over")
    length = len(ids)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == length + 3
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(length - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:length]), expected, rtol=0, atol=1e-4)
    for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert top[token] == value and len(top) in (2, 3)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    streamed = [value for c in chunks if c.choices[0].logprobs for value in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == length + 3
    torch.testing.assert_close(torch.tensor(streamed[1:]), torch.tensor(logprobs.token_logprobs[1:]), rtol=0, atol=1e-5)


def test_stream_options_need_stream(client):
    for create, target in ((client.chat.completions.create, {"messages": HELLO}),
                           (client.completions.create, {"prompt": "hi"})):
        with pytest.raises(openai.BadRequestError) as caught:
            create(model=MODEL, max_tokens=2, stream=False, stream_options={"include_usage": True}, **target)
        assert caught.value.body["param"] == "stream_options"


def test_seeds_span_int64_without_wrapping(client):
    sampling = dict(model=MODEL, messages=HELLO, max_tokens=6, temperature=1.0, extra_body={"top_k": 0})
    texts = {seed: client.chat.completions.create(seed=seed, **sampling).choices[0].message.content
             for seed in ((1 << 63) - 1, -(1 << 63))}
    assert texts[(1 << 63) - 1] == client.chat.completions.create(seed=(1 << 63) - 1, **sampling).choices[0].message.content
    for seed in (1 << 63, (1 << 64) - 1, 1 << 64):  # 2**63 + k would be the same generator as -2**63 + k
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(seed=seed, **sampling)
        assert caught.value.body["param"] == "seed" and f"seed={seed}" in caught.value.body["message"]


def test_logit_bias(client, reference):
    token = reference.processor.tokenizer.encode(" blue")[0]
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                           logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == reference.processor.tokenizer.decode([token] * 4)
    expected = reference.chat(HELLO, max_tokens=4, temperature=0, logit_bias={token: 100}, ignore_eos=True)
    assert reply.choices[0].message.content == expected.text
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, logit_bias={"151936": 1})
    assert caught.value.body["param"] == "logit_bias"
    assert "token id 151936 is outside the vocabulary [0, 151936)" in caught.value.body["message"]


def test_token_ids_are_checked_against_the_models_vocabulary(client):
    """Ids past the tokenizer's last token (151669) but below the model's `vocab_size` (151936) are
    rows of the embedding and the head: accepted, as vLLM does (the tokenizer decodes them to "")."""
    for extra in ({"logit_bias": {"151669": -100, "151935": 5}}, {"stop_token_ids": [151700]}):
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0, extra_body=extra)
        assert reply.usage.completion_tokens >= 1
    reply = client.completions.create(model=MODEL, prompt=[9707, 151935], max_tokens=2, temperature=0)
    assert reply.usage.prompt_tokens == 2
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[9707, 151936], max_tokens=2)
    assert "prompt 0 has token id 151936, outside the vocabulary [0, 151936)" in caught.value.body["message"]


def test_min_tokens_holds_back_stop_token_ids(client, reference):
    first = reference.chat(HELLO, max_tokens=1, temperature=0).token_ids[0]  # the server's greedy first token too
    sampling = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    stopped = client.chat.completions.create(**sampling, extra_body={"stop_token_ids": [first]})
    assert (stopped.usage.completion_tokens, stopped.choices[0].finish_reason) == (1, "stop")
    held = client.chat.completions.create(**sampling, extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert held.usage.completion_tokens >= 3
    expected = reference.chat(HELLO, max_tokens=8, temperature=0, stop_token_ids=[first], min_tokens=3)
    assert held.choices[0].message.content == expected.text and first not in expected.token_ids[:3]


def test_openapi_describes_every_body(server):
    schema = httpx.get(server.url + "/openapi.json").json()  # no key needed
    components = schema["components"]["schemas"]
    assert schema["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    routes = {("/v1/chat/completions", "post"): ("ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
              ("/v1/completions", "post"): ("CompletionRequest", "TextCompletion", "TextCompletion"),
              ("/v1/models", "get"): (None, "ModelList", None),
              ("/v1/models/{model}", "get"): (None, "ModelCard", None),
              ("/health", "get"): (None, "HealthStatus", None)}
    for (path, method), (request, response, chunk) in routes.items():
        operation = schema["paths"][path][method]
        if request:
            assert operation["requestBody"]["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{request}"}
        content = operation["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{response}"}
        if chunk:
            assert content["text/event-stream"]["schema"] == {"$ref": f"#/components/schemas/{chunk}"}
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    refs = set()

    def collect(node):
        if isinstance(node, dict):
            refs.update(value for key, value in node.items() if key == "$ref")
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(components)  # every reference resolves
    assert schema["paths"]["/v1/models/{model}"]["get"]["parameters"] == [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    assert not any("422" in operation["responses"] for path in schema["paths"].values() for operation in path.values())
    assert "logit_bias" in components["ChatCompletionRequest"]["properties"]
    assert "echo" in components["CompletionRequest"]["properties"]


def test_wrong_method_says_which_are_allowed(server):
    response = httpx.get(server.url + "/v1/chat/completions", headers=HEADERS)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["message"] == "Method Not Allowed"
    assert httpx.post(server.url + "/v1/models", headers=HEADERS).headers["allow"] == "GET"


def test_the_body_must_be_sent_as_json(server):
    body = _chat_body(HELLO)
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        response = httpx.post(server.url + "/v1/chat/completions", content=body,
                              headers={**HEADERS, "Content-Type": content_type})
        assert response.status_code == 415, content_type
        error = response.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert f"not {content_type!r}" in error["message"] and "Content-Type: application/json" in error["message"]
    for content_type in (None, "application/json; charset=utf-8", "application/vnd.api+json"):
        headers = {**HEADERS, **({"Content-Type": content_type} if content_type else {})}
        assert httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers).status_code == 200


def test_integral_floats_are_integers(server, reference, media_dir):
    path = str(media_dir / "green.png")
    expected = reference.chat([{"role": "user", "content": [
        {"type": "image", "image": path, "min_pixels": 3136, "max_pixels": 3136 * 4}, {"type": "text", "text": "?"}]}],
        max_tokens=3, temperature=0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{path}"}, "min_pixels": 3136.0, "max_pixels": 12544.0},
        {"type": "text", "text": "?"}]}]
    response = httpx.post(server.url + "/v1/chat/completions", headers=HEADERS, timeout=30, json={
        "model": MODEL, "messages": messages, "max_tokens": 3.0, "temperature": 0, "n": 1.0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected.text
    assert response.json()["usage"]["prompt_tokens"] == expected.usage.prompt_tokens


def test_empty_prompt_is_refused_as_the_schema_says(server, client):
    prompt = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert {"minLength": 1, "type": "string"} in prompt["anyOf"]
    for empty in ("", [], [""], [[]]):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt=empty, max_tokens=2)
        assert caught.value.body["param"].startswith("prompt"), empty
        assert "at least 1" in caught.value.body["message"]


# --- many clients at once -------------------------------------------------------------------

def test_32_concurrent_clients_equal_their_single_answers(server, reference):
    """32 clients at once get their single answers, and are served as one batch: with the engine
    held until all 32 are in it, they take about as many steps as one (one after another: 32x)."""
    # Without the checkpoint's repetition penalty: on the CPU its dense [rows, vocab] pass would
    # dominate the batched step.
    sampling = dict(max_tokens=12, temperature=0)
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(32)]
    expected = [reference.chat(messages, repetition_penalty=1.0, **sampling).text for messages in prompts]

    async def run(steps: HeldSteps) -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

        async def ask(messages, stream: bool) -> str:
            options = dict(model=MODEL, messages=messages, extra_body={"repetition_penalty": 1.0}, **sampling)
            if not stream:
                reply = await client.chat.completions.create(**options)
                return reply.choices[0].message.content
            chunks = await client.chat.completions.create(stream=True, **options)
            return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks])

        async def release_when_all_arrived():
            deadline = time.monotonic() + 60  # only a guard against a hang
            while server.state.engine.num_requests < len(prompts):
                assert time.monotonic() < deadline, server.state.engine.num_requests
                await asyncio.sleep(0.01)
            steps.release()

        answers, _ = await asyncio.wait_for(asyncio.gather(
            asyncio.gather(*(ask(messages, i % 2 == 1) for i, messages in enumerate(prompts))),
            release_when_all_arrived()), timeout=120)
        await client.close()
        return answers

    with HeldSteps(server.llm) as steps:
        answers = asyncio.run(run(steps))
    assert answers == expected
    assert steps.count <= 2 * sampling["max_tokens"], steps.count
    server.wait_idle()


def test_a_server_running_steps_ahead_answers_the_same(tiny_ckpt, reference):
    """`run_ahead` (the default on a GPU) behind the server: concurrent streamed and plain
    requests answer as the Python API does, a disconnect mid-stream frees its cache."""
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN, run_ahead=True)
    running = RunningServer(llm, api_key=API_KEY)
    try:
        sampling = dict(max_tokens=12, temperature=0)
        prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(8)]
        expected = [reference.chat(messages, **sampling).text for messages in prompts]

        async def run() -> list[str]:
            client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

            async def ask(messages, stream: bool) -> str:
                if not stream:
                    return (await client.chat.completions.create(model=MODEL, messages=messages, **sampling)
                            ).choices[0].message.content
                chunks = await client.chat.completions.create(model=MODEL, messages=messages, stream=True, **sampling)
                return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks])

            answers = await asyncio.gather(*(ask(messages, i % 2 == 1) for i, messages in enumerate(prompts)))
            await client.close()
            return answers

        assert asyncio.run(run()) == expected
        with httpx.Client(base_url=running.url, headers=HEADERS, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=_long_chat(stream=True)) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
        running.wait_idle()
        assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
    finally:
        running.stop()


# --- disconnects, timeouts, overload --------------------------------------------------------

def _long_chat(stream: bool, max_tokens: int = 400) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def _metric(server, sample: str) -> float:
    """The value of one sample (name with its labels) on /metrics, 0 when not there yet."""
    text = httpx.get(server.url + "/metrics", headers=HEADERS).text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")), 0.0)


CHAT_CLOSED = 'qwen2vl_http_requests_total{endpoint="/v1/chat/completions",status="499"}'
ABORTED = 'qwen2vl_request_finished_total{finish_reason="abort"}'


def test_disconnect_aborts_and_frees_the_cache(server):
    engine = server.llm.engine
    closed, aborted = _metric(server, CHAT_CLOSED), _metric(server, ABORTED)
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=_long_chat(stream=True)) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert next(line for line in lines if line.startswith("data: "))
            assert server.state.engine.num_requests == 1
        # leaving the block closed the connection mid-stream
    server.wait_idle()
    with HeldSteps(server.llm), pytest.raises(httpx.ReadTimeout):  # the answer cannot come before the client leaves
        httpx.post(server.url + "/v1/chat/completions", json=_long_chat(stream=False), headers=HEADERS, timeout=0.5)
    server.wait_idle()
    assert engine.num_free_blocks == engine.num_total_blocks
    # both disconnects (the stream after its 200 went out, and the plain request) are counted as such
    deadline = time.monotonic() + 10
    while _metric(server, CHAT_CLOSED) < closed + 2:
        assert time.monotonic() < deadline, (closed, _metric(server, CHAT_CLOSED))
        time.sleep(0.02)
    assert _metric(server, CHAT_CLOSED) == closed + 2
    assert _metric(server, ABORTED) == aborted + 2


def test_request_timeout(open_server):
    url = open_server.url + "/v1/chat/completions"
    with HeldSteps(open_server.llm) as steps, ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, url, json=_long_chat(False, 4000), timeout=60)
        assert steps.entered.wait(30)  # the request is in the engine, and cannot finish
        open_server.timer.expire()
        response = reply.result()
    assert response.status_code == 504
    assert "limit of 1.5 s" in response.json()["error"]["message"]
    open_server.wait_idle()
    with HeldSteps(open_server.llm) as steps, httpx.stream("POST", url, json=_long_chat(True, 4000), timeout=60) as r:
        assert steps.entered.wait(30)
        open_server.timer.expire()
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["type"] == "timeout_error"
    open_server.wait_idle()


def test_request_timeout_while_preparing(open_server, monkeypatch):
    """Out of time before the engine saw it (media still being fetched, say): a 504 all the same."""
    preparing, release = threading.Event(), threading.Event()
    prepare = open_server.state.processor.prepare

    def held_prepare(*args, **options):
        preparing.set()
        assert release.wait(60)
        return prepare(*args, **options)

    monkeypatch.setattr(open_server.state.processor, "prepare", held_prepare)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, open_server.url + "/v1/chat/completions", json=_long_chat(False, 4), timeout=60)
        assert preparing.wait(30)
        open_server.timer.expire()
        response = reply.result()
        release.set()
    assert response.status_code == 504
    assert response.json()["error"]["message"].startswith("preparing the request ran past the server's limit of 1.5 s")
    monkeypatch.undo()
    open_server.wait_idle()
    assert httpx.post(open_server.url + "/v1/chat/completions", json=_long_chat(False, 4), timeout=30).status_code == 200


def test_queue_full_gets_503_with_retry_after(open_server):
    url = open_server.url + "/v1/chat/completions"
    with HeldSteps(open_server.llm) as steps, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, url, json=_long_chat(False, 8), timeout=60) for _ in range(2)]
        deadline = time.monotonic() + 30  # only a guard against a hang: the pass is decided by the counts
        while open_server.state.admission.in_flight < 2:
            assert time.monotonic() < deadline, open_server.state.admission.in_flight
            time.sleep(0.01)
        response = httpx.post(url, json=_long_chat(False, 4), timeout=30)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["type"] == "server_overloaded"
        steps.release()
        assert [reply.result().status_code for reply in held] == [200, 200]
    open_server.wait_idle()
    assert httpx.post(url, json=_long_chat(False, 4), timeout=30).status_code == 200


# --- bounded work: prompt text by bytes, tokenizing off the loop, text beside media -----------

PROMPT_BYTE_LIMIT = 16 * (MAX_MODEL_LEN - 1)  # the default: 16 bytes per prompt token allowed


@pytest.mark.parametrize("path,body,param,size", [
    ("/v1/completions", {"prompt": "word " * 1700}, "prompt", 8500),
    ("/v1/completions", {"prompt": ["word " * 850, "word " * 850]}, "prompt", 8500),  # a request's prompts together
    # the text of every message (its keys and role included) but not the image
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "word " * 850}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_uri()}}, {"type": "text", "text": "word " * 850}]}]},
     "messages", 8500 + len("role" "system" "content" "role" "user" "content" "type" "text" "text")),
])
def test_prompt_text_over_its_bytes_is_refused_before_tokenizing(server, monkeypatch, path, body, param, size):
    seen = []
    encode = server.state.tokenizer.encode
    monkeypatch.setattr(server.state.tokenizer, "encode", lambda text: seen.append(len(text)) or encode(text))
    response = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 4, **body}, headers=HEADERS, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] == (f"the prompt text is {size} bytes (UTF-8), over the limit of {PROMPT_BYTE_LIMIT} "
                                f"(16 bytes for each of the {MAX_MODEL_LEN - 1} prompt tokens allowed); shorten it")
    assert seen == []  # the tokenizer never saw it
    normal = {"prompt": "word " * 100} if path == "/v1/completions" else {"messages": HELLO}
    response = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 4, **normal}, headers=HEADERS, timeout=60)
    assert response.status_code == 200 and seen
    server.wait_idle()


class _HeldBackend:
    """The tokenizers backend with its batch call, which releases the GIL, held on an event for
    long text; its `encode` holds the GIL for the whole call (a 28 MiB prompt froze the server,
    /health included, for 28 s), so here it fails."""

    def __init__(self, real):
        self.real = real
        self.entered, self.release = threading.Event(), threading.Event()

    def encode_batch(self, texts, **options):
        if max(map(len, texts)) > 1000:
            self.entered.set()
            assert self.release.wait(timeout=120)
        return self.real.encode_batch(texts, **options)

    def encode(self, *args, **options):
        raise AssertionError("tokenizers' encode holds the GIL while it works")

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_the_server_answers_while_a_long_prompt_is_tokenized(server, monkeypatch):
    held = _HeldBackend(server.state.tokenizer.backend)
    monkeypatch.setattr(server.state.tokenizer, "backend", held)
    long = {"model": MODEL, "prompt": "word " * 1500, "max_tokens": 2}  # under the byte limit, over the context
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url + "/v1/completions", json=long, headers=HEADERS, timeout=60)
        try:
            while not held.entered.wait(timeout=0.05):
                assert not pending.done(), pending.result().text
            assert httpx.get(server.url + "/health", timeout=60).status_code == 200
            short = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(HELLO), headers=HEADERS, timeout=60)
            assert short.status_code == 200 and short.json()["choices"][0]["message"]["content"]
        finally:
            held.release.set()
        response = pending.result()
    assert response.status_code == 400 and f"over the limit of {MAX_MODEL_LEN - 1}" in response.json()["error"]["message"]
    server.wait_idle()


def test_text_does_not_wait_for_other_requests_media(server, monkeypatch):
    """Every media worker held by a request decoding images: requests of text alone still answer."""
    prepare = server.state.processor.prepare
    holding, release = threading.Semaphore(0), threading.Event()

    def held(messages, **options):
        if media_parts(messages):
            holding.release()
            assert release.wait(timeout=120)
        return prepare(messages, **options)

    monkeypatch.setattr(server.state.processor, "prepare", held)
    workers = server.state.limits.media_workers
    with concurrent.futures.ThreadPoolExecutor(workers + 2) as pool:
        with_images = [pool.submit(httpx.post, server.url + "/v1/chat/completions", headers=HEADERS, timeout=120,
                                   content=_chat_body(_image_messages(_png_uri(32 + i, 32)))) for i in range(workers)]
        try:
            for _ in range(workers):
                assert holding.acquire(timeout=60)  # the media pool is full
            text_only = [pool.submit(httpx.post, server.url + "/v1/chat/completions", content=_chat_body(HELLO),
                                     headers=HEADERS, timeout=120),
                         pool.submit(httpx.post, server.url + "/v1/completions", headers=HEADERS, timeout=120,
                                     json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})]
            done, waiting = concurrent.futures.wait(text_only, timeout=60)
            assert not waiting, "a request of text alone waited for the media pool"
            assert [future.result().status_code for future in text_only] == [200, 200]
        finally:
            release.set()
        assert [future.result().status_code for future in with_images] == [200] * workers
    server.wait_idle()


# --- bad input: one test each, then a normal request still works ------------------------------

def _png_bytes_of_size(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, built without holding the pixels (all zero) in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _garbage_png_uri() -> str:
    real = base64.b64decode(_png_uri(32, 32).split(",", 1)[1])
    return "data:image/png;base64," + base64.b64encode(real[:33] + b"\x00garbage" * 40).decode()


def _huge_png_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes_of_size(20000, 20000)).decode()


def _chat_body(messages, **extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": 4, **extra}).encode()


BAD_REQUESTS = {
    # name: (body bytes or a callable giving them, headers override, status, param, message fragment)
    "malformed JSON": (b'{"model": "x", "messages": [', None, 400, None, "not valid JSON"),
    "wrong type": (lambda: _chat_body(HELLO, max_tokens="ten"), None, 400, "max_tokens", "valid integer"),
    "unknown content part": (lambda: _chat_body([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
                             None, 400, "messages[0].content[0]", "unknown content part type 'input_audio'"),
    "corrupt base64": (lambda: _chat_body(_image_messages("data:image/png;base64,@@@not-base64@@@")), None, 400,
                       "messages[0].content[0]", "base64"),
    "PNG header with garbage body": (lambda: _chat_body(_image_messages(_garbage_png_uri())), None, 400,
                                     "messages[0].content[0]", "image"),
    "20000x20000 image": (lambda: _chat_body(_image_messages(_huge_png_uri())), None, 400, "messages[0].content[0]",
                          "pixels"),
    "too many images": (lambda: _chat_body(_image_messages(*[_png_uri(8, 8)] * 5)), None, 400, None,
                        "5 images and videos, over the limit of 4"),
    "prompt over the context": (lambda: _chat_body([{"role": "user", "content": "hello " * 600}]), None, 400, None,
                                f"over the limit of {MAX_MODEL_LEN - 1}"),
    "remote URL when disabled": (lambda: _chat_body(_image_messages("https://example.com/cat.png")), None, 400,
                                 "messages[0].content[0]", "fetching remote media is disabled"),
    "path outside the allowed dir": (lambda: _chat_body(_image_messages("file:///etc/hostname")), None, 400,
                                     "messages[0].content[0]", "outside the allowed media folder"),
    "missing API key": (lambda: _chat_body(HELLO), {}, 401, None, "no API key"),
    "wrong API key": (lambda: _chat_body(HELLO), {"Authorization": "Bearer nope"}, 401, None, "incorrect API key"),
    "body over the limit": (lambda: _chat_body(_image_messages("data:image/png;base64," + "A" * (3 << 20))), None, 413,
                            None, "over the limit of 2097152 bytes"),
    "unknown model": (lambda: json.dumps({"model": "gpt-4o", "messages": HELLO}).encode(), None, 404, "model",
                      "does not exist"),
    "bad sampling value": (lambda: _chat_body(HELLO, temperature=-1), None, 400, "temperature", "temperature=-1"),
    "max_tokens=-1": (lambda: _chat_body(HELLO, max_tokens=-1), None, 400, "max_tokens", "max_tokens=-1"),
    "top_logprobs=50": (lambda: _chat_body(HELLO, logprobs=True, top_logprobs=50), None, 400, "top_logprobs",
                        "sampling parameter top_logprobs=50 is invalid: expected an integer in [0, 20]"),
    "max_completion_tokens=0": (lambda: _chat_body(HELLO, max_tokens=None, max_completion_tokens=0), None, 400,
                                "max_completion_tokens", "max_completion_tokens=0"),
    "non-integral max_tokens": (lambda: _chat_body(HELLO, max_tokens=4.5), None, 400, "max_tokens", "valid integer"),
    "seed over int64": (lambda: _chat_body(HELLO, seed=1 << 63), None, 400, "seed", "seed=9223372036854775808"),
    "seed over uint64": (lambda: _chat_body(HELLO, seed=1 << 64), None, 400, "seed", "(int64)"),
    "seed + n over int64": (lambda: _chat_body(HELLO, seed=(1 << 63) - 1, n=2), None, 400, "seed",
                            "over the int64 limit"),
    "logit_bias outside the vocabulary": (lambda: _chat_body(HELLO, logit_bias={"999999": 5}), None, 400, "logit_bias",
                                          "token id 999999 is outside the vocabulary [0, 151936)"),
    "logit_bias over 100": (lambda: _chat_body(HELLO, logit_bias={"5": -101}), None, 400, "logit_bias",
                            "expected a number in [-100, 100]"),
    "stop_token_ids outside the vocabulary": (lambda: _chat_body(HELLO, stop_token_ids=[3, 200000]), None, 400,
                                              "stop_token_ids", "token id 200000 is outside the vocabulary"),
    "min_tokens over max_tokens": (lambda: _chat_body(HELLO, min_tokens=5), None, 400, "min_tokens",
                                   "expected at most max_tokens=4"),
    "stream_options without stream": (lambda: _chat_body(HELLO, stream_options={"include_usage": True}), None, 400,
                                      "stream_options", "only allowed with stream: true"),
    "image_url as a bare string": (lambda: _chat_body([{"role": "user", "content": [
        {"type": "image_url", "image_url": _png_uri()}]}]), None, 400, "messages[0].content[0].image_url",
        'expected an object {"url": ...}'),
    "cache_salt not a string": (lambda: _chat_body(HELLO, cache_salt=42), None, 400, "cache_salt", "valid string"),
    "empty cache_salt": (lambda: _chat_body(HELLO, cache_salt=""), None, 400, "cache_salt", "at least 1 character"),
    "cache_salt over 256 characters": (lambda: _chat_body(HELLO, cache_salt="s" * 257), None, 400, "cache_salt",
                                       "at most 256 characters"),
    "video_url as a bare string": (lambda: _chat_body([{"role": "user", "content": [
        {"type": "video_url", "video_url": "https://example.com/v.mp4"}]}]), None, 400,
        "messages[0].content[0].video_url", "not a bare string"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input(server, case):
    body, headers, status, param, fragment = BAD_REQUESTS[case]
    body = body() if callable(body) else body
    headers = HEADERS if headers is None else headers
    response = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-request-id"]
    normal = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(HELLO), headers=HEADERS, timeout=60)
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"]


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(base64.b64decode(_png_uri(8, 8).split(",", 1)[1]))

    def log_message(self, *args):
        pass


def test_url_to_loopback_refused_even_when_remote_media_is_on(open_server):
    local = http.server.HTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=local.serve_forever, daemon=True)
    thread.start()
    try:
        for host in ("127.0.0.1", "localhost"):
            url = f"http://{host}:{local.server_address[1]}/cat.png"
            response = httpx.post(open_server.url + "/v1/chat/completions", content=_chat_body(_image_messages(url)),
                                  timeout=30)
            assert response.status_code == 400
            assert "not a public address" in response.json()["error"]["message"]
        assert _CountingHandler.hits == 0  # refused before any connection
    finally:
        local.shutdown()
    assert httpx.post(open_server.url + "/v1/chat/completions", content=_chat_body(HELLO), timeout=30).status_code == 200


@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[::127.0.0.1]", "[2002:7f00:1::]"])
def test_ipv6_forms_of_loopback_are_refused(open_server, host):
    """NAT64, IPv4-compatible and 6to4 addresses count as the IPv4 address they carry."""
    response = httpx.post(open_server.url + "/v1/chat/completions",
                          content=_chat_body(_image_messages(f"http://{host}/cat.png")), timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[0]"
    assert "(IPv4 127.0.0.1), which is not a public address" in error["message"]


def test_a_rebinding_name_is_fetched_from_the_address_that_was_checked(open_server, monkeypatch):
    """rebind.example resolves to a public address once, then to 127.0.0.1: the fetch must go to the
    address it checked (played by a stand-in server), never to the loopback one."""
    class Internal(_CountingHandler):
        hits = 0

    class Public(_CountingHandler):
        hits = 0

    internal, public = (http.server.HTTPServer(("127.0.0.1", 0), handler) for handler in (Internal, Public))
    for local in (internal, public):
        threading.Thread(target=local.serve_forever, daemon=True).start()
    port = internal.server_address[1]
    lookups = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def rebinding_dns(host, *args, **kwargs):
        if host != "rebind.example":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        address = "8.8.8.8" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    def public_host_is_the_stand_in(sock, address):
        return real_connect(sock, public.server_address if address == ("8.8.8.8", port) else address)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    monkeypatch.setattr(socket.socket, "connect", public_host_is_the_stand_in)
    try:
        response = httpx.post(open_server.url + "/v1/chat/completions", timeout=30,
                              content=_chat_body(_image_messages(f"http://rebind.example:{port}/cat.png"), max_tokens=1))
    finally:
        internal.shutdown()
        public.shutdown()
    assert (Internal.hits, Public.hits, len(lookups)) == (0, 1, 1)
    assert response.status_code == 200, response.text


def test_our_bugs_are_500_with_a_request_id_and_logged(server, monkeypatch, caplog):
    def broken(messages):
        raise RuntimeError("a bug in the processor")

    monkeypatch.setattr(server.state.processor, "prepare", broken)
    response = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(HELLO), headers=HEADERS, timeout=30)
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert request_id in response.json()["error"]["message"]
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)
    monkeypatch.undo()
    server.wait_idle()
    assert httpx.post(server.url + "/v1/chat/completions", content=_chat_body(HELLO), headers=HEADERS,
                      timeout=30).status_code == 200


def fail_engine_step(monkeypatch, engine, at: int) -> list:
    """The engine's `at`-th step from now raises "a bug in the engine"; the others step as usual.
    Returns the list that counts the steps (clear it to fail again `at` steps later)."""
    real_step, calls = engine.step, []

    def step_failing_once():
        calls.append(1)
        if len(calls) == at:
            raise RuntimeError("a bug in the engine")
        return real_step()

    monkeypatch.setattr(engine, "step", step_failing_once)
    return calls


def test_engine_failure_fails_only_the_requests_in_flight(server, monkeypatch):
    engine = server.llm.engine
    fail_engine_step(monkeypatch, engine, at=2)
    response = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(HELLO), headers=HEADERS, timeout=30)
    assert response.status_code == 500 and "a bug in the engine" in response.json()["error"]["message"]
    server.wait_idle()
    assert engine.num_free_blocks == engine.num_total_blocks
    assert httpx.post(server.url + "/v1/chat/completions", content=_chat_body(HELLO), headers=HEADERS,
                      timeout=30).status_code == 200


def test_a_repeated_prompt_reports_its_cached_tokens(server):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 on first sight, > 0 on a repeat; the
    prefix-cache counters on /metrics count them."""
    system = {"role": "system", "content": "You answer questions about long documents. " * 8}
    messages = [system, {"role": "user", "content": f"Question {time.time()}?"}]
    queried, hits = (_metric(server, f"qwen2vl_prefix_cache_{name}_tokens_total") for name in ("queried", "hit"))
    first = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(messages), headers=HEADERS, timeout=30)
    second = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(messages), headers=HEADERS, timeout=30)
    assert first.status_code == second.status_code == 200
    usage = [r.json()["usage"] for r in (first, second)]
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] < 16 <= usage[1]["prompt_tokens_details"]["cached_tokens"]
    assert usage[1]["prompt_tokens_details"]["cached_tokens"] < usage[1]["prompt_tokens"]
    assert _metric(server, "qwen2vl_prefix_cache_hit_tokens_total") - hits >= usage[1]["prompt_tokens_details"]["cached_tokens"]
    assert _metric(server, "qwen2vl_prefix_cache_queried_tokens_total") - queried >= 2 * usage[0]["prompt_tokens"]
    assert "qwen2vl_vision_cache_hits_total" in httpx.get(server.url + "/metrics", headers=HEADERS).text


def _cached_tokens(server, path: str, body: dict, key: str = API_KEY) -> int:
    response = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2, **body},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


ALICES_IMAGE = _image_messages(_png_uri(56, 56, (23, 140, 90)), text="Describe the picture in great detail. " * 3)


def test_another_salt_learns_nothing_of_a_users_image(server):
    """User B sending user A's image under another cache_salt finds none of A's blocks (nor its
    encoding); under A's salt, or without a salt on both sides as before, the cache is shared."""
    def cached(**salt) -> int:
        return _cached_tokens(server, "/v1/chat/completions", {"messages": ALICES_IMAGE, **salt})

    assert cached(cache_salt="alice-8f3a9c") == 0
    vision_hits = _metric(server, "qwen2vl_vision_cache_hits_total")
    assert cached(cache_salt="bob-27d1e0") == 0
    assert cached() == 0
    assert _metric(server, "qwen2vl_vision_cache_hits_total") == vision_hits  # encoded again for each
    assert cached(cache_salt="alice-8f3a9c") >= 16 and cached() >= 16


def test_a_cache_salt_on_text_completions(server):
    prompt = "A long preamble that two users happen to share, word for word. " * 3
    def cached(salt: str) -> int:
        return _cached_tokens(server, "/v1/completions", {"prompt": prompt, "cache_salt": salt})

    assert cached("alice-8f3a9c") == cached("bob-27d1e0") == 0
    assert cached("alice-8f3a9c") >= 16


def test_cache_salt_by_key_gives_each_key_its_own_cache(tiny_ckpt, monkeypatch):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    salts = []
    add_request = llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request", lambda *args, cache_salt=None: salts.append(cache_salt)
                        or add_request(*args, cache_salt=cache_salt))
    alice, bob = "key-of-alice", "key-of-bob"
    running = RunningServer(llm, api_key=[alice, bob], cache_salt_by_key=True)
    try:
        def cached(key: str, **salt) -> int:
            return _cached_tokens(running, "/v1/chat/completions", {"messages": ALICES_IMAGE, **salt}, key)

        assert cached(alice) == 0
        assert cached(bob) == 0  # bob sends alice's image
        assert cached(alice) >= 16
        assert cached(bob, cache_salt="team") == cached(alice, cache_salt="team") == 0  # one salt, two keys: two caches
        assert cached(bob) >= 16
        wrong = httpx.post(running.url + "/v1/chat/completions", json={"messages": HELLO},
                           headers={"Authorization": "Bearer key-of-carol"}, timeout=30)
        assert wrong.status_code == 401
    finally:
        running.stop()
    # one salt per key (and per key and request salt), none of which shows the key
    assert len(salts) == 6 and len(set(salts)) == 4
    assert all(len(salt) == 64 and alice not in salt and bob not in salt for salt in salts)
    assert hashlib.blake2b(alice.encode(), digest_size=32).hexdigest() not in salts


# --- the front door: bodies, slow and idle clients, connections, security headers ------------

def _raw_exchange(url: str, data: bytes) -> bytes:
    """Send `data` on a new connection and read until the server closes it (the timeout only
    guards against a server that never does)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def _status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def slow_client_server(tiny_ckpt):
    """Short header and body deadlines, and Swagger UI at /docs."""
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, limits=ServerLimits(header_timeout_s=0.5, body_timeout_s=0.5), docs=True)
    yield running
    running.stop()


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"1", b"null"])
def test_a_body_that_is_not_an_object_is_400(server, body):
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = httpx.post(server.url + path, content=body, headers={**HEADERS, "Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"].startswith("the request body must be a JSON object, not ")


def test_a_body_is_refused_before_it_is_read_where_no_route_takes_one(server):
    """POST /health and the other public paths: 413 as soon as the headers declare a body, the
    body never read and the connection closed; a keyless request to the API: 401, likewise."""
    declared = b"Content-Length: 1048576\r\nContent-Type: application/json\r\n\r\n{"  # 1 MiB declared, 1 byte sent
    for path in ("/health", "/", "/openapi.json", "/static/app.js", "/docs"):
        status, body = _status_and_body(_raw_exchange(server.url, b"POST %s HTTP/1.1\r\nHost: x\r\n" % path.encode() + declared))
        assert status == 413 and f"{path} takes no request body" in json.loads(body)["error"]["message"]
    status, body = _status_and_body(_raw_exchange(server.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + declared))
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    chunked = b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"  # no end
    status, body = _status_and_body(_raw_exchange(server.url, chunked))
    assert status == 413 and "/health takes no request body" in json.loads(body)["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_slow_headers_and_idle_connections_get_408_and_are_closed(slow_client_server):
    partial = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for sent in (partial, b""):
        status, body = _status_and_body(_raw_exchange(slow_client_server.url, sent))
        assert (status, body) == (408, b"the request line and headers did not arrive in time")
    assert httpx.get(slow_client_server.url + "/health").status_code == 200


def test_a_slow_body_gets_408_and_the_connection_is_closed(slow_client_server):
    headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    response = _raw_exchange(slow_client_server.url, headers + b'{"model":')
    status, body = _status_and_body(response)
    assert status == 408 and b"connection: close" in response.lower()
    assert json.loads(body)["error"] == {"message": "the request body did not arrive within 0.5 s", "type": "invalid_request_error",
                                         "param": None, "code": "request_timeout"}
    assert httpx.post(slow_client_server.url + "/v1/chat/completions", content=_chat_body(HELLO), timeout=30).status_code == 200


def test_a_request_over_the_connection_limit_gets_503(tiny_ckpt):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, limits=ServerLimits(max_connections=2, header_timeout_s=600))
    open_connections = running.server.server_state.connections
    try:
        port = int(running.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        deadline = time.monotonic() + 30
        while len(open_connections) < 2:
            assert time.monotonic() < deadline, "the server did not accept the idle connections"
            time.sleep(0.02)
        refused = httpx.get(running.url + "/health")
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        idle.pop().close()
        while len(open_connections) > 1:
            assert time.monotonic() < deadline, "the server did not notice a connection closing"
            time.sleep(0.02)
        assert httpx.get(running.url + "/health").status_code == 200  # the second of two connections
        idle.pop().close()
    finally:
        running.stop()


def test_every_response_carries_the_security_headers(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        responses = [http.get("/"), http.get("/static/app.js"), http.get("/health"), http.get("/openapi.json"),
                     http.get("/v1/models", headers=HEADERS), http.get("/v1/models"), http.get("/nothing", headers=HEADERS),
                     http.post("/v1/chat/completions", content=b"[]", headers=HEADERS)]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 401, 404, 400]
    for response in responses:
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self';" in policy and "http" not in policy


def test_swagger_ui_is_off_unless_asked_for(server, slow_client_server):
    assert httpx.get(server.url + "/docs").status_code == 404
    page = httpx.get(slow_client_server.url + "/docs")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "http" not in policy  # no script from anywhere else
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    assert scripts == ["/static/swagger-ui/swagger-ui-bundle.js", "/static/docs.js"] and "<script>" not in page.text
    for path in (*scripts, "/static/swagger-ui/swagger-ui.css"):  # served here, without a key
        assert httpx.get(slow_client_server.url + path).status_code == 200, path
    assert "/openapi.json" in httpx.get(slow_client_server.url + "/static/docs.js").text
