"""Load a Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint directory into our model.

The architecture (`qwen2vl.model.registry`, by config.json's `model_type`) gives the model class
and the names of the checkpoint's tensors.

Tensors stream from safetensors one at a time, straight into their place in the model (built
first on the meta device, so nothing is allocated twice). Files are read with plain reads, not
memory-mapped: mapped pages of a multi-GB shard would stay resident beside the loaded weights. Both key layouts are accepted:
`model.layers.* / visual.*` (original) and `model.language_model.* / model.visual.*` (current
transformers). q/k/v and gate/up are fused on the way in, and mixture-of-experts weights stored
one per expert (as the AWQ and FP8 releases store them) are stacked, each expert dequantized as its
last tensor arrives. Keys and shapes are checked against the config before any tensor is read.

What loading computes beyond reading (4-bit linears repacked for their kernel, the int8
vocabulary rows, tensors converted to the compute dtype) is cached after a first load
(`qwen2vl.load_cache`) and read back on later ones.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qwen2vl.config import QuantConfig, Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.progress import note
from qwen2vl import kernels, load_cache
from qwen2vl.layers import quantization as q
from qwen2vl.layers.linear import AWQLinear, FP8Linear, GPTQLinear, Int4Linear, Linear, QuantizedLinear
from qwen2vl.layers.moe import Experts
from qwen2vl.layers.vocab import Int8VocabTable
from qwen2vl.model.qwen2_vl import WEIGHT_RENAMES, Qwen2VLForConditionalGeneration
from qwen2vl.model.registry import architecture, parse_config

# Our fused projections and the checkpoint projections they are made of, in order.
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Current transformers layout -> original layout.
_LAYOUTS = (("model.language_model.", "model."), ("model.visual.", "visual."))
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


def load_model(model_dir, device="cpu", dtype: torch.dtype | None = None,
               int4_kernel: bool | str | None = None, int8_vocab: bool = True,
               config: Qwen2VLConfig | None = None, cache: bool | str | os.PathLike | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> Qwen2VLForConditionalGeneration:
    """Load `model_dir` (config.json + safetensors) onto `device`. `config` is its config.json
    where the caller has parsed it already (`registry.parse_config`); None reads it.

    `dtype` None picks bfloat16, except on the CPU for checkpoints without 4-bit linears, where
    float32 is the dense path that is both exact and fast. With float16 the vision tower runs in
    float16 but the text decoder in bfloat16: Qwen2's residual stream overflows float16.

    Quantized linears either run a packed 4-bit kernel (`Int4Linear`: only the 4-bit layout is
    kept) or are dequantized once to the decoder's dtype (the reference path). `int4_kernel`
    None uses the device's kernel where it runs (see `qwen2vl.kernels`) when the decoder computes
    in bfloat16 (on the CPU the kernel's own dtype; on CUDA Triton's); float32 keeps the exact
    dequantized path. True forces the device's kernel, a backend name ("cpu", "triton") that one.
    Where a 4-bit checkpoint runs on an int4 kernel in bfloat16, the vocabulary table is kept as
    int8 rows (`int8_vocabulary`) unless `int8_vocab` is False. Block-scaled FP8 linears stay in
    FP8 for the FP8 kernel where it runs (`kernels.fp8_kernel_runs`) unless `int4_kernel` is
    False; elsewhere they are dequantized exactly to the decoder's dtype.

    `cache`: where the repacked 4-bit layout, int8 rows and converted tensors are kept between loads (see
    `qwen2vl.load_cache`): None the user's cache folder unless `$QWEN2VL_LOAD_CACHE=0`, False
    none, a path that folder. A first load that writes an entry says so on stderr, with its time.
    `progress(text, done, total)` is called as tensors are read (done/total in bytes) and as
    linears are repacked (in linears).
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    device = torch.device(device)
    config = config or parse_config(model_dir)
    text_dtype, vision_dtype = compute_dtypes(dtype or default_dtype(config, device))
    arch = architecture(config.model_type)
    with torch.device("meta"):
        model = arch.model_class(config)
        if config.quant is not None:
            swap_quantized_linears(model, config.quant, arch.weight_renames)
    int4_kernel = text_dtype == torch.bfloat16 if int4_kernel is None else int4_kernel
    int8_vocab = int8_vocab and int8_vocabulary(config, device, text_dtype, int4_kernel)
    if int8_vocab:
        swap_vocab_tables_int8(model, text_dtype, device)
    entry = None
    if config.four_bit and int4_kernel and (directory := load_cache.cache_dir(cache)) is not None:
        files = [model_dir / "config.json", *_shard_keys(model_dir)]
        settings = load_cache.layout_settings(device, (text_dtype, vision_dtype), int4_kernel, int8_vocab)
        entry = load_cache.Entry.find(directory, model_dir, files, settings)
    cached = entry.read() if entry else None
    if cached is not None and not _layout_fits(model, cached):
        cached = None
    converted = _fill(model, model_dir, text_dtype, vision_dtype, device, _cached_targets(model, cached), progress)
    if cached is not None:
        _restore_layout(model, cached, device)
    finish_quantized_linears(model, text_dtype, int4_kernel, progress)
    if entry is not None and cached is None and (layout := derived_layout(model, converted)):
        written = entry.write(layout)
        if written is not None:
            note(f"qwen2vl: first load of {model_dir} took {time.perf_counter() - started:.1f} s; what it computed "
                 f"({written / 1e9:.2f} GB) is cached in {entry.path}, later loads read it")
    return model.eval()


