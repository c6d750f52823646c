"""Block-FP8 versions of tiny test checkpoints, in the layout of Qwen's `*-FP8` releases.

Generic over the architecture: any checkpoint directory whose text decoder's linears are
`...layers.<i>.(self_attn|mlp).<name>_proj.weight` (2-D; the vision tower's `blocks` are left
alone) is re-written with those weights as e4m3 and one float32 `weight_scale_inv` per block.
`write_dequantized_checkpoint` writes the exact dequantization back as float32 weights: what
transformers runs as the reference.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen2vl.config import QuantConfig
from qwen2vl.layers import quantization as q
from qwen2vl.loader import original_layout_name

DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def fp8_quantization_config(block_size: tuple[int, int], modules_to_not_convert: tuple[str, ...] = ()) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block_size), "modules_to_not_convert": list(modules_to_not_convert)}


def write_fp8_checkpoint(src, out, block_size: tuple[int, int] = (24, 40),
                         modules_to_not_convert: tuple[str, ...] = ("lm_head",)) -> Path:
    """Copy checkpoint `src` to `out` with the decoder linears not in `modules_to_not_convert`
    quantized to block FP8 (`layers.quantization.quantize_fp8_blocks`: round to nearest e4m3)."""
    src, out = Path(src), Path(out)
    quant_config = fp8_quantization_config(block_size, modules_to_not_convert)
    # Names compared in the original key layout, whichever layout the checkpoint and the names use.
    skip = QuantConfig.from_dict(fp8_quantization_config(block_size, tuple(map(original_layout_name,
                                                                              modules_to_not_convert))))

    def convert(tensors: dict) -> dict:
        converted = {}
        for key, tensor in tensors.items():
            module = key.removesuffix(".weight")
            quantized = DECODER_LINEAR.search(key) and "visual" not in key and tensor.ndim == 2
            if quantized and skip.converts(original_layout_name(module)):
                converted[key], converted[f"{module}.weight_scale_inv"] = q.quantize_fp8_blocks(tensor, block_size)
            else:
                converted[key] = tensor
        return converted

    _rewrite(src, out, convert, lambda config: {**config, "quantization_config": quant_config})
    return out


def dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """One stored tensor's `weight * scale` per block, float32 (written out, not through the loader's code)."""
    rows, cols = block_size
    n, k = weight.shape
    scales = scale_inv.float().repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
    return weight.float() * scales


def write_dequantized_checkpoint(fp8_dir, out) -> Path:
    """Copy FP8 checkpoint `fp8_dir` to `out` with every FP8 weight dequantized to float32 and
    no quantization_config."""
    fp8_dir, out = Path(fp8_dir), Path(out)
    block_size = tuple(json.loads((fp8_dir / "config.json").read_text())["quantization_config"]["weight_block_size"])

    def convert(tensors: dict) -> dict:
        converted = {}
        for key, tensor in tensors.items():
            if key.endswith(".weight_scale_inv"):
                continue
            scale = tensors.get(key.removesuffix(".weight") + ".weight_scale_inv")
            converted[key] = tensor if scale is None else dequantize_reference(tensor, scale, block_size)
        return converted

    _rewrite(fp8_dir, out, convert, lambda config: {k: v for k, v in config.items() if k != "quantization_config"})
    return out


def _rewrite(src: Path, out: Path, convert, edit_config) -> None:
    """`src` copied to `out`, each safetensors file's tensors through `convert`, config.json through `edit_config`."""
    shutil.copytree(src, out, dirs_exist_ok=True)
    for path in out.glob("*.safetensors"):
        save_file({k: v.contiguous() for k, v in convert(load_file(path)).items()}, path, metadata={"format": "pt"})
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {key: file for path in out.glob("*.safetensors") for key in load_file(path)
                               for file in [path.name]}
        index_path.write_text(json.dumps(index, indent=2))
    config_path = out / "config.json"
    config_path.write_text(json.dumps(edit_config(json.loads(config_path.read_text())), indent=2))
