"""Model configuration, parsed once from a checkpoint's `config.json`.

Two layouts exist on the hub: the original flat one (text settings at the top level, a partial
`vision_config` with old key names, `rope_scaling`) and the one current transformers writes
(`text_config` / `vision_config`, `rope_parameters`). Both parse to the same dataclasses.

The text settings are common to every architecture of the family; the vision settings are the
architecture's (`VISION_CONFIGS`, by `model_type`). This module is plain data: it imports nothing
of the model, so the processor and the tools can read a config without it; the model half of an
architecture (model class, checkpoint names) is `qwen2vl.model.registry`'s.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2vl.errors import CheckpointError

DEFAULT_CONTEXT_LEN = 32768  # Qwen2-VL's max_position_embeddings, where a config.json gives none
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Old vision key names of the flat layout -> current names.
VISION_ALIASES = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of a mixture-of-experts decoder (Qwen3-VL-MoE's `text_config`): each token
    goes to the `num_experts_per_tok` experts its router scores highest, their outputs weighted
    by the router's softmax (renormalized over the chosen ones where `norm_topk_prob`)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # one expert's SwiGLU width
    decoder_sparse_step: int = 1  # every this-many-th layer is sparse ...
    mlp_only_layers: tuple[int, ...] = ()  # ... except these, which keep the dense MLP
    # Published configs say true; transformers 5.17 and Qwen's reference renormalize without reading it.
    norm_topk_prob: bool = True

    def is_sparse_layer(self, layer_index: int) -> bool:
        """Whether decoder layer `layer_index` (from 0) has the sparse MLP (else the dense one)."""
        return layer_index not in self.mlp_only_layers and (layer_index + 1) % self.decoder_sparse_step == 0

    @classmethod
    def from_dict(cls, t: dict) -> "MoEConfig | None":
        """From the text settings; None where they name no experts (a dense decoder).
        `num_local_experts` is the name transformers 5.17's `save_pretrained` writes."""
        num_experts = t.get("num_experts", t.get("num_local_experts")) or 0
        if num_experts <= 0:
            return None
        missing = [k for k in ("num_experts_per_tok", "moe_intermediate_size") if k not in t]
        if missing:
            raise CheckpointError(f"config.json: text settings with num_experts lack {missing}")
        config = cls(num_experts, t["num_experts_per_tok"], t["moe_intermediate_size"],
                     t.get("decoder_sparse_step", 1), tuple(t.get("mlp_only_layers") or ()),
                     bool(t.get("norm_topk_prob", True)))
        if not 1 <= config.num_experts_per_tok <= num_experts:
            raise CheckpointError(f"config.json: num_experts_per_tok {config.num_experts_per_tok} must be between 1 "
                                  f"and num_experts {num_experts}")
        if config.moe_intermediate_size <= 0 or config.decoder_sparse_step <= 0:
            raise CheckpointError(f"config.json: moe_intermediate_size {config.moe_intermediate_size} and "
                                  f"decoder_sparse_step {config.decoder_sparse_step} must be positive")
        return config


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool = False  # RMSNorm of each query and key head before rotary (Qwen3)
    attention_bias: bool = True  # bias on the q/k/v projections (Qwen2's; Qwen3's have none)
    # M-RoPE bands: False gives each axis one contiguous chunk of `mrope_section` bands (Qwen2-VL),
    # True deals them out T, H, W, T, H, W, ... (Qwen3-VL, see `layers.rotary.mrope_band_axes`)
    mrope_interleaved: bool = False
    moe: MoEConfig | None = None  # the sparse MLP's settings; None: every layer's MLP is dense


