"""Our Processor on a Qwen3-VL checkpoint against the model card's pipeline: qwen_vl_utils 0.0.14
(`image_patch_size=16`, `return_video_metadata=True`) feeding transformers 5.17's Qwen3VLProcessor
with the videos' metadata and `do_resize=False`: pixels, grids and tokens; positions by
Qwen3VLModel.get_rope_index.

Where 5.17 deviates from Qwen's own processor (transformers 4.57, vLLM) we follow Qwen's, and the
tests here say so with values worked out by hand:

- 5.17 replaces only a video's `<|video_pad|>` with its `<t seconds><|vision_start|>...<|vision_end|>`
  groups and keeps the template's own `<|vision_start|>`/`<|vision_end|>` around them; Qwen's
  replaces all three tokens. Our ids are 5.17's without that outer pair, except where text
  comes right before a video ("Watch:<0.2 seconds>" tokenizes ":<" together in Qwen's).
- 5.17 takes timestamps from the video's metadata only (24 fps without it; the `fps` kwarg is
  not read); qwen_vl_utils' metadata gives the same timestamps as ours.
- The HF processors' own minimum sizes (65536 pixels an image, 4096 a whole video) are not
  qwen_vl_utils' (4 tokens an image, 128 tokens a video frame): the card resizes with
  qwen_vl_utils alone (`do_resize=False`), and so do we.

The checkpoint's processor files are Qwen3-VL-2B-Instruct's published preprocessor_config.json and
video_preprocessor_config.json. This branch builds the processor settings directly
(`ProcessorSettings(video_timestamps=True)`); `VisionConfig.video_timestamps` is what sets them
from a Qwen3-VL config.json.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qwen_vl_utils")

from processor_reference import install_pyav_read_video, reference_processor, write_checkpoint_files, write_mp4  # noqa: E402
from test_processor_parity import noise_image, text, user  # noqa: E402

from qwen2vl.config import ProcessorSettings, VisionConfig  # noqa: E402
from qwen2vl.errors import InputError, MediaError  # noqa: E402
from qwen2vl.processor import Processor  # noqa: E402
from qwen2vl.processor.processor import NO_SECOND_RESIZE  # noqa: E402
from qwen2vl.processor.budget import MediaBudget  # noqa: E402
from qwen2vl.processor.types import MediaOptions  # noqa: E402
from qwen2vl.processor.video import group_timestamps  # noqa: E402

ATOL = 1e-5
MERGE = 2
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653
# Qwen3-VL-2B-Instruct's processor files, as published
PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                "image_processor_type": "Qwen2VLImageProcessorFast"}
VIDEO_PREPROCESSOR = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                      "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                      "video_processor_type": "Qwen3VLVideoProcessor"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    install_pyav_read_video()
    directory = write_checkpoint_files(tmp_path_factory.mktemp("processor-3"))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR))
    return directory


@pytest.fixture(scope="module")
def ours(checkpoint):
    return Processor.from_pretrained(checkpoint, settings=ProcessorSettings(video_timestamps=True))


@pytest.fixture(scope="module")
def reference(checkpoint):
    processor = reference_processor(checkpoint)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    processor.video_processor.cap_pixels_per_frame = False  # 5.17's default, without its warning; unused: do_resize=False
    return processor


def card_inputs(processor, conversations, **kwargs):
    """The card's code: process_vision_info(..., image_patch_size=16, return_video_kwargs=True,
    return_video_metadata=True), then the processor with the metadata, `do_resize=False` and
    `**video_kwargs`. Also the prompts as rendered and each video's metadata."""
    from qwen_vl_utils import process_vision_info

    prompts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images, videos, video_kwargs = process_vision_info(conversations, image_patch_size=16, return_video_kwargs=True,
                                                       return_video_metadata=True)
    metadata = []
    if videos:
        videos, metadata = map(list, zip(*videos))
        video_kwargs["video_metadata"] = [dict(m) for m in metadata]
    kwargs = {"do_resize": False, **video_kwargs, **kwargs}
    inputs = processor(text=prompts, images=images, videos=videos, padding=True, return_tensors="pt", **kwargs)
    return inputs, prompts, metadata


