"""Fitting a prompt's images and videos to the model's context, from their headers, before any decoding.

A prompt whose text and visual tokens would not fit the context (the checkpoint's
`max_position_embeddings`, or the engine's `max_model_len` when smaller) with one token to
generate has the default budgets of its images and videos shrunk, each in proportion, until the
whole prompt takes at most `FIT_SHARE` of the context (the rest is room for the answer):

1. a video file samples fewer frames, each kept at its size, down to its `min_frames` (default 4);
2. then its frames, and images, get fewer pixels, down to qwen_vl_utils' minimum (128 tokens a
   video frame, 4 an image).

Explicit choices win: `nframes` or `fps` fix a video's frames; `min_pixels`, `max_pixels`,
`total_pixels` or `resized_height`/`resized_width` fix an image's or frame's size; a list of frames
is kept as sent. A prompt that still does not fit is refused by the processor, before decoding.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

from qwen2vl.processor.image import IMAGE_MIN_TOKENS
from qwen2vl.processor.types import FrameListPlan, ImagePlan, MediaPlan, VideoFilePlan
from qwen2vl.processor.video import FRAME_FACTOR, MIN_FRAMES, VIDEO_MIN_TOKENS

FIT_SHARE = 0.9  # like qwen_vl_utils' video budget: 90% of the sequence for media and text

logger = logging.getLogger(__name__)
_logged = False


def fit_context(plans: list[MediaPlan], text_tokens: int, context_len: int, resize, factor: int) -> list[MediaPlan]:
    """`plans` (the processor's, in prompt order) with the free ones re-sized by `resize(plan, options)`
    when the prompt would not fit `context_len`; `factor` is the pixel side of one visual token."""
    visual = sum(plan.num_tokens for plan in plans)
    if text_tokens + visual <= context_len - 1:
        return plans
    free = [i for i, plan in enumerate(plans) if _frames_free(plan) or _pixels_free(plan)]
    free_tokens = sum(plans[i].num_tokens for i in free)
    room = math.floor(FIT_SHARE * context_len) - text_tokens - (visual - free_tokens)
    if room <= 0 or not free:
        return plans
    fitted = list(plans)
    for i in free:
        fitted[i] = _shrunk(plans[i], plans[i].num_tokens * room // free_tokens, resize, factor)
    _log_once(text_tokens + visual, text_tokens + sum(plan.num_tokens for plan in fitted), context_len)
    return fitted


def _frames_free(plan: MediaPlan) -> bool:
    options = plan.part.options
    return isinstance(plan, VideoFilePlan) and options.nframes is None and options.fps is None


def _pixels_free(plan: MediaPlan) -> bool:
    options = plan.part.options
    return not isinstance(plan, FrameListPlan) and all(
        value is None for value in (options.min_pixels, options.max_pixels, options.total_pixels, options.resized_height))


def _shrunk(plan: MediaPlan, max_tokens: int, resize, factor: int) -> MediaPlan:
    """`plan` at most `max_tokens` visual tokens where its free options allow: fewer frames, then fewer pixels."""
    if _frames_free(plan):
        height, width = plan.size
        steps = -(-plan.num_frames // FRAME_FACTOR)  # temporal patches, each `plan.num_tokens / steps` tokens
        min_frames = max(FRAME_FACTOR, math.ceil((plan.options.min_frames or MIN_FRAMES) / FRAME_FACTOR) * FRAME_FACTOR)
        frames = FRAME_FACTOR * (max_tokens * steps // plan.num_tokens)
        frames = min(plan.num_frames, max(min_frames, frames))
        plan = resize(plan, replace(plan.options, nframes=frames, max_pixels=height * width))
        if plan.num_tokens <= max_tokens:
            return plan
    if _pixels_free(plan):
        steps = -(-plan.num_frames // FRAME_FACTOR)
        least = (IMAGE_MIN_TOKENS if isinstance(plan, ImagePlan) else VIDEO_MIN_TOKENS) * factor * factor
        plan = resize(plan, replace(plan.options, max_pixels=max(least, max_tokens // steps * factor * factor)))
    return plan


def _log_once(tokens: int, fitted: int, context_len: int) -> None:
    global _logged
    if not _logged:
        _logged = True
        logger.info("a prompt's images and videos would make it %d tokens, over the context of %d: their default "
                    "budgets shrank to fit (%d tokens; fewer video frames first, then fewer pixels). Give nframes, "
                    "fps, max_pixels or total_pixels to choose; this is logged once.", tokens, context_len, fitted)