@dataclass(frozen=True)
class VisionConfig:
    """Qwen2-VL's vision settings: `embed_dim` is the tower's width, `hidden_size` the merger's output."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # output width of the patch merger: the text model's hidden size
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def video_tokens_per_second(self) -> float | None:
        """Video M-RoPE: None where temporal positions advance by one per temporal patch (Qwen2-VL),
        else by this many per second of video (Qwen2.5-VL's `tokens_per_second`)."""
        return None

    @property
    def video_timestamps(self) -> bool:
        """Whether a video's prompt gives each temporal patch its time as text (`<t seconds>`)
        instead of time-aligned positions (Qwen3-VL)."""
        return False

    @classmethod
    def from_dict(cls, v: dict, text_hidden_size: int | None = None) -> "VisionConfig":
        """`vision_config` of config.json (old key names too); the merger's output (`hidden_size`)
        defaults to the text model's hidden size where it is given."""
        v = {VISION_ALIASES.get(k, k): val for k, val in v.items()}
        return cls._checked({k: v[k] for k in cls.__dataclass_fields__ if k in v}, v, text_hidden_size)

    @classmethod
    def _checked(cls, fields: dict, v: dict, text_hidden_size: int | None):
        """`cls(**fields)` with the rotary base of `v`'s `rope_parameters`, its head width checked."""
        if text_hidden_size is not None:
            fields.setdefault("hidden_size", text_hidden_size)
        if "rope_parameters" in v:
            fields["rope_theta"] = v["rope_parameters"].get("rope_theta", cls.rope_theta)
        config = cls(**fields)
        if config.embed_dim % config.num_heads or config.head_dim % 4:
            raise CheckpointError(f"config.json: vision embed_dim {config.embed_dim} / num_heads {config.num_heads} "
                                  "must give a head_dim divisible by 4 (2D rotary)")
        return config


@dataclass(frozen=True)
class Qwen2_5_VisionConfig(VisionConfig):
    """Qwen2.5-VL's vision settings: in its config.json `hidden_size` is the tower's own width
    (`embed_dim` here) and `out_hidden_size` the merger's output. Defaults are transformers'
    `Qwen2_5_VLVisionConfig`'s; published checkpoints set them all."""

    embed_dim: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    window_size: int = 112  # pixels on a side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 4

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def window_merged_tokens(self) -> int:
        """A window's side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def video_tokens_per_second(self) -> float | None:
        return self.tokens_per_second

    @classmethod
    def from_dict(cls, v: dict, text_hidden_size: int | None = None) -> "Qwen2_5_VisionConfig":
        v = {VISION_ALIASES.get(k, k): val for k, val in v.items()}
        renamed = {"hidden_size": "embed_dim", "out_hidden_size": "hidden_size"}
        fields = {renamed.get(k, k): val for k, val in v.items() if renamed.get(k, k) in cls.__dataclass_fields__}
        fields["fullatt_block_indexes"] = tuple(fields.get("fullatt_block_indexes", cls.fullatt_block_indexes))
        config = cls._checked(fields, v, text_hidden_size)
        if config.hidden_act != "silu":
            raise CheckpointError(f"config.json: vision hidden_act {config.hidden_act!r} is not supported "
                                  "(Qwen2.5-VL's gated MLP is 'silu')")
        if config.window_merged_tokens < 1:
            raise CheckpointError(f"config.json: vision window_size {config.window_size} is smaller than one merged "
                                  f"token ({config.spatial_merge_size * config.patch_size} pixels)")
        return config


@dataclass(frozen=True)
class Qwen3VisionConfig(VisionConfig):
    """Qwen3-VL's vision settings: as in Qwen2.5-VL's config.json, `hidden_size` is the tower's
    width (`embed_dim` here) and `out_hidden_size` the merger's output. The patch embedding has a
    bias; learned position embeddings (`num_position_embeddings`, a square grid) are resampled to
    each image's grid; the blocks after `deepstack_visual_indexes` feed DeepStack mergers whose
    outputs are added to the first decoder layers' hidden states. Defaults are transformers'
    `Qwen3VLVisionConfig`'s; published checkpoints set them all."""

    depth: int = 27
    embed_dim: int = 1152
    hidden_size: int = 3584
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)

    @property
    def mlp_hidden_size(self) -> int:
        return self.intermediate_size

    @property
    def position_grid_side(self) -> int:
        """Side of the square grid of learned position embeddings."""
        return math.isqrt(self.num_position_embeddings)

    @property
    def video_timestamps(self) -> bool:
        return True

    @classmethod
    def from_dict(cls, v: dict, text_hidden_size: int | None = None) -> "Qwen3VisionConfig":
        v = {VISION_ALIASES.get(k, k): val for k, val in v.items()}
        renamed = {"hidden_size": "embed_dim", "out_hidden_size": "hidden_size"}
        fields = {renamed.get(k, k): val for k, val in v.items() if renamed.get(k, k) in cls.__dataclass_fields__}
        fields["deepstack_visual_indexes"] = tuple(fields.get("deepstack_visual_indexes", cls.deepstack_visual_indexes))
        config = cls._checked(fields, v, text_hidden_size)
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise CheckpointError(f"config.json: vision hidden_act {config.hidden_act!r} is not supported "
                                  "(Qwen3-VL's is 'gelu_pytorch_tanh')")
        if config.position_grid_side**2 != config.num_position_embeddings:
            raise CheckpointError(f"config.json: vision num_position_embeddings {config.num_position_embeddings} "
                                  "is not a square (the learned positions form a square grid)")
        bad = [i for i in config.deepstack_visual_indexes if not 0 <= i < config.depth]
        if bad:
            raise CheckpointError(f"config.json: vision deepstack_visual_indexes {bad} are not blocks of the "
                                  f"tower (depth {config.depth})")
        return config


