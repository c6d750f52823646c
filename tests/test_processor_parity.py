"""Our Processor against the model card's pipeline (qwen_vl_utils + transformers' Qwen2VLProcessor)."""
from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("qwen_vl_utils")

from processor_reference import install_pyav_read_video, reference_inputs, reference_processor, write_checkpoint_files, write_mp4  # noqa: E402
from prompt_tokens import count_tokens  # noqa: E402

from qwen2vl.errors import MediaError  # noqa: E402
from qwen2vl.processor import Processor  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    install_pyav_read_video()
    return write_checkpoint_files(tmp_path_factory.mktemp("processor-ckpt"))


@pytest.fixture(scope="module")
def ours(checkpoint):
    return Processor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return reference_processor(checkpoint)


def noise_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).quantize(64)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    # smooth-ish content so resizing filters matter, plus noise so every pixel is distinct
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 7 + yy * 3 + 40 * c) % 256 for c in range(channels)], axis=-1)
    pixels = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


def image(value, **options):
    return {"type": "image", "image": value, **options}


def reference_rope(inputs):
    """transformers 5.17's get_rope_index, without building a model."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)))
    model.get_vision_position_ids = Qwen2VLModel.get_vision_position_ids.__get__(model)
    return Qwen2VLModel.get_rope_index(
        model,
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs["attention_mask"],
    )


def assert_parity(ours, reference, conversations, *, rope=True, **kwargs):
    texts, expected, _ = reference_inputs(reference, conversations, **kwargs)
    got = ours(conversations, **kwargs)
    assert list(got) == list(expected) + ["position_ids", "rope_deltas"]
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert torch.equal(got["mm_token_type_ids"], expected["mm_token_type_ids"])
    for grid in ("image_grid_thw", "video_grid_thw"):
        if grid in expected:
            assert torch.equal(got[grid], expected[grid]), grid
    for pixels in ("pixel_values", "pixel_values_videos"):
        if pixels in expected:
            assert got[pixels].dtype == torch.float32 and got[pixels].shape == expected[pixels].shape, pixels
            assert (got[pixels] - expected[pixels]).abs().max().item() <= ATOL, pixels
    if rope:
        positions, deltas = reference_rope(expected)
        assert torch.equal(got["position_ids"], positions)
        assert torch.equal(got["rope_deltas"], deltas)
    single = conversations if isinstance(conversations[0], list) else [conversations]
    for conversation, rendered in zip(single, texts):
        assert ours.prepare(conversation, **kwargs).text == rendered
        assert count_tokens(ours, conversation, **kwargs) == len(ours.prepare(conversation, **kwargs))
    return got


def test_text_only(ours, reference):
    assert_parity(ours, reference, [{"role": "user", "content": "Who are you? 你好, ça va?"}], rope=False)


@pytest.mark.parametrize("size", [(57, 91), (3000, 50), (50, 3000), (20, 20), (224, 224), (600, 17)])
def test_odd_sizes(ours, reference, size):
    assert_parity(ours, reference, [user(image(noise_image(*size)), text("Describe."))])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_modes(ours, reference, mode):
    assert_parity(ours, reference, [user(image(noise_image(71, 45, mode)), text("What is this?"))])


def test_rgba_alpha_is_composited_on_white(ours, reference):
    picture = noise_image(64, 64, "RGBA")
    alpha = np.array(picture)
    alpha[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    assert_parity(ours, reference, [user(image(Image.fromarray(alpha, "RGBA")))])


def test_aspect_ratio_over_200_raises_in_both(ours, reference):
    conversation = [user(image(noise_image(1, 1000)), text("thin"))]
    with pytest.raises(ValueError, match="aspect ratio"):
        reference_inputs(reference, conversation)
    with pytest.raises(MediaError, match="aspect ratio") as error:
        ours(conversation)
    assert (error.value.message_index, error.value.content_index) == (0, 0)


def test_large_jpeg_file(ours, reference, tmp_path):
    path = tmp_path / "big.jpg"
    noise_image(4000, 3000).save(path, quality=90)
    got = assert_parity(ours, reference, [user(image(f"file://{path}"), text("Big."))])
    assert got["image_grid_thw"].tolist() == [[1, 214, 286]]


def test_png_path_and_data_uri(ours, reference, tmp_path):
    path = tmp_path / "a.png"
    noise_image(90, 60, "RGBA").save(path)
    buffer = io.BytesIO()
    noise_image(40, 100, seed=3).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert_parity(ours, reference, [user(image(str(path)), image(uri), text("Two."))])


def test_per_item_min_max_pixels(ours, reference):
    assert_parity(
        ours,
        reference,
        [user(image(noise_image(300, 200), min_pixels=50176, max_pixels=50176), image(noise_image(33, 47), min_pixels=100000))],
    )


def test_per_item_below_processor_minimum(ours, reference):
    # qwen_vl_utils gives 28x28; the processor's own min_pixels (56*56) then upsizes it
    assert_parity(ours, reference, [user(image(noise_image(30, 30), min_pixels=784, max_pixels=784))])


def test_resized_height_width(ours, reference):
    assert_parity(ours, reference, [user(image(noise_image(150, 100), resized_height=280, resized_width=420), text("x"))])


def test_several_images_and_vision_ids(ours, reference):
    conversation = [user(image(noise_image(56, 56)), image(noise_image(99, 40, seed=1)), image(noise_image(64, 128, seed=2)), text("Compare."))]
    assert_parity(ours, reference, conversation)
    assert_parity(ours, reference, conversation, add_vision_id=True)


def test_multi_turn_with_system(ours, reference):
    conversation = [
        {"role": "system", "content": "You are terse."},
        user(image(noise_image(80, 60)), text("What is it?")),
        {"role": "assistant", "content": "A pattern."},
        user(text("And this one?"), image(noise_image(60, 80, seed=5))),
    ]
    assert_parity(ours, reference, conversation)
    assert_parity(ours, reference, conversation, add_generation_prompt=False)


def test_frame_list_video(ours, reference):
    frames = [noise_image(200, 150, seed=i) for i in range(5)]  # 5 frames: padded to 6
    video = {"type": "video", "video": frames, "fps": 1.0}
    got = assert_parity(ours, reference, [user(video, text("Describe this video."))])
    assert got["video_grid_thw"][0, 0].item() == 3


def test_image_and_video_with_vision_ids(ours, reference):
    frames = [noise_image(120, 90, seed=i) for i in range(4)]
    conversation = [user(image(noise_image(45, 70)), {"type": "video", "video": frames}, text("Both?"))]
    assert_parity(ours, reference, conversation, add_vision_id=True)


@pytest.fixture(scope="module")
def mp4_path(tmp_path_factory):
    pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    return write_mp4(path, [noise_image(160, 112, seed=i) for i in range(30)], fps=10)  # 3 s at 10 fps


def test_video_file(ours, reference, mp4_path):
    got = assert_parity(ours, reference, [user({"type": "video", "video": str(mp4_path)}, text("What happens?"))])
    item = ours.prepare([user({"type": "video", "video": str(mp4_path)})]).vision_items[0]
    assert item.grid_thw[0] == 3 and item.fps == pytest.approx(2.0)  # 6 frames sampled over 3 s
    assert item.original_size == (160, 112)
    assert got["video_grid_thw"].tolist() == [list(item.grid_thw)]


def test_video_file_card_options(ours, reference, mp4_path):
    video = {"type": "video", "video": f"file://{mp4_path}", "max_pixels": 360 * 420, "fps": 1.0}
    assert_parity(ours, reference, [user(video, text("Describe this video."))])
    video = {"type": "video", "video": str(mp4_path), "nframes": 8, "resized_height": 56, "resized_width": 84}
    assert_parity(ours, reference, [user(video)], rope=False)  # t=4 > h/2: see test_mrope


def test_batch_of_two(ours, reference):
    first = [user(image(noise_image(90, 90)), image(noise_image(50, 120, seed=1)), text("Common elements?"))]
    second = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Who are you?"}]
    got = assert_parity(ours, reference, [first, second])
    assert got["attention_mask"][1].sum() < got["attention_mask"].shape[1]  # the second row is padded


@pytest.fixture(scope="module")
def ours_limited(checkpoint):
    return Processor.from_pretrained(checkpoint, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)


@pytest.fixture(scope="module")
def reference_limited(checkpoint):
    return reference_processor(checkpoint, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)


def test_processor_level_pixel_limits(ours_limited, reference_limited):
    frames = [noise_image(100, 70, seed=i) for i in range(2)]
    conversation = [user(image(noise_image(1500, 1100)), image(noise_image(64, 48, seed=1)), {"type": "video", "video": frames})]
    got = assert_parity(ours_limited, reference_limited, conversation)
    tokens = got["image_grid_thw"].prod(-1) // 4
    assert tokens.max() <= 1280 and tokens.min() >= 256
