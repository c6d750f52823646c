"""`Processor`: chat messages (model card format) to token ids, pixel values, grids and M-RoPE positions.

Matches the model card's pipeline, `qwen_vl_utils.process_vision_info` followed by transformers'
`Qwen2VLProcessor`, token for token and within 1e-5 per pixel value; for Qwen3-VL, the card's
`process_vision_info(..., image_patch_size=16, return_video_metadata=True)` followed by
`Qwen3VLProcessor(..., video_metadata=..., do_resize=False)`, with Qwen's video prompt (see
`Processor._timestamped`).
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from qwen2vl.config import ProcessorSettings
from qwen2vl.errors import CheckpointError, InputError, MediaError
from qwen2vl.layers.patchify import Patchifier
from qwen2vl.processor.budget import MediaBudget, resized_pixels_bound
from qwen2vl.processor.chat import ChatTemplate, MediaPart, media_parts
from qwen2vl.processor.fetch import MediaPolicy, resolve
from qwen2vl.processor.fit import fit_context
from qwen2vl.processor.image import (
    image_target_size,
    open_image,
    resize_frames,
    resize_image,
    resize_image_tensor,
    smart_resize,
    to_rgb,
)
from qwen2vl.processor.mrope import mrope_positions
from qwen2vl.processor.pool import media_map
from qwen2vl.processor.tokenizer import Tokenizer
from qwen2vl.processor.types import (
    FrameListPlan,
    ImagePlan,
    MediaOptions,
    MediaPlan,
    PreparedPrompt,
    VideoFilePlan,
    VisionItem,
)
from qwen2vl.processor.video import (
    FRAME_FACTOR,
    frame_list_sizes,
    group_timestamps,
    load_frame_list,
    load_video_file,
    probe_video,
    sample_frame_count,
    timestamp_text,
    video_target_size,
)

BUILTIN_PREPROCESSOR = Path(__file__).resolve().parent.parent / "assets" / "preprocessor_config.json"
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VISION_START_TOKEN, VISION_END_TOKEN = "<|vision_start|>", "<|vision_end|>"
TOKEN_TYPE = {"text": 0, "image": 1, "video": 2}
# Processor-level bounds that never resize: Qwen3-VL's card hands qwen_vl_utils' sizes to its
# processor with do_resize=False, so its preprocessor_config.json's min/max pixels size nothing.
NO_SECOND_RESIZE = (0, 1 << 62)
VISION_TOKENS = {"image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN,  # config.json's name: the token
                 "vision_start_token_id": VISION_START_TOKEN, "vision_end_token_id": VISION_END_TOKEN}


class Processor:
    """Turns conversations into model inputs.

    Processor-level `min_pixels`/`max_pixels` (preprocessor_config.json, or the arguments of
    `from_pretrained`) bound every image and video frame after its per-item resize, as transformers'
    processor does after qwen_vl_utils; per-item `min_pixels`/`max_pixels`/`resized_height`/
    `resized_width` pick the first resize.

    Every image and video is sized from its header and per-item options and checked against
    `budget` (a `MediaBudget`) before any pixel is decoded or resized; over a limit is an
    `InputError`/`MediaError` whose `field` names the option. The default bounds:

    - an image or video frame as sent: 89,478,485 pixels (PIL's decompression-bomb threshold);
    - an image or video frame after its per-item resize: 16384 visual tokens (12,845,056 pixels at
      the 28-pixel factor of Qwen2-VL and Qwen2.5-VL, 16,777,216 at Qwen3-VL's 32: each family's
      default `max_pixels` for an image); `min_pixels` over it is refused at once;
    - all frames sampled from one video as decoded (a list of frames: as first resized):
      256 x 1920x1080 pixels;
    - one image or video: 32768 visual tokens (Qwen2-VL's context).

    The processor's own `min_pixels` may not exceed that bound either.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        patchifier: Patchifier,
        min_pixels: int,
        max_pixels: int,
        media_policy: MediaPolicy | None = None,
        budget: MediaBudget | None = None,
        settings: ProcessorSettings = ProcessorSettings(),
    ):
        """`settings`: what the checkpoint's config.json says (see `ProcessorSettings`): the
        context length, the M-RoPE time scale of videos (`tokens_per_second`: Qwen2.5-VL's;
        None where video positions advance by one per temporal patch, as Qwen2-VL's do), and
        whether videos carry text timestamps (`video_timestamps`: Qwen3-VL's, see `_timestamped`)."""
        if min_pixels > max_pixels:
            raise InputError(f"min_pixels ({min_pixels}) is greater than max_pixels ({max_pixels})", field="min_pixels")
        bound = resized_pixels_bound(patchifier.factor)
        if min_pixels > bound:
            raise InputError(f"min_pixels ({min_pixels}) is over the limit of {bound} pixels per image "
                             "(16384 visual tokens)", field="min_pixels")
        self.tokenizer = tokenizer
        self.template = template
        self.patchifier = patchifier
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.media_policy = media_policy or MediaPolicy()
        self.budget = (budget or MediaBudget()).for_factor(patchifier.factor)
        self.context_len = settings.context_len
        self.tokens_per_second = settings.tokens_per_second
        self.video_timestamps = settings.video_timestamps
        self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id = (
            self._vision_token_ids(settings.vision_token_ids))
        self._pad_kind = {self.image_token_id: "image", self.video_token_id: "video"}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        *,
        media_policy: MediaPolicy | None = None,
        allow_remote_media: bool | None = None,
        max_media_bytes: int | None = None,
        fetch_timeout: float | None = None,
        allowed_media_dir: str | Path | None = None,
        check_address=None,
        budget: MediaBudget | None = None,
        settings: ProcessorSettings | None = None,
    ) -> "Processor":
        """Read tokenizer.json (+ tokenizer_config.json), preprocessor_config.json and the chat template.

        A missing preprocessor config or chat template falls back to Qwen2-VL's (in `assets/`).
        For Qwen3-VL (`settings.video_timestamps`) the preprocessor config's min/max pixels are
        not used: its card resizes with qwen_vl_utils alone (`do_resize=False`); `min_pixels` and
        `max_pixels` given here still bound a second resize.
        `settings` (None: read from config.json, see `ProcessorSettings.from_pretrained`) give the
        context (`max_position_embeddings`, 32768 without one) and whether video positions are
        aligned to time.
        `media_policy` (default `MediaPolicy()`) says where media may come from; `allow_remote_media`,
        `max_media_bytes`, `fetch_timeout`, `allowed_media_dir` and `check_address`, where given,
        set its `allow_remote`, `max_bytes`, `timeout`, `allowed_dir` and `check_address`.
        `budget` (default `MediaBudget()`) bounds each image and video; see the class docstring.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir} is not a directory")
        tokenizer = Tokenizer.from_dir(model_dir)
        settings = settings or ProcessorSettings.from_pretrained(model_dir)
        config_path = model_dir / "preprocessor_config.json"
        config = json.loads((config_path if config_path.is_file() else BUILTIN_PREPROCESSOR).read_text(encoding="utf-8"))
        size = config.get("size") or {}
        config_min = config.get("min_pixels", size.get("shortest_edge", 56 * 56))
        config_max = config.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
        if settings.video_timestamps:  # Qwen3-VL: the card's pipeline resizes once, see NO_SECOND_RESIZE
            config_min, config_max = NO_SECOND_RESIZE
        default = Patchifier()
        patchifier = Patchifier(
            patch_size=config.get("patch_size", default.patch_size),
            merge_size=config.get("merge_size", default.merge_size),
            temporal_patch_size=config.get("temporal_patch_size", default.temporal_patch_size),
            image_mean=tuple(config.get("image_mean", default.image_mean)),
            image_std=tuple(config.get("image_std", default.image_std)),
            rescale_factor=config.get("rescale_factor", default.rescale_factor),
        )
        given = {"allow_remote": allow_remote_media, "max_bytes": max_media_bytes, "timeout": fetch_timeout,
                 "allowed_dir": None if allowed_media_dir is None else Path(allowed_media_dir),
                 "check_address": check_address}
        policy = replace(media_policy or MediaPolicy(),
                         **{name: value for name, value in given.items() if value is not None})
        return cls(
            tokenizer,
            ChatTemplate.from_dir(model_dir, tokenizer.special_tokens),
            patchifier,
            config_min if min_pixels is None else min_pixels,
            config_max if max_pixels is None else max_pixels,
            policy,
            budget,
            settings,
        )

    @property
    def patch_size(self) -> int:
        return self.patchifier.patch_size

    @property
    def merge_size(self) -> int:
        return self.patchifier.merge_size

    def with_media(self, media_policy: MediaPolicy, budget: MediaBudget) -> "Processor":
        """This processor (its tokenizer, template, sizes, context and video time scale) under
        another media policy and budget."""
        other = copy.copy(self)
        other.media_policy, other.budget = media_policy, budget.for_factor(self.patchifier.factor)
        return other

    @property
    def temporal_patch_size(self) -> int:
        return self.patchifier.temporal_patch_size

    # -- one conversation -------------------------------------------------------------------------

    def prepare(self, messages: list[dict], add_generation_prompt: bool = True, add_vision_id: bool = False,
                context_len: int | None = None, tools: list[dict] | None = None) -> PreparedPrompt:
        """Tokens with pads expanded, each image/video resized (uint8, see `VisionItem`), and M-RoPE positions.

        The prompt must fit `context_len` tokens (at most the processor's own `context_len`) with
        one token to generate; images and videos without an explicit size shrink to fit (see
        `qwen2vl.processor.fit`). `tools` (OpenAI's function tools) are listed in the prompt by the
        template."""
        parts = media_parts(messages)
        text, ids = self._render(messages, parts, add_generation_prompt, add_vision_id, tools)
        plans = self._plans(parts, len(ids) - len(parts), context_len)  # all within budget before any decoding
        items = media_map(lambda plan: self._located(plan.part, self._load, plan), plans)
        timestamped = self.video_timestamps and any(item.kind == "video" for item in items)
        if timestamped:
            text, ids = self._timestamped(text, items)
        runs = self._pad_runs(items)
        input_ids = self._expand(ids, [t * h * w // self.merge_size**2 for (t, h, w), _ in runs])
        if timestamped:  # the plans were fitted to the context before the timestamps' text was known
            self._check_length(len(input_ids), sum(item.num_tokens(self.merge_size) for item in items), context_len)
        positions, rope_delta = self.mrope(input_ids, [grid for grid, _ in runs], [step for _, step in runs])
        return PreparedPrompt(input_ids, positions, rope_delta, items, text)

    def mrope(self, input_ids, vision_grids, time_steps=None) -> tuple[torch.Tensor, int]:
        return mrope_positions(torch.as_tensor(input_ids), vision_grids, (self.image_token_id, self.video_token_id),
                               self.merge_size, time_steps)

    def second_per_grid_t(self, item: VisionItem) -> float:
        """Seconds of a video spanned by one temporal patch, from its sampled frame rate."""
        return self.temporal_patch_size / item.fps

    def _pad_runs(self, items: list[VisionItem]) -> list[tuple[tuple[int, int, int], float]]:
        """(grid, temporal step) of each run of pad tokens in the prompt: one run per item, except a
        timestamped video, which has one run of grid (1, h, w) per temporal patch (its own
        `<t seconds>` text between them), each positioned as an image of its own, as Qwen3-VL's
        get_rope_index splits `video_grid_thw`."""
        runs = []
        for item in items:
            if item.kind == "video" and self.video_timestamps:
                t, h, w = item.grid_thw
                runs += [((1, h, w), 1.0)] * t
            else:
                runs.append((item.grid_thw, self._time_step(item)))
        return runs

    def _time_step(self, item: VisionItem) -> float:
        """How far the item's temporal M-RoPE position advances per temporal patch."""
        if item.kind != "video" or self.tokens_per_second is None:
            return 1.0
        return self.second_per_grid_t(item) * self.tokens_per_second

    # -- transformers-style batch -----------------------------------------------------------------

    def __call__(
        self,
        conversations,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """The dict transformers' `Qwen2VLProcessor` returns (`Qwen2_5_VLProcessor`'s, with
        `second_per_grid_ts`, where video positions are aligned to time), plus `position_ids`
        [3, B, L] and `rope_deltas` [B, 1].

        A list of conversations is one batch, padded with the pad token on `padding_side`; "right"
        is what the reference does (the tokenizer's default side). Padded slots have attention_mask
        0 and position 0, as transformers' get_rope_index leaves them.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch = conversations if conversations and isinstance(conversations[0], (list, tuple)) else [conversations]
        prompts = media_map(lambda c: self.prepare(c, add_generation_prompt, add_vision_id), batch)
        length = max(len(p) for p in prompts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        token_types = torch.zeros((len(prompts), length), dtype=torch.long)
        position_ids = torch.zeros((3, len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = torch.tensor(prompt.input_ids, dtype=torch.long)
            span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
            token_types[row, span][ids == self.image_token_id] = TOKEN_TYPE["image"]
            token_types[row, span][ids == self.video_token_id] = TOKEN_TYPE["video"]
            position_ids[:, row, span] = prompt.positions
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": token_types}
        for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
            items = [item for p in prompts for item in p.vision_items if item.kind == kind]
            if items:
                out[pixels_key] = self.patchifier([item.pixels for item in items])
                out[grid_key] = torch.tensor([item.grid_thw for item in items], dtype=torch.long)
            if kind == "video" and items and self.tokens_per_second is not None:
                out["second_per_grid_ts"] = torch.tensor([self.second_per_grid_t(item) for item in items])
        out["position_ids"] = position_ids
        out["rope_deltas"] = torch.tensor([[p.rope_delta] for p in prompts], dtype=torch.long)
        return out

    # -- internals --------------------------------------------------------------------------------

    def _vision_token_ids(self, expected: tuple[int, ...] | None) -> tuple[int, ...]:
        """The tokenizer's ids of the vision tokens; where given, `expected` (config.json's: the
        ids the model looks for) must be the same."""
        ids = tuple(self._special_id(token) for token in VISION_TOKENS.values())
        for (name, token), token_id, wanted in zip(VISION_TOKENS.items(), ids, expected or ids):
            if token_id != wanted:
                raise CheckpointError(f"config.json's {name} is {wanted}, but the tokenizer's {token} is {token_id}")
        return ids

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no {token} token")
        return token_id

    @staticmethod
    def _located(part: MediaPart, step, *args):
        """`step(*args)`, naming `part`'s message and content index in any input error."""
        try:
            return step(*args)
        except InputError as e:
            raise e.at(part.message_index, part.content_index) from None

    def _render(self, messages, parts: list[MediaPart], add_generation_prompt: bool, add_vision_id: bool,
                tools: list[dict] | None = None):
        text = self.template.render(messages, add_generation_prompt, add_vision_id, tools)
        ids = self.tokenizer.encode(text)
        pad_kinds = [self._pad_kind[i] for i in ids if i in self._pad_kind]
        part_kinds = [part.kind for part in parts]
        if pad_kinds != part_kinds:
            raise InputError(
                f"the rendered prompt has {pad_kinds.count('image')} {IMAGE_TOKEN} and {pad_kinds.count('video')} "
                f"{VIDEO_TOKEN} tokens for {part_kinds.count('image')} images and {part_kinds.count('video')} videos "
                "(text must not contain vision placeholder tokens)"
            )
        return text, ids

    def _timestamped(self, text: str, items: list[VisionItem]) -> tuple[str, list[int]]:
        """`text` with each video's `<|vision_start|><|video_pad|><|vision_end|>` replaced by
        `<t seconds><|vision_start|><|video_pad|><|vision_end|>` for each of its temporal patches
        (t: `VisionItem.timestamps`), and its ids.

        The whole of the template's markup is replaced, as Qwen's processor (transformers 4.57)
        and vLLM do; transformers 5.17 replaces the pad token alone and so wraps the video in a
        second, outer `<|vision_start|>`...`<|vision_end|>` (and text right before a video, such
        as "Watch:", tokenizes apart from the timestamp there, with it here: ":<"). The text is
        tokenized again whole, as Qwen's processor does. A pad without the markup around it is
        replaced alone."""
        pieces, rest = [], text
        for item in items:
            if item.kind != "video":
                continue
            start = rest.index(VIDEO_TOKEN)
            end = start + len(VIDEO_TOKEN)
            if rest.endswith(VISION_START_TOKEN, 0, start) and rest.startswith(VISION_END_TOKEN, end):
                start, end = start - len(VISION_START_TOKEN), end + len(VISION_END_TOKEN)
            frames = "".join(timestamp_text(seconds) + VISION_START_TOKEN + VIDEO_TOKEN + VISION_END_TOKEN
                             for seconds in item.timestamps)
            pieces += [rest[:start], frames]
            rest = rest[end:]
        text = "".join(pieces) + rest
        return text, self.tokenizer.encode(text)

    def _expand(self, ids: list[int], token_counts: list[int]) -> list[int]:
        expanded, counts = [], iter(token_counts)
        for token in ids:
            if token in self._pad_kind:
                expanded.extend([token] * next(counts))
            else:
                expanded.append(token)
        return expanded

    @property
    def _frame_factor(self) -> int:
        return self.patchifier.factor * self.merge_size  # see video.frame_list_sizes

    def _final_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patchifier.factor, self.min_pixels, self.max_pixels)

    def _plans(self, parts: list[MediaPart], text_tokens: int, context_len: int | None) -> list[MediaPlan]:
        """Every image and video sized from its header and options, the defaults shrunk to fit the
        context, all within the budget; nothing decoded."""
        plans = [self._located(part, self._plan, part) for part in parts]
        context_len = self.context_len if context_len is None else min(context_len, self.context_len)
        plans = fit_context(plans, text_tokens, context_len, self._located_resize, self.patchifier.factor)
        for plan in plans:
            self._located(plan.part, self.budget.check, plan)
        visual = sum(plan.num_tokens for plan in plans)
        if plans:  # a prompt of text alone is the engine's to refuse: nothing to decode
            self._check_length(text_tokens + visual, visual, context_len)
        return plans

    def _check_length(self, total: int, visual: int, context_len: int | None) -> None:
        """A prompt of `total` tokens (`visual` of them vision pads) must leave one token to generate."""
        context_len = self.context_len if context_len is None else min(context_len, self.context_len)
        if total > context_len - 1:
            raise InputError(f"the prompt would have {total} tokens ({visual} of them visual), over the "
                             f"limit of {context_len - 1} (the context is {context_len} tokens, max_model_len or the "
                             "model's: the prompt plus at least one generated token); ask for fewer frames (fps, "
                             "nframes) or smaller images and frames (max_pixels), shorten the text or raise "
                             "max_model_len")

    def _plan(self, part: MediaPart) -> MediaPlan:
        """Open one image or video (its header) and size it by its options; decodes no pixels."""
        options, max_source = part.options, self.budget.max_source_pixels
        self.budget.check_options(options, "image" if part.kind == "image" else "video frame")
        if part.kind == "image":
            plan = ImagePlan(part, options, image=open_image(part.value, self.media_policy, max_source))
        elif isinstance(part.value, (list, tuple)):
            frames, frame_size = frame_list_sizes(list(part.value), options, self.media_policy, max_source,
                                                  self._frame_factor)
            plan = FrameListPlan(part, options, frames=frames, frame_size=frame_size)
        elif isinstance(part.value, str):
            source = resolve(part.value, self.media_policy)
            plan = VideoFilePlan(part, options, source=source, probe=probe_video(source))
        else:
            raise MediaError(f"a video must be a path, URL or a list of frames, got {type(part.value).__name__}")
        return self._resize_plan(plan, options)

    def _located_resize(self, plan: MediaPlan, options: MediaOptions) -> MediaPlan:
        return self._located(plan.part, self._resize_plan, plan, options)

    def _resize_plan(self, plan: MediaPlan, options: MediaOptions) -> MediaPlan:
        """`plan` sized under `options` (the part's own, or the ones `fit_context` chose)."""
        factor = self.patchifier.factor
        if isinstance(plan, ImagePlan):
            num_frames, size = 1, image_target_size(*plan.source_size, options, factor)
        elif isinstance(plan, FrameListPlan):
            num_frames = -(-len(plan.frames) // FRAME_FACTOR) * FRAME_FACTOR  # padded to an even count
            size = video_target_size(*plan.frame_size, num_frames, options, factor)
        else:
            num_frames = sample_frame_count(options, plan.probe.total_frames, plan.probe.fps)
            size = video_target_size(*plan.source_size, num_frames, options, factor)
        height, width = self._final_size(*size)
        t = -(-num_frames // self.temporal_patch_size)
        num_tokens = t * (height // self.patch_size) * (width // self.patch_size) // self.merge_size**2
        return replace(plan, options=options, num_frames=num_frames, size=size, num_tokens=num_tokens)

    def _load(self, plan: MediaPlan) -> VisionItem:
        if isinstance(plan, ImagePlan):
            return self._load_image(plan)
        return self._load_video(plan)

    def _load_image(self, plan: ImagePlan) -> VisionItem:
        image = plan.image
        pixels = resize_image(to_rgb(image), *plan.size)
        pixels = resize_image_tensor(pixels, *self._final_size(*plan.size))[None]
        return VisionItem("image", pixels, self.patchifier.grid(pixels), image.size,
                          (pixels.shape[-1], pixels.shape[-2]), patchifier=self.patchifier)

    def _load_video(self, plan: FrameListPlan | VideoFilePlan) -> VisionItem:
        factor, options = self.patchifier.factor, plan.options
        if isinstance(plan, FrameListPlan):
            frames = load_frame_list(plan.frames, *plan.frame_size)
            frames = resize_frames(frames, *video_target_size(*plan.frame_size, frames.shape[0], options, factor))
            original = plan.frames[0].size
            fps = options.sample_fps or 2.0  # qwen_vl_utils reports this for frame lists, whatever `fps` says
            # qwen_vl_utils' metadata of a frame list: frames 0, 1, ... (padded) at `raw_fps`, else `sample_fps`
            timestamps = group_timestamps(list(range(frames.shape[0])), options.raw_fps or fps, self.temporal_patch_size)
        else:
            probe = plan.probe
            # sized by the frames sampled: a container that over-reported its length yields fewer than planned
            frames, fps, indices = load_video_file(
                plan.source, probe, options, lambda count: video_target_size(probe.height, probe.width, count, options, factor))
            original = (probe.width, probe.height)
            timestamps = group_timestamps(indices, probe.fps, self.temporal_patch_size)
        height, width = frames.shape[-2:]
        final = self._final_size(height, width)
        if final != (height, width):  # the reference resizes its float frames again, unrounded
            frames = resize_frames(frames.float(), *final)
        return VisionItem("video", frames, self.patchifier.grid(frames), original,
                          (frames.shape[-1], frames.shape[-2]), fps, self.patchifier, tuple(timestamps))
