"""4-bit weight quantization of the text decoder: AWQ, and round-to-nearest as the baseline.

AWQ (Lin et al. 2023, as AutoAWQ implements it) per decoder layer, on activations recorded from
calibration conversations with the float model:

1. Scale search. For each (previous op -> linears) pair, per-input-channel scales
   `s = mean|x|^a / mean|w~|^(1-a)` (w~: weights normalized by their group maximum) are tried
   for `a` on a grid of exponents; the weights are multiplied by `s` and quantized, the input
   divided by `s`, and the `a` that best reproduces the float output is kept and folded in:
   input_layernorm -> q/k/v, post_attention_layernorm -> gate/up (scored on the MLP output),
   up -> down, and v -> o when v's width equals o's input (no GQA).
2. Clipping search. Per output channel and group, the weight range is shrunk by up to 50%
   where that lowers the output error (not for q/k, whose errors the softmax amplifies).
3. Asymmetric 4-bit quantization with zero points per group, packed in the AutoAWQ GEMM layout.

The vision tower stays unquantized, as in the Qwen2-VL AWQ card's checkpoint. The result is an
ordinary AWQ checkpoint directory: `config.json` with the card's `quantization_config`, fp16
tensors, and the source's tokenizer / processor files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2vl.batch_job import read_conversations
from qwen2vl.errors import InputError
from qwen2vl.layers import quantization as q
from qwen2vl.layers.activation import silu_and_mul

BITS = 4
SCALE_GRID = 20  # exponents a = 0, 1/20, ..., 19/20
CLIP_GRID, MAX_SHRINK = 20, 0.5
CLIP_TOKENS = 512  # activation rows the clipping search scores on
MAX_ROWS = 4096  # activation rows kept per linear input
BUILT_IN_CALIBRATION = "shapes"  # `--calibration shapes`: `default_calibration`, chosen explicitly
SUPPORT_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
                 "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
                 "generation_config.json")


def fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight [out, in]` quantized to 4 bits with zero points per group of inputs and back."""
    values, zeros, scales = q.quantize_rtn(weight.t(), BITS, group_size, sym=False)
    grouped = values.unflatten(0, (-1, group_size)) - zeros[:, None]
    return (grouped * scales.float()[:, None]).flatten(0, 1).t().to(weight.dtype)


@dataclass
class LayerInputs:
    """Inputs of one decoder layer's linears, recorded from calibration prompts ([rows, in])."""

    attn: list[torch.Tensor] = field(default_factory=list)  # after input_layernorm: q/k/v input
    o: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)  # after post_attention_layernorm
    down: list[torch.Tensor] = field(default_factory=list)

    def stacked(self, name: str) -> torch.Tensor:
        rows = torch.cat(getattr(self, name)).float()
        if len(rows) > MAX_ROWS:  # an even spread over the calibration set
            rows = rows[torch.linspace(0, len(rows) - 1, MAX_ROWS).long()]
        return rows


def record_inputs(llm, conversations: list[list[dict]], batch_size: int = 16) -> list[LayerInputs]:
    """Run the prompts through `llm` (a float `Qwen2VL`) and record every decoder linear's input."""
    layers = llm.engine.model.language_model.layers
    records = [LayerInputs() for _ in layers]
    hooks = []
    for layer, record in zip(layers, records):
        for module, rows in ((layer.self_attn.qkv_proj, record.attn), (layer.self_attn.o_proj, record.o),
                             (layer.mlp.gate_up_proj, record.mlp), (layer.mlp.down_proj, record.down)):
            hooks.append(module.register_forward_pre_hook(lambda _, args, rows=rows: rows.append(args[0].detach().cpu())))
    try:
        for first in range(0, len(conversations), batch_size):
            llm.chat(conversations[first:first + batch_size], temperature=0.0, max_tokens=1)
    finally:
        for hook in hooks:
            hook.remove()
    return records