def derived_layout(model: torch.nn.Module, converted: set[tuple[str, str]] = frozenset()) -> load_cache.Layout:
    """What loading `model` computed beyond reading, by module: each `Int4Linear`'s packed
    tensors, each `Int8VocabTable`'s rows (a tied table once), and the `converted` tensors
    ((module name, attribute) pairs: read into another dtype), listed in the settings."""
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            layout[name] = ({"backend": module.backend}, module.layout())
        elif isinstance(module, Int8VocabTable):
            layout[name] = ({}, {"values": module.values, "scales": module.scales})
    for name, attr in sorted(converted):
        settings, tensors = layout.setdefault(name, ({}, {}))
        settings.setdefault("converted", []).append(attr)
        tensors[attr] = getattr(model.get_submodule(name), attr)
    return layout


def _layout_fits(model: torch.nn.Module, layout: load_cache.Layout) -> bool:
    """Whether a cached layout names this model's modules and tensors as they stand before it is
    restored (a damaged entry may not; it is then ignored and written again)."""
    for name, (settings, tensors) in layout.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return False
        converted = settings.get("converted", [])
        for attr in converted:
            current = getattr(module, attr, None)
            if current is None or attr not in tensors or current.shape != tensors[attr].shape:
                return False
        if "backend" in settings:
            if not (isinstance(module, QuantizedLinear) and settings["backend"] in kernels.INT4_BACKENDS):
                return False
        elif isinstance(module, Int8VocabTable):
            expected = {key: (module.get_buffer(key).shape, module.get_buffer(key).dtype)
                        for key in ("values", "scales")}
            if {key: (tensor.shape, tensor.dtype) for key, tensor in tensors.items()} != expected:
                return False
        elif not converted:
            return False
    return True


def _cached_targets(model: torch.nn.Module, layout: load_cache.Layout | None) -> set[tuple[torch.nn.Module, str]]:
    """(module, checkpoint attribute) of each tensor a cached layout stands in for: a 4-bit
    linear's packed tensors (not its bias, unless converted), a vocabulary table read as int8
    rows, converted tensors."""
    targets = set()
    for name, (settings, tensors) in (layout or {}).items():
        module = model.get_submodule(name)
        if "backend" in settings:
            targets |= {(module, attr) for attr in module.checkpoint_shapes(module.out_features) if attr != "bias"}
        elif isinstance(module, Int8VocabTable):
            targets.add((module, "weight"))
        targets |= {(module, attr) for attr in settings.get("converted", ())}
    return targets


