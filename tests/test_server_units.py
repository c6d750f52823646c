"""Server pieces without a model: request schemas and their error messages, media rules, limits, metrics."""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import socket

import pytest
from PIL import Image

from prompt_tokens import count_tokens

pytest.importorskip("fastapi")

from qwen2vl.errors import InputError, MediaError  # noqa: E402
from qwen2vl.server.limits import Admission, MediaAccess, Overloaded, ServerLimits  # noqa: E402
from qwen2vl.processor import Processor  # noqa: E402
from qwen2vl.processor.fetch import fetch_url  # noqa: E402
from qwen2vl.server.media import check_media, media_policy, public_addresses_only, server_processor  # noqa: E402
from qwen2vl.server.metrics import Metrics  # noqa: E402
from qwen2vl.server.schemas import (  # noqa: E402
    ChatCompletionRequest,
    ChatCompletionChunk,
    ChatChunkChoice,
    ChatDelta,
    CompletionRequest,
    describe_validation_error,
)
from pydantic import ValidationError  # noqa: E402


def _error(body: dict | str) -> tuple[str, str | None]:
    text = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(text)
    return describe_validation_error(caught.value)


def _png(width: int, height: int, color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


USER = {"role": "user", "content": "hi"}


def test_validation_errors_name_the_field():
    assert _error('{"messages": [') == ("the request body is not valid JSON (EOF while parsing a list at line 1 column 14)", None)
    message, param = _error({"messages": [USER], "max_tokens": "ten"})
    assert (param, message) == ("max_tokens", "max_tokens: Input should be a valid integer")
    message, param = _error({"messages": [USER], "max_tokens": True})  # no bool -> int coercion
    assert param == "max_tokens"
    message, param = _error({"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]})
    assert param == "messages[0].content[0]"
    assert "unknown content part type 'input_audio'" in message and "'image_url'" in message
    message, param = _error({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]})
    assert param == "messages[0].content[0].image_url.url"
    message, param = _error({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"},
                                                                        "max_pixels": -5}]}]})
    assert param == "messages[0].content[0].max_pixels" and "greater than 0" in message
    message, param = _error({"messages": [USER], "functions": []})  # OpenAI's deprecated form of tools
    assert param == "functions" and "unknown field" in message
    message, param = _error({"messages": [{"role": "robot", "content": "x"}]})
    assert param == "messages[0].role"
    message, param = _error({"messages": []})
    assert param == "messages"


def _completion_error(body: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate_json(json.dumps(body))
    return describe_validation_error(caught.value)


def test_integral_floats_count_as_integers():
    part = {"type": "image_url", "image_url": {"url": "x"}, "min_pixels": 3136.0, "resized_height": 28.0,
            "resized_width": 56}
    request = ChatCompletionRequest.model_validate_json(json.dumps({
        "messages": [{"role": "user", "content": [part]}], "max_tokens": 16.0, "n": 2.0, "seed": 7.0,
        "stop_token_ids": [5.0], "min_tokens": 1.0}))
    values = (request.max_tokens, request.n, request.seed, request.stop_token_ids, request.min_tokens)
    assert values == (16, 2, 7, [5], 1) and all(type(v) is int for v in values[:3])
    image = request.processor_messages()[0]["content"][0]
    assert (image["min_pixels"], image["resized_height"]) == (3136, 28) and type(image["min_pixels"]) is int
    assert _error({"messages": [USER], "max_tokens": 16.5}) == ("max_tokens: Input should be a valid integer", "max_tokens")
    assert _error({"messages": [{"role": "user", "content": [{**part, "min_pixels": 3136.5}]}]})[1] == \
        "messages[0].content[0].min_pixels"
    assert _error({"messages": [USER], "max_tokens": True})[1] == "max_tokens"  # still no bool -> int
    assert CompletionRequest.model_validate_json('{"prompt": [1.0, 2]}').prompt == [1, 2]


def test_media_urls_must_be_objects():
    for kind in ("image_url", "video_url"):
        message, param = _error({"messages": [{"role": "user", "content": [{"type": kind, kind: "https://a.b/c"}]}]})
        assert param == f"messages[0].content[0].{kind}"
        assert message == f'{param}: expected an object {{"url": ...}}, not a bare string'


def test_empty_prompts_are_refused_by_the_schema_it_publishes():
    assert _completion_error({"prompt": ""}) == ("prompt: String should have at least 1 character", "prompt")
    assert _completion_error({"prompt": []})[1] == "prompt"
    assert _completion_error({"prompt": ["a", ""]}) == ("prompt[1]: String should have at least 1 character", "prompt[1]")
    assert _completion_error({"prompt": [[1], []]})[1] == "prompt[1]"
    branches = CompletionRequest.model_json_schema()["properties"]["prompt"]["anyOf"]
    assert {"minLength": 1, "type": "string"} in branches
    assert all(branch.get("minItems") == 1 for branch in branches if branch["type"] == "array")
    assert all(item.get("minItems", 1) == 1 for branch in branches if branch["type"] == "array"
               for item in [branch["items"]] if item.get("type") == "array")


def test_logit_bias_keys_are_token_ids():
    request = CompletionRequest.model_validate_json('{"prompt": "x", "logit_bias": {"50256": -100, "7": 2.5}}')
    assert request.sampling_params(16, None).logit_bias == {50256: -100.0, 7: 2.5}
    message, param = _completion_error({"prompt": "x", "logit_bias": {"cat": 1}})
    assert (param, message) == ("logit_bias", 'logit_bias: \'cat\' is not a token id (keys are token ids written as '
                                              'strings, such as "50256")')


def test_sampling_field_names_map_back_to_the_request():
    chat = ChatCompletionRequest.model_validate_json(json.dumps({"messages": [USER], "max_completion_tokens": 5}))
    assert chat.sampling_field_names() == {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"}
    assert ChatCompletionRequest.model_validate_json(json.dumps({"messages": [USER]})).sampling_field_names() == {
        "logprobs": "top_logprobs"}
    assert CompletionRequest.model_validate_json('{"prompt": "x"}').sampling_field_names() == {}


def test_openai_parts_become_processor_parts():
    request = ChatCompletionRequest.model_validate_json(json.dumps({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}, "max_pixels": 50176.0,
             "min_pixels": 3136},
            {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}, "fps": 1.0},
            {"type": "text", "text": "what?"},
        ]},
    ]}))
    assert request.processor_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "image", "image": "data:x", "max_pixels": 256 * 28 * 28},
            {"type": "image", "image": "https://example.com/a.png", "min_pixels": 3136, "max_pixels": 50176},
            {"type": "video", "video": "https://example.com/v.mp4", "fps": 1.0},
            {"type": "text", "text": "what?"},
        ]},
    ]