def qwen_rule_ids(processor, prompt, inputs, metadata):
    """What Qwen's processor (transformers 4.57; vLLM alike) makes of `prompt`: each video's whole
    `<|vision_start|><|video_pad|><|vision_end|>` replaced by its timestamped frame groups."""
    merge_length = MERGE * MERGE
    for grid, meta in zip(inputs.get("video_grid_thw", torch.empty(0, 3)).tolist(), metadata):
        seconds = processor._calculate_timestamps(meta["frames_indices"], meta["fps"], 2)
        groups = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|placeholder|>" * (grid[1] * grid[2] // merge_length)
                         + "<|vision_end|>" for s in seconds[:grid[0]])
        prompt = prompt.replace("<|vision_start|><|video_pad|><|vision_end|>", groups, 1)
    for grid in inputs.get("image_grid_thw", torch.empty(0, 3)).tolist():
        prompt = prompt.replace("<|image_pad|>", "<|image_placeholder|>" * (grid[0] * grid[1] * grid[2] // merge_length), 1)
    prompt = prompt.replace("<|placeholder|>", "<|video_pad|>").replace("<|image_placeholder|>", "<|image_pad|>")
    return processor.tokenizer(prompt)["input_ids"]


def reference_rope(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask):
    """transformers 5.17's Qwen3VLModel.get_rope_index, without building a model."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=MERGE)))
    model.get_vision_position_ids = Qwen3VLModel.get_vision_position_ids.__get__(model)
    video_grid_thw = None if video_grid_thw is None else video_grid_thw.clone()  # it writes into it
    return Qwen3VLModel.get_rope_index(model, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                       attention_mask)


def without_outer_markup(ids: list[int]) -> list[int]:
    """5.17's ids of one prompt less the template's `<|vision_start|>`/`<|vision_end|>` it keeps
    around each video: the start right before a video's first timestamp, the end right after its
    last frame group."""
    out, i = [], 0
    while i < len(ids):
        # <|vision_start|> followed by text (the timestamp), then <|vision_start|><|video_pad|>
        if ids[i] == VISION_START and ids[i + 1] not in (VISION_START, IMAGE_PAD, VIDEO_PAD):
            j = i + 1
            while ids[j] != VISION_START:
                j += 1
            if ids[j + 1] == VIDEO_PAD:
                out.extend(ids[i + 1:j])
                i = j
                # copy the frame groups; drop the one extra <|vision_end|> after the last
                while True:
                    end = ids.index(VISION_END, i)
                    out.extend(ids[i:end + 1])
                    i = end + 1
                    if ids[i] == VISION_END:
                        i += 1
                        break
                    while ids[i] != VISION_START:  # the next timestamp
                        out.append(ids[i])
                        i += 1
                continue
        out.append(ids[i])
        i += 1
    return out


def assert_parity(ours, reference, conversations, **kwargs):
    """Pixels, grids and token types equal the card pipeline's; ids equal Qwen's rule on the same
    prompt (and 5.17's less its outer markup); positions equal get_rope_index on our ids."""
    expected, prompts, metadata = card_inputs(reference, conversations, **kwargs)
    got = ours(conversations)
    assert list(got) == list(expected) + ["position_ids", "rope_deltas"]
    for key in ("image_grid_thw", "video_grid_thw"):
        assert (key in got) == (key in expected), key
        if key in expected:
            assert torch.equal(got[key], expected[key]), key
    for key in ("pixel_values", "pixel_values_videos"):
        if key in expected:
            assert got[key].shape == expected[key].shape and (got[key] - expected[key]).abs().max() <= ATOL, key
    mask = got["attention_mask"].bool()
    offset = 0
    for row, prompt in enumerate(prompts):
        videos = sum(1 for m in conversations[row] for p in m["content"] if p.get("type") == "video")
        row_inputs = {"video_grid_thw": expected["video_grid_thw"][offset:offset + videos]} if videos else {}
        if "image_grid_thw" in expected:
            images = sum(1 for m in conversations[row] for p in m["content"] if p.get("type") == "image")
            first = sum(1 for c in conversations[:row] for m in c for p in m["content"] if p.get("type") == "image")
            row_inputs["image_grid_thw"] = expected["image_grid_thw"][first:first + images]
        ids = got["input_ids"][row][mask[row]].tolist()
        assert ids == qwen_rule_ids(reference, prompt, row_inputs, metadata[offset:offset + videos])
        reference_ids = expected["input_ids"][row][expected["attention_mask"][row].bool()].tolist()
        if not re.search(r"[^\n>]<\|vision_start\|><\|video_pad\|>", prompt):  # see test_text_right_before_a_video
            assert ids == without_outer_markup(reference_ids)
            assert len(reference_ids) - len(ids) == 2 * videos
        offset += videos
    expected_types = (got["input_ids"] == IMAGE_PAD).long() + 2 * (got["input_ids"] == VIDEO_PAD).long()
    assert torch.equal(got["mm_token_type_ids"], expected_types * got["attention_mask"])
    positions, deltas = reference_rope(got["input_ids"], got["mm_token_type_ids"], got.get("image_grid_thw"),
                                       got.get("video_grid_thw"), got["attention_mask"])
    assert torch.equal(got["position_ids"], positions) and torch.equal(got["rope_deltas"], deltas)
    return got, expected


def frames(count, width=84, height=56):
    return [noise_image(width, height, seed=i) for i in range(count)]


def test_video_timestamps_setting(ours, checkpoint):
    """Off unless the config says so; with it on, preprocessor_config.json's min/max pixels resize
    nothing (the card passes do_resize=False), while a processor's own min/max pixels still do."""
    assert VisionConfig().video_timestamps is False
    assert ProcessorSettings().video_timestamps is False
    assert (ours.min_pixels, ours.max_pixels) == NO_SECOND_RESIZE
    bounded = Processor.from_pretrained(checkpoint, max_pixels=32 * 32 * 4, settings=ProcessorSettings(video_timestamps=True))
    assert (bounded.min_pixels, bounded.max_pixels) == (0, 32 * 32 * 4)
    image = {"type": "image", "image": noise_image(200, 100)}
    assert bounded([[user(image, text("?"))]])["image_grid_thw"].tolist() == [[1, 2, 4]]  # 32x64
    assert ours([[user(image, text("?"))]])["image_grid_thw"].tolist() == [[1, 6, 12]]  # 96x192


def test_group_timestamps_by_hand(reference):
    """Indices 0, 3, 6, 9, 12 at 10 fps, pairs (the last padded with itself): (0 + 0.3)/2, (0.6 + 0.9)/2, 1.2."""
    assert group_timestamps([0, 3, 6, 9, 12], 10.0, 2) == pytest.approx([0.15, 0.75, 1.2])
    for indices, fps in (([0, 3, 6, 9, 12], 10.0), ([0, 10, 19, 29], 10.0), (list(range(6)), 2.0), ([0, 7, 15], 29.97)):
        assert group_timestamps(indices, fps, 2) == reference._calculate_timestamps(list(indices), fps, 2)


def test_frame_list_prompt_by_hand(ours):
    """Four frames at qwen_vl_utils' default `sample_fps` of 2: indices 0..3, so the two temporal
    patches sit at (0 + 0.5)/2 = 0.25 s and (1 + 1.5)/2 = 1.25 s, printed with one decimal as
    Qwen's processor prints them ("0.2", "1.2": round half to even); each temporal patch is its own
    `<|vision_start|>...<|vision_end|>`, and the template's own pair around the video is gone."""
    prompt = ours.prepare([user({"type": "video", "video": frames(4)}, text("What?"))])
    assert "user\n<0.2 seconds><|vision_start|><|video_pad|><|vision_end|><1.2 seconds><|vision_start|>" \
           "<|video_pad|><|vision_end|>What?<|im_end|>" in prompt.text
    assert prompt.vision_items[0].timestamps == (0.25, 1.25)
    t, h, w = prompt.vision_items[0].grid_thw
    assert t == 2
    ids = prompt.input_ids
    pads = [i for i, token in enumerate(ids) if token == VIDEO_PAD]
    per_frame = h * w // 4
    assert len(pads) == 2 * per_frame
    first, second = pads[:per_frame], pads[per_frame:]
    assert first == list(range(first[0], first[0] + per_frame)) and ids[first[0] - 1] == VISION_START
    assert ids[first[-1] + 1] == VISION_END and ids[second[0] - 1] == VISION_START
    # positions: each frame group placed as an image of its own, the timestamp text between them
    positions = prompt.positions
    base = int(positions[0, first[0]])
    assert positions[:, first[0]].tolist() == [base, base, base]
    assert positions[:, first[-1]].tolist() == [base, base + h // 2 - 1, base + w // 2 - 1]
    after_first = base + max(h, w) // 2  # the text after a frame group resumes past its largest position
    gap = second[0] - first[-1] - 1  # <|vision_end|>, "<1.2 seconds>", <|vision_start|>
    assert positions[:, second[0]].tolist() == [after_first + gap] * 3


def test_5_17_wraps_the_video_twice(ours, reference):
    """5.17 on the same frames: `<|vision_start|><0.2 seconds><|vision_start|>` ... `<|vision_end|><|vision_end|>`."""
    conversation = [user({"type": "video", "video": frames(4)}, text("What?"))]
    expected, _, _ = card_inputs(reference, [conversation])
    decoded = reference.tokenizer.decode(expected["input_ids"][0])
    assert "user\n<|vision_start|><0.2 seconds><|vision_start|><|video_pad|>" in decoded
    assert "<|video_pad|><|vision_end|><|vision_end|>What?" in decoded
    got = ours([conversation])
    assert expected["input_ids"].shape[1] == got["input_ids"].shape[1] + 2


def test_text_right_before_a_video(ours, reference):
    """"Watch:" right before a video: Qwen's processor tokenizes the timestamps with the text around
    them, "Watch:<0.2 seconds>" -> "Watch", ":<", "0", ...; 5.17 has its outer `<|vision_start|>`
    between them, so its ":" stays a token of its own."""
    conversation = [user(text("Watch:"), {"type": "video", "video": frames(4)}, text("Describe."))]
    got = ours([conversation])["input_ids"][0].tolist()
    colon_less_than, colon, watch = 31252, 25, reference.tokenizer.convert_tokens_to_ids("Watch")
    at = got.index(watch)
    assert got[at + 1:at + 3] == [colon_less_than, reference.tokenizer.convert_tokens_to_ids("0")]
    expected, _, _ = card_inputs(reference, [conversation])
    reference_ids = expected["input_ids"][0].tolist()
    at = reference_ids.index(watch)
    assert reference_ids[at + 1:at + 4] == [colon, VISION_START, reference.tokenizer.convert_tokens_to_ids("<")]


def test_5_17_reads_metadata_not_fps(reference):
    """Without metadata 5.17 times frames at 24 fps whatever `fps` says: four frames 0..3 are at
    (0 + 1/24)/2 = 0.02 s and (2/24 + 3/24)/2 = 0.10 s ("<0.0 seconds>", "<0.1 seconds>"), not
    qwen_vl_utils' 0.25 s and 1.25 s; with qwen_vl_utils' metadata it agrees with us."""
    from qwen_vl_utils import process_vision_info

    conversation = [user({"type": "video", "video": frames(4)}, text("What?"))]
    prompt = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    _, videos, _ = process_vision_info([conversation], image_patch_size=16, return_video_kwargs=True,
                                       return_video_metadata=True)
    video = videos[0][0]
    bare = reference(text=[prompt], videos=[video], do_resize=False, do_sample_frames=False, fps=2.0, return_tensors="pt")
    decoded = reference.tokenizer.decode(bare["input_ids"][0])
    assert "<0.0 seconds>" in decoded and "<0.1 seconds>" in decoded and "<0.2 seconds>" not in decoded


@pytest.mark.parametrize("options", [
    {},
    {"sample_fps": 1.0},
    {"sample_fps": 1.0, "raw_fps": 3.0},
    {"min_pixels": 64 * 32 * 32, "max_pixels": 256 * 32 * 32},
    {"resized_height": 100, "resized_width": 130},
    {"max_pixels": 128 * 32 * 32},
])
def test_frame_list_matches_the_card(ours, reference, options):
    video = {"type": "video", "video": frames(5), **options}
    assert_parity(ours, reference, [[user(video, text("What happens?"))]])


@pytest.mark.parametrize("options", [{"fps": 1.0}, {"fps": 4.0}, {"nframes": 6}, {"nframes": 4, "max_pixels": 160 * 32 * 32},
                                     {"fps": 2.0, "min_frames": 6, "max_frames": 8}, {"nframes": 4, "total_pixels": 600 * 32 * 32}])
def test_video_file_matches_the_card(ours, reference, tmp_path, options):
    path = write_mp4(tmp_path / "clip.mp4", [noise_image(112, 84, seed=i) for i in range(30)], fps=10)
    got, _ = assert_parity(ours, reference, [[user({"type": "video", "video": f"file://{path}", **options},
                                                    text("What happens?"))]])
    assert len(got["video_grid_thw"]) == 1


def test_video_file_timestamps_by_hand(ours, tmp_path):
    """30 frames at 10 fps, fps=1: 4 frames (the least), indices 0, 10, 19, 29 (linspace, rounded):
    (0 + 1.0)/2 = 0.5 s and (1.9 + 2.9)/2 = 2.4 s."""
    path = write_mp4(tmp_path / "clip.mp4", [noise_image(112, 84, seed=i) for i in range(30)], fps=10)
    prompt = ours.prepare([user({"type": "video", "video": str(path), "fps": 1.0}, text("?"))])
    assert prompt.vision_items[0].timestamps == pytest.approx((0.5, 2.4))
    assert "<0.5 seconds><|vision_start|>" in prompt.text and "<2.4 seconds><|vision_start|>" in prompt.text


@pytest.mark.parametrize("image_options", [{}, {"min_pixels": 32 * 32 * 8, "max_pixels": 32 * 32 * 20},
                                           {"resized_height": 70, "resized_width": 90}])
def test_image_and_video_in_one_prompt(ours, reference, tmp_path, image_options):
    path = write_mp4(tmp_path / "clip.mp4", [noise_image(96, 64, seed=i) for i in range(20)], fps=8)
    conversation = [user({"type": "image", "image": noise_image(91, 57), **image_options},
                         {"type": "video", "video": f"file://{path}", "nframes": 4},
                         text("and"), {"type": "video", "video": frames(3)}, text("Compare.")),
                    {"role": "assistant", "content": [text("Sure.")]},
                    user({"type": "image", "image": noise_image(224, 160, seed=1)}, text("And this?"))]
    assert_parity(ours, reference, [conversation])


def test_mixed_batch(ours, reference):
    conversations = [[user(text("Watch:"), {"type": "video", "video": frames(4)}, text("Describe."))],
                     [user({"type": "image", "image": noise_image(64, 64)}, text("What is it?"))],
                     [user(text("Just text."))]]
    assert_parity(ours, reference, conversations)
    left = ours(conversations, padding_side="left")
    positions, deltas = reference_rope(left["input_ids"], left["mm_token_type_ids"], left.get("image_grid_thw"),
                                       left.get("video_grid_thw"), left["attention_mask"])
    assert torch.equal(left["position_ids"], positions) and torch.equal(left["rope_deltas"], deltas)


def test_small_image_follows_qwen_vl_utils(ours, reference):
    """A 40x40 image: qwen_vl_utils makes it 64x64 (its minimum, 4 tokens of 32x32; grid 1x4x4),
    the size the card gives the model; transformers' image processor on its own (`do_resize`)
    raises it to its `shortest_edge` of 65536 pixels, 256x256 (grid 1x16x16)."""
    conversation = [user({"type": "image", "image": noise_image(40, 40)}, text("?"))]
    got, _ = assert_parity(ours, reference, [conversation])
    assert got["image_grid_thw"].tolist() == [[1, 4, 4]]
    resized, _, _ = card_inputs(reference, [conversation], do_resize=True)
    assert resized["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_small_video_follows_qwen_vl_utils(ours, reference):
    """Four 64x96 frames: qwen_vl_utils makes each frame at least 128 tokens of 32x32 (320x448,
    140 tokens), while transformers' video processor on its own bounds the whole video below by
    4096 pixels and keeps 64x96 (6 tokens a frame)."""
    video = [noise_image(96, 64, seed=i) for i in range(4)]
    got = ours([[user({"type": "video", "video": video}, text("?"))]])
    # first resize, as images (factor 64, at least 4 x 64 x 64): 64x96 -> 128x192;
    # then as frames (factor 32, at least 128 x 32 x 32 = 131072): beta = sqrt(131072 / 24576),
    # ceil(128 * 2.309 / 32) * 32 = 320, ceil(192 * 2.309 / 32) * 32 = 448
    assert got["video_grid_thw"].tolist() == [[2, 20, 28]]
    raw = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in video])
    alone = reference.video_processor(videos=[raw], do_sample_frames=False, return_tensors="pt")
    assert alone["video_grid_thw"].tolist() == [[2, 4, 6]]


def test_video_budget_is_enforced(ours):
    """The budget bounds a Qwen3-VL video as any other: frames held, and visual tokens per item."""
    video = {"type": "video", "video": frames(8)}
    small = ours.with_media(ours.media_policy, MediaBudget(max_video_pixels=8 * 128 * 192 - 1))
    with pytest.raises(MediaError, match="per video"):
        small.prepare([user(video, text("?"))])
    few_tokens = ours.with_media(ours.media_policy, MediaBudget(max_item_tokens=100))
    with pytest.raises(MediaError, match="visual tokens"):
        few_tokens.prepare([user(video, text("?"))])


def test_timestamps_count_against_the_context(checkpoint):
    """The timestamps' text is part of the prompt's length."""
    processor = Processor.from_pretrained(checkpoint, settings=ProcessorSettings(context_len=4096, video_timestamps=True))
    video = {"type": "video", "video": frames(4), "resized_height": 64, "resized_width": 64}
    prompt = processor.prepare([user(video, text("?"))])
    with pytest.raises(InputError, match="over the limit"):
        processor.prepare([user(video, text("?"))], context_len=len(prompt))
    assert len(processor.prepare([user(video, text("?"))], context_len=len(prompt) + 1)) == len(prompt)


def test_frame_count_follows_qwen_vl_utils(reference):
    """50 frames at 10 fps sampled at 1.4 fps: qwen_vl_utils takes 7 frames down to an even 6
    (indices 0, 10, 20, 29, 39, 49); transformers' video processor, sampling on its own, takes
    int(7.0) = 7 and pads the last temporal patch with a copy of the last frame. The card samples
    with qwen_vl_utils (`do_sample_frames=False` to the processor); so do we."""
    from transformers.video_utils import VideoMetadata

    from qwen2vl.processor.types import MediaOptions
    from qwen2vl.processor.video import sample_frame_count, sample_indices

    count = sample_frame_count(MediaOptions(fps=1.4), 50, 10.0)
    assert count == 6 and sample_indices(50, count) == [0, 10, 20, 29, 39, 49]
    metadata = VideoMetadata(total_num_frames=50, fps=10.0, width=64, height=64)
    assert len(reference.video_processor.sample_frames(metadata, fps=1.4)) == 7


def test_settings_from_a_qwen3_vl_config(checkpoint, tmp_path):
    """A Qwen3-VL config.json turns the timestamps on and the second resize off."""
    from qwen2vl.config import VISION_CONFIGS

    if "qwen3_vl" not in VISION_CONFIGS:
        pytest.skip("no Qwen3-VL config class here")
    for path in checkpoint.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {},
                                                      "text_config": {"max_position_embeddings": 262144}}))
    assert ProcessorSettings.from_pretrained(tmp_path).video_timestamps is True
    processor = Processor.from_pretrained(tmp_path)
    assert processor.video_timestamps and (processor.min_pixels, processor.max_pixels) == (0, 1 << 62)
    assert Processor.from_pretrained(tmp_path, min_pixels=65536).min_pixels == 65536


def test_the_resize_bound_is_16384_tokens_at_the_32_pixel_factor(ours):
    """Qwen3-VL's default image max_pixels (qwen_vl_utils: 16384 tokens of 32x32 pixels) is within its
    budget; the bound scales with the factor instead of staying Qwen2-VL's 12,845,056."""
    bound = 16384 * 32 * 32
    assert ours.budget.max_resized_pixels == bound
    ours.budget.check_options(MediaOptions(min_pixels=bound), "image")
    with pytest.raises(InputError, match=f"over the limit of {bound} pixels per image"):
        ours.budget.check_options(MediaOptions(min_pixels=bound + 1), "image")
    looser = ours.with_media(ours.media_policy, MediaBudget(max_resized_pixels=10**9))
    assert looser.budget.max_resized_pixels == bound
