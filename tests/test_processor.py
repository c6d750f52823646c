"""Processor API: what the engine consumes (prepare), counting, batching, checkpoint fallbacks."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from processor_reference import real_tokenizer_dir, write_checkpoint_files, write_mp4
from prompt_tokens import count_tokens

import qwen2vl.processor.processor as processor_module
from qwen2vl import Processor as TopLevelProcessor
from qwen2vl.processor import Processor, smart_resize


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_checkpoint_files(tmp_path_factory.mktemp("api-ckpt")))


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    pytest.importorskip("av")
    path = tmp_path_factory.mktemp("api-video") / "v.mp4"
    return write_mp4(path, [picture(128, 96, i) for i in range(16)], fps=8)


def mixed(mp4):
    return [
        {"role": "user", "content": [
            {"type": "image", "image": picture(100, 60)},
            {"type": "video", "video": str(mp4)},
            {"type": "text", "text": "and"},
            {"type": "video", "video": [picture(90, 90, 1), picture(90, 90, 2), picture(90, 90, 3)], "sample_fps": 1.5},
            {"type": "image", "image": picture(30, 200, 4)},
        ]}
    ]


def test_exports_and_attributes(processor):
    assert TopLevelProcessor is Processor
    assert (processor.image_token_id, processor.video_token_id) == (151655, 151656)
    assert (processor.vision_start_token_id, processor.vision_end_token_id) == (151652, 151653)
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert (processor.min_pixels, processor.max_pixels) == (3136, 12845056)


def test_prepare_layout(processor, mp4):
    prompt = processor.prepare(mixed(mp4))
    assert [item.kind for item in prompt.vision_items] == ["image", "video", "video", "image"]
    assert isinstance(prompt.input_ids, list) and prompt.positions.shape == (3, len(prompt.input_ids))
    assert prompt.positions.dtype == torch.long
    for item in prompt.vision_items:
        t, h, w = item.grid_thw
        assert item.pixel_values.shape == (t * h * w, 1176) and item.pixel_values.dtype == torch.float32
        assert item.resized_size == (w * 14, h * 14)
    image, video_file, frame_list, _ = prompt.vision_items
    assert image.original_size == (100, 60) and image.fps is None
    assert video_file.original_size == (128, 96) and video_file.fps == pytest.approx(2.0) and video_file.grid_thw[0] == 2
    assert frame_list.fps == 1.5 and frame_list.grid_thw[0] == 2
    # each item's pads are one run, in prompt order, of the item's token count
    pads = [i for i in prompt.input_ids if i in (151655, 151656)]
    expected = [i for item in prompt.vision_items for i in [151655 if item.kind == "image" else 151656] * item.num_tokens(2)]
    assert pads == expected
    assert int(prompt.positions.max()) + 1 == len(prompt) + prompt.rope_delta


def test_count_tokens_reads_no_pixels(processor, mp4, monkeypatch):
    messages = mixed(mp4)
    expected = len(processor.prepare(messages))

    def no_decoding(*args, **kwargs):
        raise AssertionError("count_tokens decoded pixels")

    monkeypatch.setattr(processor_module, "to_rgb", no_decoding)
    monkeypatch.setattr(processor_module, "load_frame_list", no_decoding)
    monkeypatch.setattr(processor_module, "load_video_file", no_decoding)
    assert count_tokens(processor, messages) == expected


def test_batch_padding_sides(processor):
    long = [{"role": "user", "content": [{"type": "image", "image": picture(56, 56)}, {"type": "text", "text": "hi"}]}]
    short = [{"role": "user", "content": "hi"}]
    right = processor([long, short])
    left = processor([long, short], padding_side="left")
    n = int(right["attention_mask"][1].sum())
    assert right["input_ids"].shape == left["input_ids"].shape == (2, len(processor.prepare(long)))
    assert torch.equal(right["input_ids"][1, :n], left["input_ids"][1, -n:])
    assert (right["input_ids"][1, n:] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(right["position_ids"][:, 1, :n], left["position_ids"][:, 1, -n:])
    assert (left["position_ids"][:, 1, :-n] == 0).all() and (left["attention_mask"][1, :-n] == 0).all()
    assert right["position_ids"].shape == (3, 2, right["input_ids"].shape[1])
    assert right["rope_deltas"].shape == (2, 1) and right["rope_deltas"][1, 0] == 0
    single = processor(long)
    assert single["input_ids"].shape[0] == 1 and "pixel_values_videos" not in single


def test_raw_base64_and_data_uri_agree(processor):
    buffer = io.BytesIO()
    picture(70, 50).save(buffer, format="PNG")
    raw = base64.b64encode(buffer.getvalue()).decode()
    via = {}
    for name, value in (("raw", raw), ("uri", "data:image/png;base64," + raw), ("pil", picture(70, 50))):
        via[name] = processor.prepare([{"role": "user", "content": [{"type": "image", "image": value}]}]).vision_items[0]
    assert torch.equal(via["raw"].pixel_values, via["uri"].pixel_values)
    assert torch.equal(via["raw"].pixel_values, via["pil"].pixel_values)


def test_openai_style_image_url(processor):
    buffer = io.BytesIO()
    picture(70, 50).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    part = {"type": "image_url", "image_url": {"url": uri}}
    prompt = processor.prepare([{"role": "user", "content": [part]}])
    assert prompt.vision_items[0].original_size == (70, 50)


def test_bare_checkpoint_falls_back_to_builtin_files(tmp_path, processor):
    shutil.copy(real_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = Processor.from_pretrained(tmp_path, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(500, 400)}, {"type": "text", "text": "x"}]}]
    assert bare.prepare(messages).text == processor.prepare(messages).text
    assert bare.tokenizer.eos_token_id is None
    assert bare.prepare(messages).vision_items[0].num_tokens(2) <= 64


def test_tokenizer_config_template_is_used(tmp_path):
    write_checkpoint_files(tmp_path)
    (tmp_path / "chat_template.json").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    custom = Processor.from_pretrained(tmp_path)
    assert custom.prepare([{"role": "user", "content": "hi"}]).text == "[user]hi"


def test_smart_resize_reference_rounding():
    assert smart_resize(91, 57) == (84, 56)
    assert smart_resize(3000, 4000) == (2996, 4004)
    assert smart_resize(10, 10) == (56, 56)
    assert smart_resize(28 * 1000, 28 * 1000, max_pixels=1280 * 28 * 28) == (980, 980)
