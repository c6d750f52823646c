"""Budgets before work: every image and video is sized from its header and per-item options and
checked against the limits before any pixel is decoded or resized. Over a limit is an InputError /
MediaError naming the field, with no pixel decoded (the decoders are replaced by ones that fail the
test), in the Python API and as a 400 on the server, and the process's memory does not grow."""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import pytest
from PIL import Image

from processor_reference import write_checkpoint_files
from prompt_tokens import count_tokens

import qwen2vl.processor.processor as processor_module
from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor import MediaBudget, Processor

MAX_GROWTH_MB = 50


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_checkpoint_files(tmp_path_factory.mktemp("budget-ckpt")))


def _png_uri(width: int = 64, height: int = 48) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _video_uri(frames: int = 8, size: int = 56) -> str:
    from test_server_units import _video_uri as video_uri

    return video_uri(frames, size)


def _one(part: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]


def _refused(processor, part: dict, error, field: str | None, match: str):
    """`part` is refused with `error` naming `field` (callers forbid decoding: `no_decoding`)."""
    with pytest.raises(error, match=match) as caught:
        processor.prepare(_one(part))
    assert (caught.value.message_index, caught.value.content_index, caught.value.field) == (0, 1, field)
    return caught.value


def forbid_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded before the budget check")

    for name in ("to_rgb", "load_frame_list", "load_video_file", "resize_frames", "resize_image"):
        monkeypatch.setattr(processor_module, name, refuse)


@pytest.fixture
def no_decoding(monkeypatch):
    forbid_decoding(monkeypatch)


# --- the requests of issue 18, through the Python API -------------------------------------------

def test_image_min_pixels_over_the_limit(processor, no_decoding):
    _refused(processor, {"type": "image", "image": _png_uri(), "min_pixels": 200_000_000, "max_pixels": 400_000_000},
             InputError, "min_pixels", r"min_pixels \(200000000\) is over the limit of 12845056 pixels per image")
    _refused(processor, {"type": "image", "image": _png_uri(), "min_pixels": 1e9, "max_pixels": 2**31},
             InputError, "min_pixels", r"min_pixels \(1000000000\) is over the limit of 12845056 pixels per image")


def test_video_min_pixels_over_the_limit(processor, no_decoding):
    pytest.importorskip("av")
    _refused(processor, {"type": "video", "video": _video_uri(), "min_pixels": 1e12}, InputError, "min_pixels",
             r"min_pixels \(1000000000000\) is over the limit of 12845056 pixels per video frame")


# --- the size the options ask for ----------------------------------------------------------------

def test_max_pixels_may_not_keep_a_huge_image_huge(processor, no_decoding):
    big = Image.new("RGB", (4000, 4000))  # 16 MP: under the 89 MP source limit, over 16384 tokens
    _refused(processor, {"type": "image", "image": big, "max_pixels": 2**31}, InputError, "max_pixels",
             "max_pixels asks to resize a 4000x4000 image to 4004x4004 = 16032016 pixels, over the limit of "
             "12845056 pixels per image")
    # under the limit it is as before: 3000 rounds to 2996 = 107 x 28, 107 x 107 visual tokens
    assert count_tokens(processor, _one({"type": "image", "image": Image.new("RGB", (3000, 3000)), "max_pixels": 2**31})) \
        == count_tokens(processor, _one({"type": "image", "image": Image.new("RGB", (28, 28))})) + 107 * 107 - 4


def test_resized_size_over_a_tighter_budget(processor, no_decoding):
    tight = Processor(processor.tokenizer, processor.template, processor.patchifier, processor.min_pixels,
                      processor.max_pixels, budget=MediaBudget(max_resized_pixels=100_000))
    _refused(tight, {"type": "image", "image": _png_uri(), "resized_height": 400, "resized_width": 400},
             InputError, "resized_height", "resized_height asks to resize a 64x48 image to 392x392 = 153664 pixels, "
             "over the limit of 100000 pixels per image")
    _refused(tight, {"type": "image", "image": Image.new("RGB", (400, 400))}, InputError, None,
             "a 400x400 image resizes to 392x392 = 153664 pixels, over the limit of 100000 pixels per image")


def test_source_pixels_from_the_header(processor, no_decoding):
    small = Processor(processor.tokenizer, processor.template, processor.patchifier, processor.min_pixels,
                      processor.max_pixels, budget=MediaBudget(max_source_pixels=64 * 47))
    _refused(small, {"type": "image", "image": _png_uri(64, 48)}, MediaError, None,
             "the image is 64x48 = 3072 pixels, over the limit of 3008 pixels")


def test_video_frames_and_tokens(processor, no_decoding):
    pytest.importorskip("av")
    uri = _video_uri(frames=8)
    few = Processor(processor.tokenizer, processor.template, processor.patchifier, processor.min_pixels,
                    processor.max_pixels, budget=MediaBudget(max_video_pixels=6 * 56 * 56, max_item_tokens=100))
    _refused(few, {"type": "video", "video": uri, "nframes": 8}, MediaError, "nframes",
             "the video would decode 8 frames of 56x56, over the limit of 18816 pixels per video")
    # 4 frames, each upsized to qwen_vl_utils' video minimum of 128 x 28x28 pixels (336x336, 144 tokens): 2 x 144
    _refused(few, {"type": "video", "video": uri, "nframes": 4}, MediaError, "nframes",
             "the video would make 288 visual tokens, over the limit of 100 per video")
    # listed frames are first resized as images in multiples of 56, at least 4 x 56x56 pixels
    _refused(few, {"type": "video", "video": [Image.new("RGB", (56, 56))] * 8}, MediaError, None,
             "the video would hold 8 frames resized to 112x112, over the limit of 18816 pixels per video")