def test_choice_seeds_and_unset_sampling_fields():
    request = ChatCompletionRequest.model_validate_json(json.dumps({"messages": [USER], "n": 3, "seed": 10, "top_k": 5}))
    assert request.choice_seeds() == [10, 11, 12]
    params = request.sampling_params(max_tokens=None, logprobs=None)
    assert (params.temperature, params.top_k, params.max_tokens) == (None, 5, None)  # unset = generation config


def test_stream_chunks_send_only_what_they_set():
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[
        ChatChunkChoice(index=0, delta=ChatDelta(content="a"), logprobs=None, finish_reason=None)])
    assert json.loads(chunk.model_dump_json(exclude_unset=True)) == {
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}]}


# Every IPv6 form that carries an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo's client) counts as it.
CARRIED_IPV4 = {"[::ffff:127.0.0.1]": "127.0.0.1", "[::127.0.0.1]": "127.0.0.1", "[64:ff9b::7f00:1]": "127.0.0.1",
                "[2002:7f00:1::]": "127.0.0.1", "[2001:0:4136:e378:8000:63bf:80ff:fffe]": "127.0.0.1",
                "[64:ff9b::a00:1]": "10.0.0.1", "[2002:c0a8:1::1]": "192.168.0.1"}
NON_PUBLIC_HOSTS = ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.10", "172.16.5.4", "169.254.169.254", "0.0.0.0",
                    "100.64.0.1", "224.0.0.1", "[::1]", "[fe80::1]", "[64:ff9b:1::808:808]", *CARRIED_IPV4]


@pytest.mark.parametrize("host", NON_PUBLIC_HOSTS)
def test_non_public_hosts_are_refused_before_connecting(host, monkeypatch):
    def no_connection(*args):
        raise AssertionError("connected to a refused host")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    with pytest.raises(MediaError, match="which is not a public address") as caught:
        fetch_url(f"http://{host}/a.png", media_policy(MediaAccess(allow_remote=True)))
    if host in CARRIED_IPV4:
        assert f"(IPv4 {CARRIED_IPV4[host]})" in str(caught.value)


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "2002:808:808::1"])
def test_public_addresses_pass(address):
    public_addresses_only("example.com", ipaddress.ip_address(address))


