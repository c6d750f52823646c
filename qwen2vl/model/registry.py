"""The architectures of the family, by config.json `model_type`.

Each owns what differs between them: its vision settings (`qwen2vl.config.VISION_CONFIGS`, plain
data the processor reads too), the model class (its vision tower) and the names of its
checkpoint tensors. The text decoder, attention, quantized linears, kernels, engine and server
are shared. A new variant is its vision settings in `config.py`, one module beside
`qwen2_5_vl.py` (importing what it shares, as that one imports Qwen2-VL's) and one entry here;
README.md (Layout) says why the layout is this one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from qwen2vl import config as base_config
from qwen2vl.model import qwen2_5_vl, qwen2_vl, qwen3_vl, vision


@dataclass(frozen=True)
class Architecture:
    model_type: str
    model_class: type[nn.Module]
    # our name prefix -> the checkpoint's (original layout); `*` in both stands for one index
    weight_renames: tuple[tuple[str, str], ...]
    vision_checkpoint_tensors: Callable[[base_config.VisionConfig], Iterator[tuple[str, tuple[int, ...], str]]]


ARCHITECTURES = {
    "qwen2_vl": Architecture("qwen2_vl", qwen2_vl.Qwen2VLForConditionalGeneration, qwen2_vl.WEIGHT_RENAMES,
                             vision.vision_checkpoint_tensors),
    "qwen2_5_vl": Architecture("qwen2_5_vl", qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, qwen2_vl.WEIGHT_RENAMES,
                               qwen2_5_vl.vision_checkpoint_tensors),
    "qwen3_vl": Architecture("qwen3_vl", qwen3_vl.Qwen3VLForConditionalGeneration, qwen3_vl.WEIGHT_RENAMES,
                             qwen3_vl.vision_checkpoint_tensors),
    # The same model: its config's `TextConfig.moe` makes the decoder's MLPs sparse.
    "qwen3_vl_moe": Architecture("qwen3_vl_moe", qwen3_vl.Qwen3VLForConditionalGeneration, qwen3_vl.WEIGHT_RENAMES,
                                 qwen3_vl.vision_checkpoint_tensors),
}


def architecture(model_type: str) -> Architecture:
    base_config.vision_config_class(model_type)  # an unsupported model_type is refused by name
    return ARCHITECTURES[model_type]


def parse_config(model_dir) -> base_config.Qwen2VLConfig:
    """`model_dir`'s config.json, read once and parsed with its architecture's settings: the loader
    builds the model from it (`load_model(..., config=)`), the processor takes its
    `processor_settings`."""
    config = base_config.Qwen2VLConfig.from_pretrained(model_dir)
    architecture(config.model_type)
    return config