# The vision settings of each architecture, by config.json `model_type`: the one part of its
# config.json that differs. The rest of an architecture (its model class, checkpoint names) is
# `qwen2vl.model.registry`'s, which lists the same model types.
VISION_CONFIGS: dict[str, type[VisionConfig]] = {"qwen2_vl": VisionConfig, "qwen2_5_vl": Qwen2_5_VisionConfig,
                                                  "qwen3_vl": Qwen3VisionConfig, "qwen3_vl_moe": Qwen3VisionConfig}
# Architectures whose decoder is Qwen3's: q/k RMSNorm per head, no q/k/v bias, interleaved M-RoPE.
QWEN3_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


def vision_config_class(model_type: str) -> type[VisionConfig]:
    """The vision settings of `model_type`'s architecture; a `CheckpointError` names the supported ones."""
    if model_type not in VISION_CONFIGS:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported "
                              f"(expected one of {', '.join(map(repr, VISION_CONFIGS))})")
    return VISION_CONFIGS[model_type]


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the text decoder's linears.

    `method` is "awq" (GEMM packing, with zero points), "gptq" (packed along the input
    dimension; `checkpoint_format` "gptq" stores zeros minus one, "gptq_v2" does not) or "fp8"
    (Qwen's `*-FP8` releases: e4m3 weights with one float32 scale per `weight_block_size`
    block, `[out, in]`; activations are not quantized: "dynamic" is the only scheme, and
    nothing of it is stored).
    """

    method: str
    bits: int
    group_size: int  # -1: one group spanning the whole input dimension
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    modules_to_not_convert: tuple[str, ...] = ()
    weight_block_size: tuple[int, int] | None = None  # fp8: (out, in) rows and columns of one scale

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        method = str(d.get("quant_method", "")).lower()
        bits = d.get("bits", d.get("w_bit"))
        group_size = d.get("group_size", d.get("q_group_size", -1))
        skip = tuple(d.get("modules_to_not_convert") or ())
        if method == "awq":
            version = str(d.get("version", "gemm")).lower()
            if version != "gemm":
                raise CheckpointError(f"quantization_config: AWQ version {version!r} is not supported "
                                      "(expected 'gemm')")
            if bits != 4:
                raise CheckpointError(f"quantization_config: AWQ with bits={bits} is not supported (expected 4)")
            if not d.get("zero_point", True):
                raise CheckpointError("quantization_config: AWQ without zero points is not supported")
            return cls("awq", 4, group_size, modules_to_not_convert=skip)
        if method == "gptq":
            if bits not in (4, 8):
                raise CheckpointError(f"quantization_config: GPTQ with bits={bits} is not supported "
                                      "(expected 4 or 8)")
            fmt = str(d.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise CheckpointError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not supported "
                                      "(expected 'gptq' or 'gptq_v2')")
            return cls("gptq", bits, group_size, desc_act=bool(d.get("desc_act", False)),
                       sym=bool(d.get("sym", True)), checkpoint_format=fmt, modules_to_not_convert=skip)
        if method == "fp8":
            return cls("fp8", 8, -1, modules_to_not_convert=skip, weight_block_size=_fp8_block_size(d))
        raise CheckpointError(f"quantization_config: unknown quant_method {d.get('quant_method')!r} "
                              "(supported: 'awq', 'gptq', 'fp8')")

    def converts(self, module_name: str) -> bool:
        """Whether the linear of this (checkpoint-layout) name is stored quantized: no entry of
        `modules_to_not_convert` is a run of its dotted parts ("visual" skips "visual.blocks.0.mlp.fc1";
        a router "mlp.gate" does not skip "mlp.gate_proj")."""
        dotted = f".{module_name}."
        return not any(f".{skip}." in dotted for skip in self.modules_to_not_convert)


def _fp8_block_size(d: dict) -> tuple[int, int]:
    """`weight_block_size` of an fp8 `quantization_config`, its format and activation scheme checked."""
    fmt = str(d.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise CheckpointError(f"quantization_config: FP8 fmt {d.get('fmt')!r} is not supported (expected 'e4m3')")
    scheme = str(d.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise CheckpointError(f"quantization_config: FP8 activation_scheme {d.get('activation_scheme')!r} is not "
                              "supported (expected 'dynamic')")
    scale_fmt = str(d.get("scale_fmt", "float")).lower()
    if scale_fmt != "float":
        raise CheckpointError(f"quantization_config: FP8 scale_fmt {d.get('scale_fmt')!r} is not supported "
                              "(expected 'float')")
    block = d.get("weight_block_size")
    if block is None:
        raise CheckpointError("quantization_config: FP8 without weight_block_size (one scale per tensor) is not "
                              "supported (expected block scales, e.g. [128, 128])")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config: FP8 weight_block_size {block!r} must be two positive "
                              "integers [rows, columns]")
    return tuple(block)


@dataclass(frozen=True)
class ProcessorSettings:
    """What a `Processor` takes from the checkpoint's config.json."""

    context_len: int = DEFAULT_CONTEXT_LEN  # max_position_embeddings
    tokens_per_second: float | None = None  # the vision settings' `video_tokens_per_second`
    # (image, video, vision start, vision end) ids the model reads, checked against the tokenizer's;
    # None: the tokenizer's are taken as they are
    vision_token_ids: tuple[int, int, int, int] | None = None
    video_timestamps: bool = False  # the vision settings' `video_timestamps`

    @classmethod
    def from_pretrained(cls, model_dir) -> "ProcessorSettings":
        """Read from `model_dir`'s config.json (the defaults without one) only what a processor uses:
        the architecture (`model_type`), its vision settings and the context length. A processor
        loaded with its model gets them from `Qwen2VLConfig.processor_settings` instead."""
        d = read_config_json(model_dir) or {}
        vision = vision_config_class(d.get("model_type", "qwen2_vl")).from_dict(d.get("vision_config") or {})
        return cls(int(_text_settings(d).get("max_position_embeddings") or DEFAULT_CONTEXT_LEN),
                   vision.video_tokens_per_second, video_timestamps=vision.video_timestamps)


@dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    quant: QuantConfig | None
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_id: int
    torch_dtype: torch.dtype  # the checkpoint's storage dtype
    model_type: str = "qwen2_vl"  # the architecture (`qwen2vl.model.registry`)

    @property
    def four_bit(self) -> bool:
        """Whether the decoder's linears are stored in 4 bits (AWQ / GPTQ)."""
        return self.quant is not None and self.quant.bits == 4

    @property
    def processor_settings(self) -> ProcessorSettings:
        return ProcessorSettings(self.text.max_position_embeddings, self.vision.video_tokens_per_second,
                                 (self.image_token_id, self.video_token_id, self.vision_start_token_id,
                                  self.vision_end_token_id), video_timestamps=self.vision.video_timestamps)

    @classmethod
    def from_pretrained(cls, model_dir) -> "Qwen2VLConfig":
        d = read_config_json(model_dir)
        if d is None:
            raise CheckpointError(f"{model_dir}: no config.json")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2VLConfig":
        model_type = d.get("model_type", "qwen2_vl")
        vision_class = vision_config_class(model_type)
        text = _text_settings(d)
        quant = d.get("quantization_config") or text.get("quantization_config")
        eos = d.get("eos_token_id", text.get("eos_token_id", 151645))
        dtype_name = d.get("torch_dtype") or d.get("dtype") or text.get("torch_dtype") or text.get("dtype")
        if dtype_name is not None and dtype_name not in _DTYPES:
            raise CheckpointError(f"config.json: torch_dtype {dtype_name!r} is not supported "
                                  f"(expected one of {sorted(_DTYPES)})")
        text_config = _text_config(text, tied=bool(d.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings")),
                                   qwen3=model_type in QWEN3_MODEL_TYPES)
        if (text_config.moe is not None) != (model_type == "qwen3_vl_moe"):
            raise CheckpointError(f"config.json: model_type {model_type!r} " + (
                "needs the experts' settings (num_experts, num_experts_per_tok, moe_intermediate_size)"
                if text_config.moe is None else f"has no experts, but num_experts is {text_config.moe.num_experts}"))
        return cls(
            text=text_config,
            vision=vision_class.from_dict(d.get("vision_config", {}), text["hidden_size"]),
            quant=QuantConfig.from_dict(quant) if quant else None,
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            torch_dtype=_DTYPES[dtype_name or "bfloat16"],
            model_type=model_type,
        )


def read_config_json(model_dir) -> dict | None:
    """`model_dir`'s config.json, parsed; None where there is none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _text_settings(d: dict) -> dict:
    """Newer layouts nest the text settings (`text_config`); the flat layout keeps them at the top level."""
    return {**d, **(d.get("text_config") or {})}


def _text_config(t: dict, tied: bool, qwen3: bool = False) -> TextConfig:
    """The text settings; `qwen3`: the decoder is Qwen3's (see `QWEN3_MODEL_TYPES`)."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in t]
    if missing:
        raise CheckpointError(f"config.json: missing text settings {missing}")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    num_heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // num_heads
    if qwen3 and t.get("attention_bias"):
        raise CheckpointError("config.json: attention_bias true is not supported for a Qwen3 decoder "
                              "(published Qwen3-VL checkpoints have none)")
    mrope_section = tuple(rope.get("mrope_section", (16, 24, 24)))
    if sum(mrope_section) != head_dim // 2 or len(mrope_section) != 3:
        raise CheckpointError(f"config.json: mrope_section {list(mrope_section)} must have 3 parts summing to "
                              f"head_dim / 2 = {head_dim // 2}")
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=t.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 1000000.0)),
        mrope_section=mrope_section,
        max_position_embeddings=t.get("max_position_embeddings", DEFAULT_CONTEXT_LEN),
        tie_word_embeddings=tied,
        qk_norm=qwen3,
        attention_bias=not qwen3,
        # transformers 5.17 interleaves Qwen3-VL's bands whatever the flag; published configs set it true
        mrope_interleaved=bool(rope.get("mrope_interleaved", qwen3)),
        moe=MoEConfig.from_dict(t),
    )