def _restore_layout(model: torch.nn.Module, layout: load_cache.Layout, device: torch.device) -> None:
    """Put a cached layout in place: `Int4Linear`s for the quantized linears it holds, the int8
    rows of the vocabulary table(s), the converted tensors."""
    for name, (settings, tensors) in layout.items():
        tensors = {key: tensor.to(device) for key, tensor in tensors.items()}
        converted = {attr: tensors.pop(attr) for attr in settings.get("converted", ())}
        module = model.get_submodule(name)
        if "backend" in settings:
            parent, _, child = name.rpartition(".")
            module = Int4Linear(module, settings["backend"], tensors)
            setattr(model.get_submodule(parent), child, module)
        elif isinstance(module, Int8VocabTable):
            module.values, module.scales = tensors["values"], tensors["scales"]
        for attr, tensor in converted.items():
            if isinstance(getattr(module, attr), torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            setattr(module, attr, tensor)


def int8_vocabulary(config: Qwen2VLConfig, device: torch.device, text_dtype: torch.dtype,
                    int4_kernel: bool | str) -> bool:
    """Whether the vocabulary table(s) are kept as int8 rows: where a 4-bit checkpoint runs on
    the device's int4 kernel in bfloat16. On the CPU half of such a decode step was the
    151936-row bfloat16 head, which int8 computes ~2.6x faster (docs/benchmarks.md); on the GPU
    the head is the largest single read of a decode step (467 MB in bfloat16, 233 in int8), and
    the 0.22 GiB it saves is what brings the model under the card's memory."""
    return (config.four_bit and text_dtype == torch.bfloat16 and int4_kernel in (True, kernels.own_int4_backend(device))
            and kernels.int8_rows_run(device, text_dtype))


def swap_vocab_tables_int8(model: Qwen2VLForConditionalGeneration, dtype: torch.dtype, device: torch.device) -> None:
    """Empty `Int8VocabTable`s in place of the vocabulary table(s); `_fill` quantizes the rows
    as it reads them. A tied head stays one table, shared by the embedding and the logits."""
    text = model.config.text
    model.language_model.embed_tokens = Int8VocabTable(text.vocab_size, text.hidden_size, dtype, device)
    if not text.tie_word_embeddings:
        model.lm_head = Int8VocabTable(text.vocab_size, text.hidden_size, dtype, device)


def _fill(model: Qwen2VLForConditionalGeneration, model_dir: Path, text_dtype: torch.dtype,
          vision_dtype: torch.dtype, device: torch.device, cached: set[tuple[torch.nn.Module, str]] = frozenset(),
          progress: Callable[[str, int, int], None] | None = None) -> set[tuple[str, str]]:
    """Read every checkpoint tensor into its place, except the (module, attribute) targets
    `cached` (restored from the load cache); returns the (module name, attribute) of the tensors
    read into another dtype than stored. The plan (which references every module) is gone on
    return, so modules replaced afterwards are freed one by one."""
    shards = _shard_keys(model_dir)
    plan = _plan(model, architecture(model.config.model_type).weight_renames, _per_expert_layers(shards))
    _check_keys(plan, shards, model.config.text.tie_word_embeddings)
    reads = [(shard, key, slot) for shard in shards.values() for key in shard.entries
             if (slot := plan.get(original_layout_name(key))) is not None and _target(slot) not in cached]
    names = {module: name for name, module in model.named_modules()}
    total, done, converted = sum(shard.nbytes(key) for shard, key, _ in reads), 0, set()
    for path in shards:
        with open(path, "rb") as f:
            for shard, key, slot in reads:
                if shard.path == path:
                    float_dtype = text_dtype if slot.is_text else vision_dtype
                    slot.fill(shard, f, key, float_dtype, device)
                    if type(slot) is _Slot and slot.read_dtype(shard.dtype(key), float_dtype) != shard.dtype(key):
                        converted.add((names[slot.module], slot.attr))
                    done += shard.nbytes(key)
                    if progress is not None:
                        progress(f"loading {model_dir.name}", done, total)
    return converted


def _target(slot) -> tuple[torch.nn.Module, str]:
    """(module, attribute) a slot fills (a vocabulary table read as int8 rows: its "weight")."""
    return (slot.table, "weight") if isinstance(slot, _Int8RowsSlot) else (slot.module, slot.attr)


def finish_quantized_linears(model: torch.nn.Module, dtype: torch.dtype, int4_kernel: bool | str,
                             progress: Callable[[str, int, int], None] | None = None) -> None:
    """Swap each loaded quantized linear for an `Int4Linear` (if wanted and a kernel runs it),
    else dequantize it to `dtype`; keep FP8 linears in FP8 where the FP8 kernel runs, else
    dequantize them. One layer at a time, so only one layer is ever unpacked."""
    wanted = int4_kernel if isinstance(int4_kernel, str) else None
    # Names, not modules: holding every replaced module would keep its packed tensors alive.
    names = [name for name, module in model.named_modules() if isinstance(module, (QuantizedLinear, FP8Linear))]
    for done, name in enumerate(names):
        if progress is not None:
            progress("converting quantized linears", done, len(names))
        module = model.get_submodule(name)
        if isinstance(module, FP8Linear):
            if int4_kernel is not False and kernels.fp8_kernel_runs(module.weight.device, dtype):
                module.use_kernel_()
            else:
                module.dequantize_(dtype)
            continue
        backend = Int4Linear.backend_for(module, dtype, wanted) if int4_kernel else None
        if backend is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4Linear(module, backend))
        else:
            module.dequantize_(dtype)
    if progress is not None and names:
        progress("converting quantized linears", len(names), len(names))


