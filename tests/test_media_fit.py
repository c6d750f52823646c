"""Fitting the context: images and videos without an explicit size shrink to fit the model's context
(fewer frames first, then fewer pixels), from their headers, before any decoding; explicit options win."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from processor_reference import write_checkpoint_files, write_mp4
from prompt_tokens import count_tokens

import qwen2vl.processor.fit as fit_module
import qwen2vl.processor.processor as processor_module
from qwen2vl.errors import InputError
from qwen2vl.processor import Processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint_files(tmp_path_factory.mktemp("fit-ckpt"))


@pytest.fixture(scope="module")
def processor(checkpoint):
    return Processor.from_pretrained(checkpoint)


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    pytest.importorskip("av")
    # 6 s at 10 fps: 12 frames sampled at 2 fps, each upsized to 280x392 (140 tokens, the 128-token minimum)
    return str(write_mp4(tmp_path_factory.mktemp("fit-video") / "v.mp4", [picture(64, 48, i) for i in range(60)], fps=10))


def one(*parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]


def video(path, **options):
    return {"type": "video", "video": path, **options}


def image(value, **options):
    return {"type": "image", "image": value, **options}


def test_within_the_context_nothing_changes(processor, mp4):
    messages = one(video(mp4), image(picture(1000, 800)))
    prompt = processor.prepare(messages, context_len=10**6)
    assert [item.grid_thw for item in prompt.vision_items] == [(6, 20, 28), (1, 58, 72)]
    assert len(processor.prepare(messages)) == len(prompt) == 840 + 1044 + 2 * 2 + len(processor.prepare(one()))  # + vision start/end


def test_a_long_video_samples_fewer_frames_of_the_same_size(processor, mp4, caplog, monkeypatch):
    monkeypatch.setattr(fit_module, "_logged", False)
    messages = one(video(mp4), video(mp4))
    with caplog.at_level(logging.INFO, logger="qwen2vl.processor.fit"):
        prompt = processor.prepare(messages, context_len=1200)
        processor.prepare(messages, context_len=1200)
    assert [item.grid_thw for item in prompt.vision_items] == [(3, 20, 28)] * 2  # 6 frames each, same size
    assert [item.pixels.shape[0] for item in prompt.vision_items] == [6, 6]
    assert prompt.vision_items[0].fps == pytest.approx(1.0)
    assert len(prompt) <= 0.9 * 1200 and count_tokens(processor, messages, context_len=1200) == len(prompt)
    logged = [r for r in caplog.records if r.name == "qwen2vl.processor.fit"]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    assert "over the context of 1200" in logged[0].getMessage()
    # at the 4-frame minimum the prompt fits the context, if not the room for the answer
    assert [item.grid_thw for item in processor.prepare(messages, context_len=600).vision_items] == [(2, 20, 28)] * 2


def test_images_get_fewer_pixels_in_proportion(processor):
    big, small = picture(1000, 800), picture(500, 400, 1)
    messages = one(image(big), image(small), image(picture(300, 300, 2), max_pixels=300 * 300))
    unfitted = [item.num_tokens(2) for item in processor.prepare(messages).vision_items]
    prompt = processor.prepare(messages, context_len=1000)
    tokens = [item.num_tokens(2) for item in prompt.vision_items]
    assert tokens[2] == unfitted[2] == 100  # max_pixels given: kept (280x280)
    assert tokens[0] < unfitted[0] and tokens[1] < unfitted[1]
    assert tokens[0] / tokens[1] == pytest.approx(unfitted[0] / unfitted[1], rel=0.15)
    assert len(prompt) <= 900
    assert all(item.pixels.dtype.is_floating_point is False for item in prompt.vision_items)


def test_explicit_options_win_and_what_cannot_fit_is_refused_before_decoding(processor, mp4, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded before the context check")

    for name in ("to_rgb", "load_frame_list", "load_video_file", "resize_frames", "resize_image"):
        monkeypatch.setattr(processor_module, name, refuse)
    with pytest.raises(InputError, match=r"the prompt would have \d+ tokens \(1680 of them visual\), over the limit "
                                         r"of 599 \(the context is 600 tokens"):
        processor.prepare(one(video(mp4, nframes=12), video(mp4, fps=2.0)), context_len=600)
    # frames at their minimum (4) and pixels at qwen_vl_utils' 128-token minimum still do not fit
    with pytest.raises(InputError, match="over the limit of 299"):
        count_tokens(processor, one(video(mp4), video(mp4)), context_len=300)


def test_the_checkpoint_context_applies_without_an_engine(checkpoint, tmp_path, mp4):
    small = write_checkpoint_files(tmp_path / "small")
    (small / "config.json").write_text(json.dumps({"max_position_embeddings": 32768,
                                                   "text_config": {"max_position_embeddings": 600}}))
    processor = Processor.from_pretrained(small)
    assert processor.context_len == 600 and Processor.from_pretrained(checkpoint).context_len == 32768
    assert [item.grid_thw for item in processor.prepare(one(video(mp4), video(mp4))).vision_items] == [(2, 20, 28)] * 2
    # a larger context_len than the checkpoint's does not raise the limit
    assert count_tokens(processor, one(video(mp4), video(mp4)), context_len=10**6) < 600


def test_generate_rows_fit_the_engines_max_model_len(processor, mp4):
    """`qwen2vl generate` prepares its rows as `chat` does: within the engine's max_model_len."""
    from types import SimpleNamespace

    from qwen2vl.batch_job import answer_rows

    seen = []

    def complete(prompts, params):
        seen.extend(prompts)
        return [SimpleNamespace(text="", finish_reason="stop",
                                usage=SimpleNamespace(prompt_tokens=len(p), completion_tokens=0)) for p in prompts]

    llm = SimpleNamespace(processor=processor, engine=SimpleNamespace(max_model_len=600), complete=complete)
    [row] = answer_rows(llm, [{"id": 1, "messages": one(video(mp4), video(mp4))}])
    assert "error" not in row and [item.grid_thw for item in seen[0].vision_items] == [(2, 20, 28)] * 2