def search_scales(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                  output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-input-channel scales `[in]` minimizing the error of `output(x, weight)` when `weight`
    is quantized (weight * s quantized, input / s)."""
    x_mean = x.abs().mean(0)
    grouped = weight.abs().unflatten(1, (-1, group_size))
    w_mean = (grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-8)).flatten(1).mean(0)
    reference = output(x, weight)
    best, best_error = torch.ones_like(x_mean), float("inf")
    for step in range(SCALE_GRID):
        ratio = step / SCALE_GRID
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = (output(x, fake_quantize(weight * scales, group_size) / scales) - reference).pow(2).mean().item()
        if error < best_error:
            best, best_error = scales, error
    return best


def clip_weight(x: torch.Tensor, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight [out, in]` with each (output channel, group) range shrunk where that lowers the
    error of its partial products on `x`."""
    x = x[torch.linspace(0, len(x) - 1, min(len(x), CLIP_TOKENS)).long()].unflatten(1, (-1, group_size))
    w = weight.unflatten(1, (-1, group_size))  # [out, G, g]
    reference = torch.einsum("ngk,ogk->nog", x, w)
    full_range = w.abs().amax(-1, keepdim=True)
    best_range, best_error = full_range.clone(), torch.full(full_range.shape, float("inf"))
    for step in range(int(MAX_SHRINK * CLIP_GRID)):
        bound = full_range * (1 - step / CLIP_GRID)
        clipped = torch.maximum(torch.minimum(w, bound), -bound)
        quantized = fake_quantize(clipped.flatten(1), group_size).unflatten(1, (-1, group_size))
        error = (torch.einsum("ngk,ogk->nog", x, quantized) - reference).pow(2).mean(0)[..., None]
        better = error < best_error
        best_error, best_range = torch.where(better, error, best_error), torch.where(better, bound, best_range)
    return torch.maximum(torch.minimum(w, best_range), -best_range).flatten(1)


def awq_layer_(layer, inputs: LayerInputs, group_size: int) -> None:
    """Fold AWQ scales into one decoder layer's norms and weights, then clip its weights."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    q_size, kv_size, _ = qkv.output_sizes
    intermediate = down.in_features
    x_attn, x_o, x_mlp, x_down = (inputs.stacked(n) for n in ("attn", "o", "mlp", "down"))
    with torch.no_grad():
        # input_layernorm -> q, k, v
        s = search_scales(x_attn, qkv.weight.float(), group_size, lambda x, w: F.linear(x, w))
        layer.input_layernorm.weight.div_(s.to(layer.input_layernorm.weight.dtype))
        qkv.weight.mul_(s.to(qkv.weight.dtype))
        x_attn = x_attn / s
        # v -> o, only where v's output is o's input
        if kv_size == o.in_features:
            s = search_scales(x_o, o.weight.float(), group_size, lambda x, w: F.linear(x, w))
            v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
            qkv.weight[v_rows].div_(s[:, None].to(qkv.weight.dtype))
            qkv.bias[v_rows].div_(s.to(qkv.bias.dtype))
            o.weight.mul_(s.to(o.weight.dtype))
            x_o = x_o / s
        # post_attention_layernorm -> gate, up (scored on the MLP's output)
        down_weight = down.weight.float()
        s = search_scales(x_mlp, gate_up.weight.float(), group_size,
                          lambda x, w: F.linear(silu_and_mul(F.linear(x, w)), down_weight))
        layer.post_attention_layernorm.weight.div_(s.to(layer.post_attention_layernorm.weight.dtype))
        gate_up.weight.mul_(s.to(gate_up.weight.dtype))
        x_mlp = x_mlp / s
        # up -> down
        s = search_scales(x_down, down_weight, group_size, lambda x, w: F.linear(x, w))
        gate_up.weight[intermediate:].div_(s[:, None].to(gate_up.weight.dtype))
        down.weight.mul_(s.to(down.weight.dtype))
        x_down = x_down / s
        # clipping (q and k are left whole)
        v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
        qkv.weight[v_rows] = clip_weight(x_attn, qkv.weight[v_rows].float(), group_size).to(qkv.weight.dtype)
        for linear, x in ((o, x_o), (gate_up, x_mlp), (down, x_down)):
            linear.weight.copy_(clip_weight(x, linear.weight.float(), group_size))


def quantized_tensors(model, group_size: int) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors (qweight, qzeros, scales, and bias where present) of every decoder
    linear, and the decoder's norm weights, under the checkpoint's (original layout) names."""
    from qwen2vl.loader import checkpoint_name, checkpoint_part_names

    tensors = {}
    for name, module in model.language_model.layers.named_modules(prefix="language_model.layers"):
        if hasattr(module, "output_sizes"):
            values, zeros, scales = q.quantize_rtn(module.weight.float().t(), BITS, group_size, sym=False)
            start = 0
            for part, size in zip(checkpoint_part_names(name), module.output_sizes):
                columns = slice(start, start + size)
                tensors[f"{part}.qweight"] = q.pack_awq(values[:, columns])
                tensors[f"{part}.qzeros"] = q.pack_awq(zeros[:, columns])
                tensors[f"{part}.scales"] = scales[:, columns].contiguous()
                if module.bias is not None:
                    tensors[f"{part}.bias"] = module.bias[columns].half().contiguous()
                start += size
        elif name.endswith("layernorm"):
            tensors[checkpoint_name(f"{name}.weight")] = module.weight.half().contiguous()
    return tensors


def check_group_size(model, group_size: int) -> None:
    layers = model.language_model.layers.named_modules(prefix="language_model.layers")
    linears = {name: module for name, module in layers if hasattr(module, "output_sizes")}
    for name, module in linears.items():
        if any(n % 8 for n in module.output_sizes):
            raise InputError(f"{name} has outputs {list(module.output_sizes)}: the AWQ GEMM format packs 8 outputs "
                             "in each int32, so every output size must be divisible by 8")
    widths = sorted({module.in_features for module in linears.values()})
    for name, module in linears.items():
        if module.in_features % group_size:
            common = math.gcd(*widths)
            fitting = max(size for size in range(1, min(group_size, common) + 1) if common % size == 0)
            raise InputError(f"--group-size {group_size} does not divide the {module.in_features} inputs of {name} "
                             f"(the decoder's linears take {' and '.join(map(str, widths))} inputs); "
                             f"use --group-size {fitting}", field="group_size")


def check_out_dir(source_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over the source or, unless `overwrite`, into a non-empty folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a directory", field="out_dir")
    if out_dir.exists() and out_dir.resolve() == source_dir.resolve():
        raise InputError(f"output {out_dir} is the source checkpoint; write the quantized one to another directory",
                         field="out_dir")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"output {out_dir} exists and is not empty; choose a new directory, or pass --force "
                         "to replace the checkpoint in it", field="out_dir")


def write_checkpoint(source_dir: Path, out_dir: Path, quantized: dict[str, torch.Tensor], group_size: int) -> Path:
    """The source checkpoint's other tensors (fp16) with `quantized` replacing its decoder
    linears and norms; config.json gains the card's `quantization_config`."""
    from safetensors.torch import load_file, save_file

    from qwen2vl.loader import original_layout_name
    from qwen2vl.tools.random_checkpoint import quantization_config

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json")]:
        stale.unlink()  # an overwritten folder's old shards would be loaded with the new weights
    tensors = {}
    for file in sorted(source_dir.glob("*.safetensors")):
        for key, tensor in load_file(file).items():
            name = original_layout_name(key)
            if name in quantized or name.removesuffix(".weight") + ".qweight" in quantized:
                continue
            tensors[name] = tensor.half() if tensor.is_floating_point() else tensor
    tensors.update(quantized)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config("awq", group_size)
    config["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors writes its file private (0600); give it the mode every other file gets (the umask's)
    os.chmod(out_dir / "model.safetensors", (out_dir / "config.json").stat().st_mode & 0o777)
    for name in SUPPORT_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
    return out_dir


def quantize(model_dir, out_dir, method: str = "awq", group_size: int = 128,
             calibration: list[list[dict]] | None = None, log=print, overwrite: bool = False) -> Path:
    """Quantize checkpoint `model_dir` to 4-bit AWQ GEMM in `out_dir` (`method` "awq" or "rtn").

    `calibration` conversations (AWQ only) should be like those the model will answer; they
    default to the built-in synthetic shapes set (`default_calibration`) for the bundled demo
    model only, which was trained on that task: any other model needs them given (pass
    `default_calibration()` to use the shapes set anyway).
    A non-empty `out_dir` is refused unless `overwrite`, which replaces the checkpoint files in it.
    """
    from qwen2vl.api import Qwen2VL
    from qwen2vl.hub import DEMO_MODEL_DIR, resolve_model_dir

    if method not in ("awq", "rtn"):
        raise InputError(f"method {method!r}: expected 'awq' or 'rtn'")
    source_dir = resolve_model_dir(model_dir)
    check_out_dir(source_dir, Path(out_dir), overwrite)
    if method == "awq" and calibration is None:
        if source_dir.resolve() != DEMO_MODEL_DIR.resolve():
            raise InputError(
                f"AWQ of {source_dir} needs calibration conversations like the ones it will answer: "
                "--calibration CONVS.jsonl (one list of messages per line); the built-in set is synthetic "
                f"shapes questions, made for the bundled demo model: --calibration {BUILT_IN_CALIBRATION} "
                "uses it anyway, and --method rtn needs none", field="calibration")
        calibration = default_calibration()
    llm = Qwen2VL.from_pretrained(source_dir, device="cpu", dtype="float32")
    model = llm.engine.model
    if model.config.quant is not None:
        raise InputError(f"{source_dir} is already quantized ({model.config.quant.method})")
    group_size = group_size if group_size > 0 else model.config.text.hidden_size
    check_group_size(model, group_size)
    if method == "awq":
        if not calibration:
            raise InputError("AWQ needs at least one calibration conversation")
        log(f"recording activations of {len(calibration)} calibration conversations")
        records = record_inputs(llm, calibration)
        for index, (layer, inputs) in enumerate(zip(model.language_model.layers, records)):
            awq_layer_(layer, inputs, group_size)
            log(f"layer {index + 1}/{len(records)}: scales and clipping searched")
    return write_checkpoint(source_dir, Path(out_dir), quantized_tensors(model, group_size), group_size)


def default_calibration(n_per_task: int = 64, seed: int = 12345) -> list[list[dict]]:
    """Built-in calibration: shapes-task conversations with their answers (a seed apart from the
    evaluation's). 64 per task, ~40K token rows, near AutoAWQ's 128 x 512: with 16 per task the
    demo model's 4-bit grounding lost 7 points against BF16 instead of 2 (docs/benchmarks.md)."""
    from qwen2vl.evals.shapes import make_samples

    return [sample.messages + [{"role": "assistant", "content": sample.answer}]
            for sample in make_samples(n_per_task, seed)]


def read_calibration(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file (see `read_conversations`; ids are not needed here)."""
    records = read_conversations(path)
    for record in records:
        if "error" in record and record["error"].field != "id":
            raise InputError(f"{path}: line {record['line']}: {record['error']}", field="calibration")
    return [record["messages"] for record in records]