def default_dtype(config: Qwen2VLConfig, device: torch.device) -> torch.dtype:
    """bfloat16, but float32 on the CPU unless the checkpoint is 4-bit (see `load_model`).

    On the CPU the int4 kernel is ~50x faster on bfloat16 activations than on float32 ones, and
    the 2B AWQ model in bfloat16 with 4-bit linears peaks near 3.2 GiB, against ~9 GiB dequantized
    to float32 (measurements and the accuracy of each path: docs/benchmarks.md).
    """
    return torch.float32 if device.type == "cpu" and not config.four_bit else torch.bfloat16


def compute_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(text decoder dtype, vision tower dtype) for a requested dtype."""
    if dtype == torch.float16:
        return torch.bfloat16, torch.float16
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16 or float16)")
    return dtype, dtype


def swap_quantized_linears(model: torch.nn.Module, quant: QuantConfig,
                           renames: tuple[tuple[str, str], ...] = WEIGHT_RENAMES) -> None:
    """Replace the decoder layers' `Linear`s stored quantized by AWQ / GPTQ / FP8 linears."""
    quant = _original_layout_skips(quant)
    for name, module in list(model.named_modules()):
        if not (isinstance(module, Linear) and name.startswith("language_model.layers.")):
            continue
        if not all(quant.converts(hub) for hub in checkpoint_part_names(name, renames)):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _quantized(module, quant))


def _original_layout_skips(quant: QuantConfig) -> QuantConfig:
    """`quant` with its modules_to_not_convert in the original key layout. They may be in either
    (Qwen3-VL's FP8 cards list `model.language_model.*`); they are compared with checkpoint
    names in the original one, as `checkpoint_part_names` gives."""
    return replace(quant, modules_to_not_convert=tuple(
        original_layout_name(skip) for skip in quant.modules_to_not_convert))


def _quantized(linear: Linear, quant: QuantConfig) -> Linear:
    """The (empty) AWQ / GPTQ / FP8 linear that holds `linear` as `quant` stores it."""
    if quant.method == "fp8":
        return FP8Linear(linear, quant.weight_block_size)
    if quant.method == "awq":
        return AWQLinear(linear, quant.bits, quant.group_size)
    return GPTQLinear(linear, quant.bits, quant.group_size, zero_offset=1 if quant.checkpoint_format == "gptq" else 0)