def test_frame_list_max_pixels(processor, no_decoding):
    frames = [Image.new("RGB", (4000, 4000))] * 2
    _refused(processor, {"type": "video", "video": frames, "max_pixels": 2**31}, InputError, "max_pixels",
             "max_pixels asks to resize a 4000x4000 video frame to 3976x3976 = 15808576 pixels, over the limit "
             "of 12845056 pixels per video frame")


def test_a_later_item_over_budget_stops_the_conversation_before_decoding(processor, no_decoding):
    messages = [{"role": "user", "content": [{"type": "image", "image": _png_uri()},
                                             {"type": "image", "image": _png_uri(), "min_pixels": 2 * 10**8}]}]
    with pytest.raises(InputError, match="min_pixels") as caught:
        processor.prepare(messages)
    assert (caught.value.content_index, caught.value.field) == (1, "min_pixels")


def test_processor_min_pixels_bound(processor):
    with pytest.raises(InputError, match=r"min_pixels \(1000000000\) is over the limit of 12845056") as caught:
        Processor(processor.tokenizer, processor.template, processor.patchifier, 10**9, 2 * 10**9)
    assert caught.value.field == "min_pixels"


def test_within_budget_is_unchanged(processor, no_decoding):
    """The defaults admit what the reference's defaults produce: a 12 MP photo at 16384 tokens at most."""
    tokens = count_tokens(processor, _one({"type": "image", "image": Image.new("RGB", (4000, 3000))}))
    assert tokens == count_tokens(processor, _one({"type": "image", "image": Image.new("RGB", (28, 28))})) + 15301 - 4


# --- the server: each request of the issue is a fast 400 naming the field, and memory stays -------

def _memory_probe():
    """(reset, peak_kib): the process's peak RSS since `reset()`, by the kernel's high-water mark when
    it can be reset, else by sampling."""
    def rss(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        resettable = True
    except OSError:
        resettable = False
    if resettable:
        def reset():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return reset, lambda: rss("VmHWM"), lambda: None
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss("VmRSS"))
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    return (lambda: peak.__setitem__(0, rss("VmRSS"))), (lambda: peak[0]), stop.set


HOSTILE = {
    # name: (content part, param)
    "image min_pixels 2e8": ({"type": "image_url", "image_url": {"url": "PNG"}, "min_pixels": 200_000_000,
                              "max_pixels": 400_000_000}, "messages[0].content[0].min_pixels"),
    "image min_pixels 1e9": ({"type": "image_url", "image_url": {"url": "PNG"}, "min_pixels": 1_000_000_000,
                              "max_pixels": 2**31}, "messages[0].content[0].min_pixels"),
    "video min_pixels 1e12": ({"type": "video_url", "video_url": {"url": "VIDEO"}, "min_pixels": 10**12},
                              "messages[0].content[0].min_pixels"),
    "video nframes 1": ({"type": "video_url", "video_url": {"url": "VIDEO"}, "nframes": 1},
                        "messages[0].content[0].nframes"),
}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_server import RunningServer

    from qwen2vl import Qwen2VL

    running = RunningServer(Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=512))
    yield running
    running.stop()


def test_server_refuses_the_hostile_requests_before_decoding_and_without_memory(server, monkeypatch):
    from test_server import MODEL

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("av")
    urls = {"PNG": _png_uri(), "VIDEO": _video_uri()}

    def body(part: dict) -> dict:
        part = json.loads(json.dumps(part))
        for kind in ("image_url", "video_url"):
            if kind in part:
                part[kind]["url"] = urls[part[kind]["url"]]
        return {"model": MODEL, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
                "max_tokens": 2}

    with httpx.Client(base_url=server.url, timeout=30) as client:
        normal = body({"type": "image_url", "image_url": {"url": "PNG"}})
        assert client.post("/v1/chat/completions", json=normal).status_code == 200  # warm every code path
        reset, peak_kib, stop = _memory_probe()
        reset()
        baseline = peak_kib()
        try:
            with monkeypatch.context() as patches:
                forbid_decoding(patches)  # the server runs in this process: a decode would fail the request
                for _ in range(3):
                    for name, (part, param) in HOSTILE.items():
                        response = client.post("/v1/chat/completions", json=body(part))
                        assert response.status_code == 400, (name, response.text)
                        error = response.json()["error"]
                        assert error["param"] == param, (name, error)
            growth_mb = (peak_kib() - baseline) / 1024
        finally:
            stop()
        assert growth_mb < MAX_GROWTH_MB, growth_mb
        assert client.post("/v1/chat/completions", json=normal).status_code == 200


def test_server_media_errors_say_what_was_received(server):
    from test_server import MODEL, _png_bytes_of_size

    httpx = pytest.importorskip("httpx")
    huge = "data:image/png;base64," + base64.b64encode(_png_bytes_of_size(20000, 20000)).decode()
    text = "data:text/plain;base64," + base64.b64encode(b"hello, this is text").decode()
    cases = [
        ({"type": "image_url", "image_url": {"url": huge}}, "the image is 400000000 pixels, over the limit of 33177600 pixels"),
        ({"type": "image_url", "image_url": {"url": text}}, "data URI of type text/plain is not an image"),
        ({"type": "video_url", "video_url": {"url": _png_uri()}}, "data URI is a still image (png_pipe), not a video"),
    ]
    for part, fragment in cases:
        if part["type"] == "video_url":
            pytest.importorskip("av")
        body = {"model": MODEL, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith(f"messages[0].content[0]: {fragment}"), error
        assert error["param"] == "messages[0].content[0]" and "decompression" not in error["message"]