def _messages(*images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": "?"}]}]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from processor_reference import write_checkpoint_files

    return Processor.from_pretrained(write_checkpoint_files(tmp_path_factory.mktemp("units-ckpt")))


def _server_checks(processor, messages, access=MediaAccess(), limits=ServerLimits()) -> int:
    """What the server does before decoding: its own media rules, then the processor's budget (headers only)."""
    check_media(messages, media_policy(access), limits)
    return count_tokens(server_processor(processor, access, limits), messages)


def test_server_media_limits_apply_to_the_image_as_sent(processor):
    limits = ServerLimits(max_media_per_request=2, max_image_pixels=5000)
    assert _server_checks(processor, _messages(_png(60, 40)), limits=limits) > 4
    # max_image_pixels bounds the image as sent (80x63) and as its options resize it (60x40 asked to 84x84)
    with pytest.raises(MediaError, match="80x63 = 5040 pixels, over the limit of 5000") as caught:
        _server_checks(processor, _messages(_png(4, 4), _png(80, 63)), limits=limits)
    assert (caught.value.message_index, caught.value.content_index) == (0, 1)
    messages = _messages(_png(60, 40))
    messages[0]["content"][0]["min_pixels"] = 7056
    with pytest.raises(InputError, match="min_pixels .7056. is over the limit of 5000 pixels per image") as caught:
        _server_checks(processor, messages, limits=limits)
    assert caught.value.field == "min_pixels"
    with pytest.raises(InputError, match="3 images and videos, over the limit of 2"):
        check_media(_messages(*[_png(4, 4)] * 3), media_policy(MediaAccess()), limits)


def test_local_files_only_under_the_allowed_dir(processor, tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    Image.new("RGB", (8, 8)).save(inside / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    with pytest.raises(MediaError, match="local files are refused"):
        check_media(_messages(str(inside / "a.png")), media_policy(MediaAccess()), ServerLimits())
    access = MediaAccess(allowed_dir=inside)
    _server_checks(processor, _messages(str(inside / "a.png"), f"file://{inside / 'a.png'}"), access)
    for outside in (str(tmp_path / "b.png"), str(inside / ".." / "b.png"), "file:///etc/hostname"):
        with pytest.raises(MediaError, match="outside the allowed media folder"):
            _server_checks(processor, _messages(outside), access)


def test_remote_media_off_by_default(processor):
    with pytest.raises(MediaError, match="fetching remote media is disabled"):
        _server_checks(processor, _messages("http://example.com/a.png"))


def test_limits_and_admission():
    limits = ServerLimits(max_prompt_tokens=100)
    limits.check_prompt_length(100, max_model_len=1000)
    with pytest.raises(InputError, match="101 tokens, over the limit of 100"):
        limits.check_prompt_length(101, max_model_len=1000)
    with pytest.raises(InputError, match="over the limit of 49"):
        ServerLimits().check_prompt_length(50, max_model_len=50)
    limits.check_prompt_bytes(1600, max_model_len=1000, field="prompt")  # 16 bytes per prompt token allowed
    with pytest.raises(InputError, match=r"1601 bytes \(UTF-8\), over the limit of 1600 \(16 bytes for each of the "
                                         r"100 prompt tokens allowed\)") as caught:
        limits.check_prompt_bytes(1601, max_model_len=1000, field="prompt")
    assert caught.value.field == "prompt"
    with pytest.raises(InputError, match="over the limit of 10 .the server's --max-prompt-bytes."):
        ServerLimits(max_prompt_bytes=10).check_prompt_bytes(11, max_model_len=1000, field="messages")
    admission = Admission(3)
    admission.acquire(2)
    with pytest.raises(Overloaded):
        admission.acquire(2)
    admission.release(2)
    admission.acquire(3)


def test_metrics_labels_of_paths():
    from qwen2vl.server.gate import _endpoint

    assert _endpoint("/v1/completions") == "/v1/completions"
    assert _endpoint("/v1/models/Qwen/Qwen2-VL-2B-Instruct-AWQ") == "/v1/models/{model}"
    assert _endpoint("/v1/unknown") == "other"


def test_metrics_render_prometheus_text():
    metrics = Metrics()
    metrics.requests.inc("/v1/chat/completions", "200")
    metrics.generation_tokens.inc(amount=7)
    metrics.time_to_first_token.observe(0.02)
    metrics.time_to_first_token.observe(0.3)
    text = metrics.render(running=2, waiting=1, kv_cache_usage=0.25)
    assert 'qwen2vl_http_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert "qwen2vl_generation_tokens_total 7" in text
    assert 'qwen2vl_time_to_first_token_seconds_bucket{le="0.025"} 1' in text
    assert 'qwen2vl_time_to_first_token_seconds_bucket{le="0.5"} 2' in text
    assert "qwen2vl_time_to_first_token_seconds_count 2" in text
    assert "qwen2vl_requests_running 2" in text and "qwen2vl_requests_waiting 1" in text
    assert "qwen2vl_kv_cache_usage_ratio 0.25" in text


def _video_uri(frames: int = 8, size: int = 56) -> str:
    av = pytest.importorskip("av")
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = np.full((size, size, 3), index * 30 % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_video_frames_are_bounded_before_decoding(processor):
    messages = [{"role": "user", "content": [{"type": "video", "video": _video_uri(), "nframes": 4}]}]
    _server_checks(processor, messages, limits=ServerLimits(max_video_pixels=4 * 56 * 56))
    with pytest.raises(MediaError, match="would decode 4 frames of 56x56, over the limit of 12543") as caught:
        _server_checks(processor, messages, limits=ServerLimits(max_video_pixels=4 * 56 * 56 - 1))
    assert caught.value.field == "nframes"
    with pytest.raises(MediaError, match="a frame of the video is 56x56"):
        _server_checks(processor, messages, limits=ServerLimits(max_image_pixels=56 * 55))


class _FakeEngine:
    """Two tokens per request, one per step; refuses prompts of one token."""

    num_total_blocks = 8

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.aborted: list[str] = []

    @property
    def num_free_blocks(self):
        return self.num_total_blocks - len(self.requests)

    def has_unfinished(self):
        return bool(self.requests)

    def compile_constraint(self, params):
        return None  # no structured output

    def add_request(self, prompt, params, request_id, cache_salt=None):
        if len(prompt) < 2:
            raise InputError("the prompt is too short")
        self.requests[request_id] = 0
        return request_id

    def abort(self, request_id):
        self.requests.pop(request_id)
        self.aborted.append(request_id)

    def step(self):
        from qwen2vl.engine.sequence import RequestOutput

        outputs = []
        for request_id in list(self.requests):
            count = self.requests[request_id] = self.requests[request_id] + 1
            finished = count == 2
            if finished:
                del self.requests[request_id]
            outputs.append(RequestOutput(request_id, 3, list(range(count)), [count - 1], "ab"[:count], "ab"[count - 1],
                                         finished, "length" if finished else None))
        return outputs


def test_async_engine_streams_refuses_and_aborts():
    import asyncio

    from qwen2vl.engine.async_engine import AsyncEngine, RequestCancelled
    from qwen2vl.engine.driver import EngineDriver

    async def run():
        fake = _FakeEngine()
        engine = AsyncEngine(EngineDriver(fake))
        engine.start()
        try:
            stream = await engine.add_request([1, 2, 3], None, "a")
            assert [output.text_delta async for output in stream] == ["a", "b"]
            with pytest.raises(InputError, match="too short"):
                await engine.add_request([1], None, "b")
            fake.step = lambda: []  # never finishes on its own
            stream = await engine.add_request([1, 2], None, "c")
            stream.abort()
            with pytest.raises(RequestCancelled):
                await stream.__anext__()
            for _ in range(100):
                if fake.aborted:
                    break
                await asyncio.sleep(0.01)
            assert fake.aborted == ["c"] and engine.num_requests == 0
        finally:
            engine.stop()

    asyncio.run(run())


def test_every_sampling_field_is_a_request_field_or_named_as_not_offered():
    import dataclasses

    from qwen2vl.sampling_params import SamplingParams
    from qwen2vl.structured import KINDS
    from qwen2vl.server.schemas import (
        SAMPLING_FIELDS_BY_NAME,
        SAMPLING_FIELDS_NOT_OFFERED,
        ChatCompletionRequest,
    )

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert names == (set(SAMPLING_FIELDS_BY_NAME) | set(SAMPLING_FIELDS_NOT_OFFERED) | {"max_tokens", "logprobs"}
                     | set(KINDS))
    assert {"max_tokens", "max_completion_tokens", "top_logprobs"} <= set(ChatCompletionRequest.model_fields)


def test_the_server_processor_keeps_everything_but_its_media_rules(processor):
    """Qwen2.5-VL's video time scale and the context survive the server's own media policy."""
    source = processor.with_media(processor.media_policy, processor.budget)  # a copy to change
    source.tokens_per_second, source.context_len = 2.0, 4096
    served = server_processor(source, MediaAccess(), ServerLimits(max_image_pixels=5000))
    assert (served.tokens_per_second, served.context_len, served.template) == (2.0, 4096, source.template)
    assert served.budget != source.budget and source.tokens_per_second == 2.0


def test_the_server_takes_a_media_policy_and_keeps_remote_hosts_public(processor):
    from dataclasses import replace

    from qwen2vl.processor import MediaPolicy
    from qwen2vl.server.limits import SERVER_MEDIA

    assert (SERVER_MEDIA.allow_remote, SERVER_MEDIA.max_bytes, SERVER_MEDIA.allowed_dir) == (False, 20 << 20, None)
    assert MediaAccess(allow_remote=True, fetch_timeout_s=2) == replace(SERVER_MEDIA, allow_remote=True, timeout=2)
    served = server_processor(processor, MediaPolicy(allow_remote=True, max_bytes=100), ServerLimits())
    assert served.media_policy == MediaPolicy(allow_remote=True, max_bytes=100, check_address=public_addresses_only)