@dataclass
class _Slot:
    """Where one checkpoint tensor goes: all of `module.<attr>`, or one part along `dim`."""

    module: torch.nn.Module
    attr: str
    shape: tuple[int, ...]  # expected checkpoint shape
    dim: int | None = None  # part dim of a fused tensor (None: the whole tensor)
    offset: int = 0
    is_text: bool = True
    shared: bool = False  # one tensor for all parts of a fused projection (GPTQ g_idx): must agree

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The dtype the module keeps this tensor in whatever the compute dtype (FP8 weights and
        their scales), else None."""
        return getattr(self.module, "stored_dtypes", {}).get(self.attr)

    def check_dtype(self, key: str, stored: torch.dtype) -> None:
        """FP8 values must be stored as such: any other float would be read as if it were (called
        for every tensor before any is read)."""
        if self.stored_dtype == q.FP8_DTYPE and stored != q.FP8_DTYPE:
            raise CheckpointError(f"tensor {key}: expected {q.FP8_DTYPE} (config.json's quantization_config says "
                                  f"FP8), found {stored}")

    def read_dtype(self, stored: torch.dtype, float_dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor stored in `stored` is read into. Quantization scales keep their
        stored precision (FP8's are read as float32); other float tensors take the compute dtype."""
        return self.stored_dtype or (float_dtype if stored.is_floating_point and self.attr != "scales" else stored)

    def fill(self, shard: "_Shard", f, key: str, float_dtype: torch.dtype, device: torch.device) -> None:
        target = getattr(self.module, self.attr)
        stored = shard.dtype(key)
        if stored.is_floating_point != target.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key}: expected dtype {target.dtype}, found {stored}")
        tensor = shard.read(f, key, self.read_dtype(stored, float_dtype))
        if self.dim is None:
            if self.shared and not target.is_meta and not torch.equal(target.cpu(), tensor):
                raise CheckpointError(f"tensor {key}: differs from the other parts of its fused projection")
            self._set(tensor.reshape(target.shape).to(device))
            return
        if target.is_meta:
            target = self._set(torch.empty(target.shape, dtype=tensor.dtype, device=device))
        target.narrow(self.dim, self.offset, tensor.shape[self.dim]).copy_(tensor)

    def _set(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(getattr(self.module, self.attr), torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
        setattr(self.module, self.attr, tensor)
        return tensor


@dataclass
class _StackedExpertsSlot:
    """Where a mixture-of-experts layer's stacked `gate_up_proj` or `down_proj` goes. Ours is
    `[E, N, K]` (each expert's `Linear` weight); the published checkpoints store `[E, K, N]`
    (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`), transformers' `save_pretrained` writes
    ours: both are read. Which one a layer holds is told by its shapes: `_check_keys` calls
    `check` for both tensors of a layer, which share `layout`. One of them is always
    telling (gate_up is square only where H = 2I, down only where H = I)."""

    module: Experts
    attr: str
    layout: dict  # "transposed": whether the layer's tensors are stored [E, K, N]; shared by its two slots
    is_text: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        """The published shape (what a missing tensor's message names)."""
        experts, n, k = getattr(self.module, self.attr).shape
        return experts, k, n

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        ours = tuple(getattr(self.module, self.attr).shape)
        if shape not in (self.shape, ours):
            raise CheckpointError(f"tensor {key}: expected shape {list(self.shape)} (or {list(ours)}, as "
                                  f"transformers' save_pretrained writes it), found {list(shape)}")
        if self.shape == ours:
            return  # square: the layer's other tensor tells
        transposed = shape == self.shape
        if self.layout.setdefault("transposed", transposed) != transposed:
            raise CheckpointError(f"tensor {key}: stored {'[E, K, N]' if transposed else '[E, N, K]'}, "
                                  "unlike the other expert tensor of its layer")

    def fill(self, shard: "_Shard", f, key: str, float_dtype: torch.dtype, device: torch.device) -> None:
        if not shard.dtype(key).is_floating_point:
            raise CheckpointError(f"tensor {key}: expected float expert weights, found {shard.dtype(key)}")
        tensor = shard.read(f, key, float_dtype)
        target = torch.empty(getattr(self.module, self.attr).shape, dtype=float_dtype, device=device)
        target.copy_(tensor.transpose(1, 2) if self.layout["transposed"] else tensor)
        setattr(self.module, self.attr, torch.nn.Parameter(target, requires_grad=False))


class _ExpertStaging:
    """One expert's projection as a checkpoint stores it on its own (`experts.<e>.gate_proj` with
    `up_proj`, or `down_proj`; unquantized, AWQ, GPTQ or FP8): its tensors are read into an empty
    linear of that format, and once the last one is in, its exact dequantization (its weight, if
    unquantized) is copied to the expert's row of the stacked tensor in the decoder's dtype, and
    the linear emptied again (so only the projections being read are ever held twice)."""

    def __init__(self, experts: Experts, attr: str, expert: int, linear: Linear):
        self.experts, self.attr, self.expert, self.linear = experts, attr, expert, linear
        self.unread = 0  # tensors of `linear` not yet read

    def tensor_read(self, float_dtype: torch.dtype, device: torch.device) -> None:
        self.unread -= 1
        if self.unread:
            return
        quantized = isinstance(self.linear, (QuantizedLinear, FP8Linear))
        weight = self.linear.dequantized() if quantized else self.linear.weight
        stacked = getattr(self.experts, self.attr)
        if stacked.is_meta:
            stacked = torch.nn.Parameter(torch.empty(stacked.shape, dtype=float_dtype, device=device),
                                         requires_grad=False)
            setattr(self.experts, self.attr, stacked)
        stacked[self.expert].copy_(weight)
        self.linear.to("meta")


@dataclass
class _PerExpertSlot(_Slot):
    """A `_Slot` of an `_ExpertStaging`'s linear."""

    staging: _ExpertStaging | None = None

    def fill(self, shard: "_Shard", f, key: str, float_dtype: torch.dtype, device: torch.device) -> None:
        super().fill(shard, f, key, float_dtype, device)
        self.staging.tensor_read(float_dtype, device)


def _expert_slots(name: str, module: Experts, renames: tuple[tuple[str, str], ...],
                  quant: QuantConfig | None = None, per_expert: bool = False) -> dict[str, _Slot | _StackedExpertsSlot]:
    """Checkpoint name -> slot of the expert weights of `module` (named `name` in the model): the
    two stacked tensors, or, where the checkpoint stores them one per expert (`per_expert`, and
    always where `quant` quantizes them), each expert's projections, as
    `<name>.<e>.(gate_proj|up_proj|down_proj).<tensor>`."""
    hub = checkpoint_name(name, renames)
    quant = quant and _original_layout_skips(quant)
    if quant and quant.converts(f"{hub}.0.gate_proj"):
        per_expert = True
    if not per_expert:
        layout = {}
        return {f"{hub}.{attr}": _StackedExpertsSlot(module, attr, layout) for attr in ("gate_up_proj", "down_proj")}
    num_experts, hidden, intermediate = module.down_proj.shape
    slots = {}
    for expert in range(num_experts):
        for attr, in_features, out_features in (("gate_up_proj", hidden, [intermediate] * 2),
                                                ("down_proj", intermediate, hidden)):
            parts = checkpoint_part_names(f"{hub}.{expert}.{attr}", renames=())
            with torch.device("meta"):
                linear = Linear(in_features, out_features)
                if quant and all(quant.converts(part) for part in parts):
                    linear = _quantized(linear, quant)
            staging = _ExpertStaging(module, attr, expert, linear)
            linear_slots = _linear_slots(linear, parts, True, _PerExpertSlot, staging=staging)
            staging.unread = len(linear_slots)
            slots.update(linear_slots)
    return slots


def _per_expert_layers(shards: dict[Path, "_Shard"]) -> set[str]:
    """Checkpoint names (original layout) of the expert modules whose experts are stored one by one."""
    numbered = re.compile(r"^(.*mlp\.experts)\.\d+\.")
    return {match[1] for shard in shards.values() for key in shard.entries
            if (match := numbered.match(original_layout_name(key)))}


@dataclass
class _Int8RowsSlot:
    """Where a vocabulary table goes when it is kept in int8: read and quantized a block of rows
    at a time, so that no whole-table copy in a float dtype is ever made."""

    table: Int8VocabTable
    shape: tuple[int, ...]
    is_text: bool = True
    block_rows = 8192

    def fill(self, shard: "_Shard", f, key: str, float_dtype: torch.dtype, device: torch.device) -> None:
        if not shard.dtype(key).is_floating_point:
            raise CheckpointError(f"tensor {key}: expected a float table, found {shard.dtype(key)}")
        for start in range(0, self.shape[0], self.block_rows):
            rows = shard.read(f, key, torch.float32, start, min(self.block_rows, self.shape[0] - start))
            self.table.fill_rows(start, rows.to(device))


def _linear_slots(module: Linear, parts: list[str], is_text: bool, slot_class: type[_Slot] = _Slot,
                  **fields) -> dict[str, _Slot]:
    """Checkpoint name -> slot, for each tensor of (possibly fused) `module` stored as `parts`."""
    slots = {}
    for attr in module.checkpoint_shapes(module.out_features):
        dim = module.part_dims[attr] if len(parts) > 1 else None
        offset = 0
        for part, size in zip(parts, module.output_sizes):
            shape = module.checkpoint_shapes(size)[attr]
            slots[f"{part}.{attr}"] = slot_class(module, attr, shape, dim, offset, is_text,
                                                 shared=len(parts) > 1 and dim is None, **fields)
            offset += shape[dim] if dim is not None else 0
    return slots


def _plan(model: torch.nn.Module, renames: tuple[tuple[str, str], ...],
          per_expert_layers: set[str] = frozenset()) -> dict[str, _Slot | _Int8RowsSlot]:
    """Checkpoint name (original layout) -> slot, for every tensor the model needs.
    `per_expert_layers` names the expert modules the checkpoint stores one per expert."""
    plan = {}
    placed = set()  # our names of the tensors placed by their module's slots
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            placed.update(f"{name}.{attr}" for attr in module.checkpoint_shapes(module.out_features))
            plan.update(_linear_slots(module, checkpoint_part_names(name, renames), not name.startswith("visual.")))
        elif isinstance(module, Experts):
            placed.update(f"{name}.{attr}" for attr in ("gate_up_proj", "down_proj"))
            per_expert = checkpoint_name(name, renames) in per_expert_layers
            plan.update(_expert_slots(name, module, renames, model.config.quant, per_expert))
    for name, tensor in model.named_parameters():
        if name not in placed:
            module_name, _, attr = name.rpartition(".")
            plan[checkpoint_name(name, renames)] = _Slot(model.get_submodule(module_name), attr, tuple(tensor.shape),
                                          is_text=not name.startswith("visual."))
    for name, module in model.named_modules():
        if isinstance(module, Int8VocabTable):
            plan[checkpoint_name(f"{name}.weight", renames)] = _Int8RowsSlot(module, tuple(module.values.shape))
    patch = plan["visual.patch_embed.proj.weight"]
    vision = model.config.vision
    patch.shape = (vision.embed_dim, vision.in_channels, vision.temporal_patch_size,
                   vision.patch_size, vision.patch_size)
    return plan


def checkpoint_name(name: str, renames: tuple[tuple[str, str], ...] = WEIGHT_RENAMES) -> str:
    """Our parameter name -> the checkpoint's (original layout), by an architecture's `renames`
    (prefixes, first match wins; a `*` in a prefix matches one index, kept in the checkpoint's)."""
    for ours, theirs in renames:
        if "*" in ours:
            match = re.match(re.escape(ours).replace(r"\*", r"(\d+)"), name)
            if match:
                return theirs.replace("*", match.group(1)) + name[match.end():]
        elif name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def checkpoint_part_names(module_name: str, renames: tuple[tuple[str, str], ...] = WEIGHT_RENAMES) -> list[str]:
    """Checkpoint module names that make up our (possibly fused) linear `module_name`."""
    hub = checkpoint_name(module_name, renames)
    prefix, _, last = hub.rpartition(".")
    return [f"{prefix}.{part}" for part in _FUSED_PARTS[last]] if last in _FUSED_PARTS else [hub]


def original_layout_name(key: str) -> str:
    """A key of transformers' current layout -> the original layout of the hub checkpoints."""
    for new, old in _LAYOUTS:
        if key.startswith(new):
            return old + key[len(new):]
    return key


_READ_CHUNK_BYTES = 64 * 1024**2
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I32": torch.int32, "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8,
                       "F8_E4M3": torch.float8_e4m3fn}


@dataclass
class _Shard:
    """One safetensors file: its header entries and where its data starts."""

    path: Path
    entries: dict[str, dict]
    data_start: int

    @classmethod
    def open(cls, path: Path) -> "_Shard":
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        return cls(path, header, 8 + header_len)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self.entries[key]["data_offsets"]
        return end - begin

    def dtype(self, key: str) -> torch.dtype:
        name = self.entries[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key}: dtype {name} is not supported")
        return _SAFETENSORS_DTYPES[name]

    def read(self, f, key: str, dtype: torch.dtype, first_row: int = 0, num_rows: int | None = None) -> torch.Tensor:
        """The tensor (or `num_rows` of its rows from `first_row`), converted to `dtype` chunk by
        chunk (no full-size copy in the stored dtype)."""
        stored = self.dtype(key)
        begin, end = self.entries[key]["data_offsets"]
        shape = self.shape(key)
        if math.prod(shape) * stored.itemsize != end - begin:
            raise CheckpointError(f"tensor {key}: {self.path.name} header gives {end - begin} bytes for shape {list(shape)}")
        row_bytes = math.prod(shape[1:]) * stored.itemsize
        out = torch.empty((shape[0] if num_rows is None else num_rows, *shape[1:]), dtype=dtype)
        flat = out.view(-1)
        f.seek(self.data_start + begin + first_row * row_bytes)
        step = max(1, _READ_CHUNK_BYTES // stored.itemsize)
        for start in range(0, flat.numel(), step):
            part = flat[start: start + step]
            raw = part.view(torch.uint8) if stored == dtype else torch.empty(part.numel() * stored.itemsize, dtype=torch.uint8)
            if f.readinto(raw.numpy()) != raw.numel():
                raise CheckpointError(f"tensor {key}: {self.path.name} is truncated")
            if stored != dtype:
                part.copy_(raw.view(stored))
        return out


def _shard_keys(model_dir: Path) -> dict[Path, _Shard]:
    """Safetensors files of the checkpoint, single or sharded with an index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    shards = {}
    for file in files:
        path = model_dir / file
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: shard {file} listed in the index is missing")
        shards[path] = _Shard.open(path)
    return shards


def _check_keys(plan: dict[str, _Slot], shards: dict[Path, _Shard], tied: bool) -> None:
    """Refuse missing, unexpected and wrongly shaped tensors before reading any of them."""
    seen = set()
    for shard in shards.values():
        for key in shard.entries:
            name = original_layout_name(key)
            if _IGNORED.search(name) or (tied and name == "lm_head.weight"):
                continue
            slot = plan.get(name)
            if slot is None:
                packed = name.removesuffix(".weight") + ".qweight"
                if packed in plan:
                    raise CheckpointError(f"tensor {key} is stored unquantized, but config.json's "
                                          f"quantization_config says it is quantized (expected {packed})")
                raise CheckpointError(f"tensor {key} in {shard.path.name} is not part of this model "
                                      "(wrong architecture or quantization config?)")
            if isinstance(slot, _StackedExpertsSlot):
                slot.check(key, shard.shape(key))
            elif shard.shape(key) != slot.shape:
                raise CheckpointError(f"tensor {key}: expected shape {list(slot.shape)}, "
                                      f"found {list(shard.shape(key))}")
            if isinstance(slot, _Slot):
                slot.check_dtype(key, shard.dtype(key))
            seen.add(name)
    missing = [name for name in plan if name not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]}"
                              f" [expected shape {list(plan[missing[0]].shape)}]"
                              + (f"; also missing {missing[1:5]}{more}" if len(missing) > 1 else ""))
