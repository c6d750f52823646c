"""Tiny random Qwen2-VL checkpoints written by transformers, and batch metadata for tests.

The init is scaled (embeddings std 1, untied lm_head 0.3, matrices 0.08) so that logits are far
from uniform and a wrong rotary section, head grouping or weight mapping changes greedy outputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qwen2vl.layers.attention_metadata import AttentionMetadata
from qwen2vl.tools.random_checkpoint import write_support_files

VOCAB_SIZE = 151936  # the real vocabulary: prompts use real special ids such as <|image_pad|>

# Each variant changes the GQA ratio, M-RoPE sections, depth and widths; merge size stays 2.
VARIANTS: dict[str, dict] = {
    "a": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(embed_dim=32, num_heads=2, depth=2, mlp_ratio=4),
        tie_word_embeddings=False,
    ),
    "b": dict(
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=1, mrope_section=[4, 2, 2]),
        vision=dict(embed_dim=48, num_heads=3, depth=1, mlp_ratio=2),
        tie_word_embeddings=True,
    ),
    "c": dict(
        text=dict(hidden_size=128, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, mrope_section=[4, 6, 6]),
        vision=dict(embed_dim=64, num_heads=4, depth=3, mlp_ratio=3),
        tie_word_embeddings=False,
    ),
}


def reference_config(variant: str = "a"):
    """The transformers `Qwen2VLConfig` of a tiny variant."""
    from transformers import Qwen2VLConfig

    spec = VARIANTS[variant]
    text = dict(spec["text"])
    mrope_section = text.pop("mrope_section")
    text.update(vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section})
    vision = dict(spec["vision"], hidden_size=spec["text"]["hidden_size"], patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision,
                           tie_word_embeddings=spec["tie_word_embeddings"])
    config.text_config.tie_word_embeddings = spec["tie_word_embeddings"]
    return config


def scale_init_(model: torch.nn.Module, seed: int, tied: bool) -> None:
    """Overwrite every parameter with the scaled random init (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                std = 1.0
            elif name.startswith("lm_head"):
                std = 0.3
            elif param.ndim >= 2:
                std = 0.08
            elif name.endswith("bias"):
                std = 0.05
            else:  # RMSNorm / LayerNorm weights
                param.fill_(1.0)
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    if tied:
        model.tie_weights()


def build_reference_model(variant: str = "a", seed: int = 0):
    """A fp32 `transformers.Qwen2VLForConditionalGeneration` with the scaled random init."""
    from transformers import Qwen2VLForConditionalGeneration

    config = reference_config(variant)
    config._attn_implementation = "sdpa"
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    scale_init_(model, seed, tied=VARIANTS[variant]["tie_word_embeddings"])
    return model


def write_tiny_checkpoint(out_dir, variant: str = "a", seed: int = 0) -> Path:
    """Save a tiny random model with `save_pretrained` plus tokenizer and processor files."""
    out_dir = Path(out_dir)
    model = build_reference_model(variant, seed)
    model.save_pretrained(out_dir)
    write_support_files(out_dir)
    return out_dir


# --- batch metadata -------------------------------------------------------------------------

def contiguous_block_tables(context_lens: list[int], block_size: int) -> list[list[int]]:
    """Sequence after sequence, each gets the next free blocks in order."""
    tables, next_block = [], 0
    for length in context_lens:
        n = -(-length // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    return tables


def attention_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                       block_size: int) -> AttentionMetadata:
    """Metadata for sequences whose last `query_lens[b]` of `context_lens[b]` tokens are new."""
    slots = []
    for q, c, table in zip(query_lens, context_lens, block_tables):
        for pos in range(c - q, c):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(t) for t in block_tables)
    padded = [t + [-1] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(padded, dtype=torch.int32),
        query_lens_cpu=list(query_lens),
        context_lens_cpu=list(context_lens),
        block_size=block_size,
    )


def allocate_kv_caches(text_config, num_blocks: int, block_size: int,
                       dtype: torch.dtype = torch.float32, device="cpu") -> list[torch.Tensor]:
    """One zeroed `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor per decoder layer."""
    shape = (2, num_blocks, block_size, text_config.num_kv_heads, text_config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text_config.num_layers)]


def prefill_batch(text_config, seq_lens: list[int], block_size: int = 4, spare_blocks: int = 0,
                  dtype: torch.dtype = torch.float32, device="cpu"):
    """Metadata and fresh caches to prefill sequences of `seq_lens` tokens from scratch.

    `spare_blocks` extra blocks are allocated after the used ones (for decoding afterwards).
    Returns `(attn, kv_caches, block_tables)`.
    """
    tables = contiguous_block_tables(seq_lens, block_size)
    attn = attention_metadata(seq_lens, seq_lens, tables, block_size)
    num_blocks = sum(len(t) for t in tables) + spare_blocks
    return attn, allocate_kv_caches(text_config, num_blocks, block_size, dtype, device), tables


# --- Qwen2.5-VL -------------------------------------------------------------------------------

# Windows of 56 pixels (2 x 2 merged tokens) split the test images into several windows, with
# full attention in at least one block; the text decoders are those of variants "a" and "b".
VARIANTS_2_5: dict[str, dict] = {
    "a": dict(
        text=VARIANTS["a"]["text"],
        vision=dict(hidden_size=32, num_heads=2, depth=3, intermediate_size=48, window_size=56,
                    fullatt_block_indexes=[1], tokens_per_second=2),
        tie_word_embeddings=False,
    ),
    "b": dict(
        text=VARIANTS["b"]["text"],
        vision=dict(hidden_size=48, num_heads=3, depth=2, intermediate_size=40, window_size=56,
                    fullatt_block_indexes=[0], tokens_per_second=4),
        tie_word_embeddings=True,
    ),
}


