"""The architectures of the family, by config.json `model_type`.

Each owns what differs between them: its vision settings (parsed from `vision_config`), the model
class (its vision tower), the names of its checkpoint tensors, and its M-RoPE rule for videos.
The text decoder, attention, quantized linears, kernels, engine and server are shared. A new
variant is one module beside `qwen2_5_vl.py` (importing what it shares, as that one imports
Qwen2-VL's) and one entry here; README.md (Layout) says why the layout is this one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qwen2vl import config as base_config
from qwen2vl.errors import CheckpointError
from qwen2vl.model import qwen2_5_vl, qwen2_vl, vision


@dataclass(frozen=True)
class Architecture:
    model_type: str
    parse_vision_config: Callable[[dict, int], base_config.VisionConfig]  # (vision_config, text hidden size)
    model_class: type[nn.Module]
    weight_renames: tuple[tuple[str, str], ...]  # our name prefix -> the checkpoint's (original layout)
    vision_checkpoint_tensors: Callable[[base_config.VisionConfig], Iterator[tuple[str, tuple[int, ...], str]]]
    # Video M-RoPE: temporal positions advance by tokens_per_second x seconds per temporal patch
    # (Qwen2.5-VL), or by one per temporal patch (Qwen2-VL).
    time_aligned: bool


ARCHITECTURES = {
    "qwen2_vl": Architecture("qwen2_vl", base_config.vision_config, qwen2_vl.Qwen2VLForConditionalGeneration,
                             qwen2_vl.WEIGHT_RENAMES, vision.vision_checkpoint_tensors, time_aligned=False),
    "qwen2_5_vl": Architecture("qwen2_5_vl", qwen2_5_vl.parse_vision_config, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration,
                               qwen2_vl.WEIGHT_RENAMES, qwen2_5_vl.vision_checkpoint_tensors, time_aligned=True),
}


def architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported "
                              f"(expected one of {', '.join(map(repr, ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def video_tokens_per_second(config: dict) -> float | None:
    """The M-RoPE time scale of a checkpoint's videos (its parsed config.json, `{}` without
    one): its `tokens_per_second` where the architecture aligns video positions to time, else None."""
    from qwen2vl.config import Qwen2VLConfig

    if not architecture(config.get("model_type", "qwen2_vl")).time_aligned:
        return None
    return Qwen2VLConfig.from_dict(config).vision.tokens_per_second
