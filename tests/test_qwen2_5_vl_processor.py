"""Our Processor on a Qwen2.5-VL checkpoint against qwen_vl_utils 0.0.14 + transformers'
Qwen2_5_VLProcessor: tokens, pixels, grids and `second_per_grid_ts`; positions by Qwen2.5-VL's
time-aligned M-RoPE rule.

transformers 5.17 refuses the card's `fps=[...]` video kwarg (its `fps` must be one number); the
sampled rate reaches it as qwen_vl_utils' video metadata instead, which gives the same
`second_per_grid_ts` (temporal_patch_size / sampled fps)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qwen_vl_utils")

from processor_reference import install_pyav_read_video, reference_processor, write_checkpoint_files, write_mp4  # noqa: E402
from test_processor_parity import noise_image, text, user  # noqa: E402

from qwen2vl.processor import Processor  # noqa: E402
from qwen2vl.tools.random_checkpoint import PROCESSOR_CLASSES  # noqa: E402

ATOL = 1e-5
TOKENS_PER_SECOND = 2
MERGE = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    install_pyav_read_video()
    directory = write_checkpoint_files(tmp_path_factory.mktemp("processor-2_5"))
    preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
    preprocessor["processor_class"] = PROCESSOR_CLASSES["qwen2_5_vl"]
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 151936, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {"hidden_size": 32, "num_heads": 2, "depth": 1, "out_hidden_size": 64,
                          "tokens_per_second": TOKENS_PER_SECOND}}))
    return directory


@pytest.fixture(scope="module")
def ours(checkpoint):
    return Processor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    processor = reference_processor(checkpoint)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    return processor


def reference_inputs(processor, conversation):
    """process_vision_info(..., return_video_kwargs=True, return_video_metadata=True), then the
    processor with the videos' metadata and `**video_kwargs`."""
    from qwen_vl_utils import process_vision_info

    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info([conversation], return_video_kwargs=True,
                                                       return_video_metadata=True)
    if videos:
        videos, metadata = map(list, zip(*videos))
        video_kwargs["video_metadata"] = metadata
    return processor(text=[prompt], images=images, videos=videos, padding=True, return_tensors="pt", **video_kwargs)


def reference_rope(inputs):
    """transformers 5.17's Qwen2.5-VL get_rope_index, without building a model."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    vision = SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=TOKENS_PER_SECOND)
    model = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    model.get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids.__get__(model)
    return Qwen2_5_VLModel.get_rope_index(
        model, inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts"), inputs["attention_mask"])


def assert_parity(ours, reference, conversation):
    expected = reference_inputs(reference, conversation)
    got = ours([conversation])
    assert list(got) == list(expected) + ["position_ids", "rope_deltas"]
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        if key in expected:
            assert torch.equal(got[key], expected[key]), key
    for key in ("pixel_values", "pixel_values_videos"):
        if key in expected:
            assert got[key].shape == expected[key].shape and (got[key] - expected[key]).abs().max() <= ATOL, key
    if "second_per_grid_ts" in expected:
        torch.testing.assert_close(got["second_per_grid_ts"], torch.as_tensor(expected["second_per_grid_ts"]),
                                   rtol=1e-6, atol=0, check_dtype=False)
    return got, expected


def video_spans(got):
    """(first pad index, grid) of each video of the one prompt in `got`, in order."""
    ids = got["input_ids"][0]
    pads = torch.nonzero(ids == 151656).flatten().tolist()
    spans, i = [], 0
    for grid in got["video_grid_thw"].tolist():
        t, h, w = grid[0], grid[1] // MERGE, grid[2] // MERGE
        spans.append((pads[i], (t, h, w)))
        i += t * h * w
    return spans


def assert_time_aligned(got):
    """Each video's temporal positions: floor(i x second_per_grid_t x tokens_per_second) past the span start."""
    positions = got["position_ids"][:, 0]
    for (start, (t, h, w)), seconds in zip(video_spans(got), got["second_per_grid_ts"].tolist()):
        temporal = positions[0, start:start + t * h * w].view(t, h * w)
        base = positions[1, start]
        expected = torch.tensor([int(i * seconds * TOKENS_PER_SECOND) for i in range(t)]) + base
        assert torch.equal(temporal, expected[:, None].expand(t, h * w))
        span_max = positions[:, start:start + t * h * w].max()
        assert positions[0, start + t * h * w] == span_max + 1  # the text after resumes past the span


def test_images_match_the_reference_and_its_positions(ours, reference):
    conversation = [user({"type": "image", "image": noise_image(91, 57)}, text("and"),
                         {"type": "image", "image": noise_image(224, 160, seed=1)}, text("Compare."))]
    got, expected = assert_parity(ours, reference, conversation)
    assert "second_per_grid_ts" not in got
    positions, deltas = reference_rope(expected)
    assert torch.equal(got["position_ids"], positions) and torch.equal(got["rope_deltas"], deltas)


@pytest.mark.parametrize("fps, seconds", [(None, 1.0), (1.0, 2.0), (4.0, 0.5)])
def test_frame_list_second_per_grid_ts(ours, reference, fps, seconds):
    """qwen_vl_utils reports `sample_fps` (default 2) for a frame list, whatever `fps` says."""
    frames = [noise_image(84, 56, seed=i) for i in range(5)]
    video = {"type": "video", "video": frames}
    if fps is not None:
        video["fps"] = video["sample_fps"] = fps
    got, expected = assert_parity(ours, reference, [user(video, text("What happens?"))])
    assert got["second_per_grid_ts"].tolist() == [seconds]
    assert_time_aligned(got)


def test_video_file_and_image(ours, reference, tmp_path):
    path = write_mp4(tmp_path / "clip.mp4", [noise_image(112, 84, seed=i) for i in range(30)], fps=10)
    conversation = [user({"type": "image", "image": noise_image(56, 56)},
                         {"type": "video", "video": f"file://{path}", "fps": 1.0}, text("Both?"))]
    got, expected = assert_parity(ours, reference, conversation)
    assert got["second_per_grid_ts"].tolist() == pytest.approx([1.5])  # 4 frames (the least) over 3 s
    assert_time_aligned(got)
    prepared = ours.prepare(conversation)
    assert torch.equal(prepared.positions, got["position_ids"][:, 0])


def test_qwen2_vl_checkpoint_positions_are_not_time_aligned(checkpoint, tmp_path):
    """Without a config.json (or with Qwen2-VL's) video positions advance by one per temporal patch."""
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "chat_template.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    processor = Processor.from_pretrained(tmp_path)
    assert processor.tokens_per_second is None
    frames = [noise_image(84, 56, seed=i) for i in range(4)]
    got = processor([user({"type": "video", "video": frames, "fps": 4.0, "sample_fps": 4.0})])
    assert "second_per_grid_ts" not in got
    (start, (t, h, w)), = video_spans(got)
    assert got["position_ids"][0, 0, start + h * w] == got["position_ids"][0, 0, start] + 1