def reference_config_2_5(variant: str = "a"):
    """The transformers `Qwen2_5_VLConfig` of a tiny Qwen2.5-VL variant."""
    from transformers import Qwen2_5_VLConfig

    spec = VARIANTS_2_5[variant]
    text = dict(spec["text"])
    mrope_section = text.pop("mrope_section")
    text.update(vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section})
    vision = dict(spec["vision"], out_hidden_size=spec["text"]["hidden_size"], patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"])
    config.text_config.tie_word_embeddings = spec["tie_word_embeddings"]
    return config


def build_reference_model_2_5(variant: str = "a", seed: int = 0):
    """A fp32 `transformers.Qwen2_5_VLForConditionalGeneration` with the scaled random init."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = reference_config_2_5(variant)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    scale_init_(model, seed, tied=VARIANTS_2_5[variant]["tie_word_embeddings"])
    return model


def write_tiny_checkpoint_2_5(out_dir, variant: str = "a", seed: int = 0) -> Path:
    """`write_tiny_checkpoint` of a tiny Qwen2.5-VL variant."""
    out_dir = Path(out_dir)
    build_reference_model_2_5(variant, seed).save_pretrained(out_dir)
    write_support_files(out_dir, "qwen2_5_vl")
    return out_dir


# --- Qwen3-VL ---------------------------------------------------------------------------------

# Qwen3 decoders (q/k norm, no q/k/v bias, interleaved M-RoPE) whose head_dim is not hidden /
# heads; towers whose learned position grid (16 x 16 and 12 x 12) is both larger and smaller than
# the test images' patch grids, with DeepStack features from two blocks (fewer than, and as many
# as, the decoder's layers).
VARIANTS_3: dict[str, dict] = {
    "a": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, mrope_section=[6, 3, 3]),
        vision=dict(hidden_size=32, num_heads=2, depth=3, intermediate_size=48, num_position_embeddings=256,
                    deepstack_visual_indexes=[0, 2]),
        tie_word_embeddings=False,
    ),
    "b": dict(
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=1, head_dim=32, mrope_section=[8, 4, 4]),
        vision=dict(hidden_size=48, num_heads=3, depth=3, intermediate_size=40, num_position_embeddings=144,
                    deepstack_visual_indexes=[1, 2]),
        tie_word_embeddings=True,
    ),
}


# Qwen3-VL-MoE: 8 experts, top 2, sparse MLPs in layers 0 and 2 and a dense one in layer 1
# (`mlp_only_layers`); H = 80 is neither I nor 2I, so each stacked expert tensor's layout shows.
VARIANTS_3_MOE: dict[str, dict] = {
    "moe": dict(
        text=dict(hidden_size=80, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2]),
        moe=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                 mlp_only_layers=[1]),
        vision=dict(hidden_size=32, num_heads=2, depth=2, intermediate_size=48, num_position_embeddings=256,
                    deepstack_visual_indexes=[0, 1]),
        tie_word_embeddings=False,
    ),
}


def _spec_3(variant: str) -> dict:
    return VARIANTS_3[variant] if variant in VARIANTS_3 else VARIANTS_3_MOE[variant]


def reference_config_3(variant: str = "a"):
    """The transformers `Qwen3VLConfig` of a tiny Qwen3-VL variant (`Qwen3VLMoeConfig` of a MoE one)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    spec = _spec_3(variant)
    text = dict(spec["text"], **spec.get("moe", {}))
    mrope_section = text.pop("mrope_section")
    text.update(vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, max_position_embeddings=4096,
                tie_word_embeddings=spec["tie_word_embeddings"],
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope_section,
                                 "mrope_interleaved": True})
    vision = dict(spec["vision"], out_hidden_size=spec["text"]["hidden_size"], patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh")
    config_class = Qwen3VLMoeConfig if "moe" in spec else Qwen3VLConfig
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"])


def build_reference_model_3(variant: str = "a", seed: int = 0):
    """A fp32 `transformers.Qwen3VLForConditionalGeneration` (`Qwen3VLMoeForConditionalGeneration`)
    with the scaled random init (the router and the stacked experts as any matrix)."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    config = reference_config_3(variant)
    config._attn_implementation = "sdpa"
    model_class = Qwen3VLMoeForConditionalGeneration if "moe" in _spec_3(variant) else Qwen3VLForConditionalGeneration
    model = model_class(config).to(torch.float32).eval()
    scale_init_(model, seed, tied=_spec_3(variant)["tie_word_embeddings"])
    return model


def write_tiny_checkpoint_3(out_dir, variant: str = "a", seed: int = 0) -> Path:
    """`write_tiny_checkpoint` of a tiny Qwen3-VL variant (Qwen3-VL's preprocessor_config.json);
    a MoE one's experts as 5.17's `save_pretrained` writes them, `[E, 2I, H]` and `[E, H, I]`."""
    out_dir = Path(out_dir)
    build_reference_model_3(variant, seed).save_pretrained(out_dir)
    write_support_files(out_dir, "qwen3_vl")
    return out_dir


def write_published_expert_layout(src, out) -> Path:
    """Checkpoint `src` copied to `out` with every stacked expert tensor in the layout of Qwen's
    published MoE checkpoints: `gate_up_proj [E, H, 2I]` ([gate | up] along the last dim) and
    `down_proj [E, I, H]`, the transpose of what `save_pretrained` writes."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    shutil.copytree(src, out, dirs_exist_ok=True)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        stacked = [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        tensors.update({k: tensors[k].transpose(1, 2).contiguous() for k in stacked})
        save_file(tensors, path, metadata={"format": "pt"})
    return out
