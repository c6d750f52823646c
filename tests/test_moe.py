"""The sparse MLP of Qwen3-VL-MoE: config parsing, the block against transformers 5.17's, the
grouped Triton kernel against the torch path, and the stacked expert weights read from both layouts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qwen2vl import loader
from qwen2vl.config import MoEConfig, Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.layers.moe import SparseMoeBlock, grouped_matmul
from checkpoints import reference_config

HIDDEN = 32


def moe_config(num_experts: int, top_k: int, intermediate: int = 24, normalize: bool = True) -> MoEConfig:
    return MoEConfig(num_experts, top_k, intermediate, norm_topk_prob=normalize)


def scaled_block(moe: MoEConfig, seed: int, hidden: int = HIDDEN) -> SparseMoeBlock:
    """Our block with the scaled random init of the parity tests (matrices std 0.08)."""
    generator = torch.Generator().manual_seed(seed)
    block = SparseMoeBlock(hidden, moe)
    for param in block.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.08)
    return block


def reference_block(block: SparseMoeBlock, moe: MoEConfig):
    """transformers 5.17's block with `block`'s weights: Qwen3-VL-MoE's, which always renormalizes
    the top-k weights; where `norm_topk_prob` is false, Qwen3-MoE's (same router and experts,
    it reads the flag)."""
    sizes = dict(hidden_size=HIDDEN, num_experts=moe.num_experts, num_experts_per_tok=moe.num_experts_per_tok,
                 moe_intermediate_size=moe.moe_intermediate_size)
    if moe.norm_topk_prob:
        from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m
        ref = m.Qwen3VLMoeTextSparseMoeBlock(m.Qwen3VLMoeTextConfig(**sizes))
    else:
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m
        ref = m.Qwen3MoeSparseMoeBlock(m.Qwen3MoeConfig(**sizes, norm_topk_prob=False))
    with torch.no_grad():
        ref.gate.weight.copy_(block.gate.weight)
        ref.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        ref.experts.down_proj.copy_(block.experts.down_proj)
    return ref.eval()


# --- config ----------------------------------------------------------------------------------

def test_moe_settings_parsed_from_a_config_written_by_transformers():
    from transformers import Qwen3VLMoeTextConfig

    # 5.17 writes num_experts as `num_local_experts` and drops norm_topk_prob.
    t = Qwen3VLMoeTextConfig(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40, decoder_sparse_step=2,
                             mlp_only_layers=[3]).to_dict()
    assert "num_local_experts" in t and "norm_topk_prob" not in t
    assert MoEConfig.from_dict(t) == MoEConfig(6, 3, 40, 2, (3,), True)


def test_published_30b_a3b_settings_and_dense_configs():
    published = {"decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 768,
                 "norm_topk_prob": True, "num_experts": 128, "num_experts_per_tok": 8}
    moe = MoEConfig.from_dict(published)
    assert moe == MoEConfig(128, 8, 768, 1, (), True)
    assert all(moe.is_sparse_layer(i) for i in range(48))
    assert MoEConfig.from_dict({**published, "norm_topk_prob": False}).norm_topk_prob is False
    assert Qwen2VLConfig.from_dict(reference_config("a").to_dict()).text.moe is None


@pytest.mark.parametrize("step, dense_layers", [(1, []), (2, []), (1, [0, 3]), (3, [2, 4])])
def test_sparse_layers_follow_the_reference_rule(step, dense_layers):
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    t = m.Qwen3VLMoeTextConfig(hidden_size=16, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                               num_experts=2, num_experts_per_tok=1, moe_intermediate_size=4, num_hidden_layers=6,
                               decoder_sparse_step=step, mlp_only_layers=dense_layers)
    moe = MoEConfig.from_dict(t.to_dict())
    ours = [moe.is_sparse_layer(i) for i in range(6)]
    theirs = [isinstance(m.Qwen3VLMoeTextDecoderLayer(t, i).mlp, m.Qwen3VLMoeTextSparseMoeBlock) for i in range(6)]
    assert ours == theirs and any(ours)


@pytest.mark.parametrize("settings, message", [
    ({"num_experts": 8, "moe_intermediate_size": 16}, "num_experts_per_tok"),
    ({"num_experts": 8, "num_experts_per_tok": 9, "moe_intermediate_size": 16}, "between 1 and num_experts 8"),
    ({"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "decoder_sparse_step": 0},
     "decoder_sparse_step 0"),
])
def test_bad_moe_settings_are_named(settings, message):
    with pytest.raises(CheckpointError, match=message):
        MoEConfig.from_dict(settings)


# --- the block against transformers ----------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_experts, top_k, num_tokens", [(8, 2, 24), (12, 3, 40), (16, 4, 33), (16, 2, 3)])
def test_block_equals_transformers(num_experts, top_k, num_tokens, normalize):
    moe = moe_config(num_experts, top_k, normalize=normalize)
    block = scaled_block(moe, seed=num_experts * 10 + top_k)
    ref = reference_block(block, moe)
    x = torch.randn(1, num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    _, experts = block.gate(x[0], top_k, normalize)
    used = experts.unique().numel()
    # Many experts are hit (all but a few), several tokens each; the 3-token case leaves experts empty.
    assert used >= min(num_experts - 2, num_tokens * top_k // 2) and used > top_k
    with torch.no_grad():
        out, expected = block(x), ref(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().mean() > 1e-3  # the outputs are not vanishing


def test_renormalized_weights_sum_to_one_and_raw_ones_do_not():
    block = scaled_block(moe_config(8, 3), seed=1)
    x = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(2))
    normalized, experts = block.gate(x, 3, True)
    raw, same = block.gate(x, 3, False)
    assert torch.equal(experts, same)
    torch.testing.assert_close(normalized.sum(-1), torch.ones(10))
    assert (raw.sum(-1) < 1 - 1e-3).all()
    probs = torch.softmax(x @ block.gate.weight.t(), dim=-1)
    torch.testing.assert_close(raw, probs.gather(1, experts))


def test_grouped_matmul_is_one_matmul_per_expert():
    generator = torch.Generator().manual_seed(3)
    a, weight = torch.randn(9, 8, generator=generator), torch.randn(4, 5, 8, generator=generator)
    rows = torch.tensor([2, 0, 0, 7, 8, 1, 3, 3, 5, 6, 4])
    offsets = torch.tensor([0, 3, 3, 8, 11])  # expert 1 has no rows
    out = grouped_matmul(a, weight, offsets, rows)
    expected = torch.cat([a[rows[s:e]] @ weight[i].t() for i, (s, e) in enumerate(zip(offsets, offsets[1:]))])
    assert torch.equal(out, expected)


# --- stacked expert weights from a checkpoint ------------------------------------------------

class _Layer(torch.nn.Module):
    def __init__(self, moe: MoEConfig, hidden: int):
        super().__init__()
        self.mlp = SparseMoeBlock(hidden, moe)


def _load_experts(tmp_path, tensors: dict[str, torch.Tensor], moe: MoEConfig, hidden: int) -> SparseMoeBlock:
    """Read `tensors` (as a checkpoint file) into a fresh layer through the loader's slots."""
    save_file(tensors, tmp_path / "model.safetensors")
    with torch.device("meta"):
        layer = _Layer(moe, hidden)
    plan = loader._expert_slots("mlp.experts", layer.mlp.experts, renames=())
    plan["mlp.gate.weight"] = loader._Slot(layer.mlp.gate, "weight", (moe.num_experts, hidden))
    shards = loader._shard_keys(tmp_path)
    loader._check_keys(plan, shards, tied=False)
    for shard in shards.values():
        with open(shard.path, "rb") as f:
            for key in shard.entries:
                plan[key].fill(shard, f, key, torch.float32, torch.device("cpu"))
    return layer.mlp


@pytest.mark.parametrize("hidden, intermediate", [(32, 24), (32, 16), (32, 32)])  # H = 2I and H = I: one tensor square
def test_published_and_save_pretrained_layouts_load_to_the_same_block(tmp_path, hidden, intermediate):
    moe = moe_config(6, 2, intermediate)
    block = scaled_block(moe, seed=5, hidden=hidden)
    ours = {"mlp.gate.weight": block.gate.weight, "mlp.experts.gate_up_proj": block.experts.gate_up_proj,
            "mlp.experts.down_proj": block.experts.down_proj}
    # The published layout: gate_up_proj [E, H, 2I] ([gate | up] along the last dim), down_proj [E, I, H].
    published = {**ours, "mlp.experts.gate_up_proj": block.experts.gate_up_proj.transpose(1, 2).contiguous(),
                 "mlp.experts.down_proj": block.experts.down_proj.transpose(1, 2).contiguous()}
    assert published["mlp.experts.gate_up_proj"].shape == (6, hidden, 2 * intermediate)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    from_ours, from_published = _load_experts(tmp_path / "a", ours, moe, hidden), \
        _load_experts(tmp_path / "b", published, moe, hidden)
    for loaded in (from_ours, from_published):
        for name, param in block.named_parameters():
            assert torch.equal(loaded.get_parameter(name), param), name
    x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(6))
    assert torch.equal(from_published(x), block(x))


def test_transformers_reads_the_published_layout_as_we_do(tmp_path):
    """The published layout's gate_up_proj `[E, H, 2I]`, loaded by 5.17 (which transposes it on the
    way in) and by us, gives the same block."""
    moe = moe_config(6, 2)
    block = scaled_block(moe, seed=7)
    published = {"mlp.gate.weight": block.gate.weight,
                 "mlp.experts.gate_up_proj": block.experts.gate_up_proj.transpose(1, 2).contiguous(),
                 "mlp.experts.down_proj": block.experts.down_proj.transpose(1, 2).contiguous()}
    ours = _load_experts(tmp_path, published, moe, HIDDEN)
    ref = reference_block(block, moe)
    # 5.17's own conversion on load: transpose(1, 2) where the stored shape is not its parameter's.
    assert ref.experts.gate_up_proj.shape != published["mlp.experts.gate_up_proj"].shape
    assert torch.equal(ref.experts.gate_up_proj, published["mlp.experts.gate_up_proj"].transpose(1, 2))
    x = torch.randn(1, 9, HIDDEN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"mlp.experts.down_proj": torch.zeros(6, 24, 30)}, r"expected shape \[6, 24, 32\] \(or \[6, 32, 24\]"),
    ({"mlp.experts.down_proj": torch.zeros(6, 32, 24)}, "unlike the other expert tensor of its layer"),
    ({"mlp.experts.gate_up_proj": torch.zeros(6, 32, 48, dtype=torch.int32)}, "expected float expert weights"),
])
def test_wrong_expert_tensors_are_named(tmp_path, change, message):
    moe = moe_config(6, 2)
    tensors = {"mlp.gate.weight": torch.zeros(6, HIDDEN), "mlp.experts.gate_up_proj": torch.zeros(6, HIDDEN, 48),
               "mlp.experts.down_proj": torch.zeros(6, 24, HIDDEN), **change}
    with pytest.raises(CheckpointError, match=message):
        _load_experts(tmp_path, tensors, moe, HIDDEN)


def test_a_square_published_gate_up_proj_is_read_by_its_layers_down_proj(tmp_path):
    """A difference from transformers 5.17, which decides each tensor's layout by its shape alone:
    where H = 2I the published gate_up_proj `[E, H, 2I]` has its parameter's shape, and 5.17 keeps
    it untransposed (every expert's gate/up weights scrambled), while it does transpose down_proj.
    Qwen's reference (transformers 4.57) holds the published layout itself; we read the layout
    from the layer's down_proj, which is not square, and transpose both, as Qwen's reads them."""
    from safetensors.torch import load_file
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    hidden, intermediate = 16, 8
    config = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=intermediate,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           deepstack_visual_indexes=[0], num_position_embeddings=16))
    torch.manual_seed(0)
    Qwen3VLMoeForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    prefix = "model.language_model.layers.0.mlp."
    gate_up, down = tensors[prefix + "experts.gate_up_proj"], tensors[prefix + "experts.down_proj"]  # 5.17's [E, N, K]
    tensors[prefix + "experts.gate_up_proj"] = gate_up.transpose(1, 2).contiguous()  # published [E, H, 2I]: square
    tensors[prefix + "experts.down_proj"] = down.transpose(1, 2).contiguous()
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})

    theirs = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "hf").model.language_model.layers[0].mlp
    assert torch.equal(theirs.experts.down_proj, down)  # transposed back: right
    assert torch.equal(theirs.experts.gate_up_proj, tensors[prefix + "experts.gate_up_proj"])  # kept: wrong
    assert not torch.equal(theirs.experts.gate_up_proj, gate_up)

    (tmp_path / "ours").mkdir()
    published = {"mlp." + name: tensors[prefix + name] for name in ("gate.weight", "experts.gate_up_proj",
                                                                   "experts.down_proj")}
    ours = _load_experts(tmp_path / "ours", published, MoEConfig(4, 2, intermediate), hidden)
    assert torch.equal(ours.experts.gate_up_proj, gate_up) and torch.equal(ours.experts.down_proj, down)


def test_the_loaders_plan_names_a_decoder_layers_sparse_mlp_as_the_checkpoints_do():
    from qwen2vl.model.qwen2_vl import WEIGHT_RENAMES, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig.from_dict(reference_config("a").to_dict())
    hidden = config.text.hidden_size
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
        model.language_model.layers[1].mlp = SparseMoeBlock(hidden, moe_config(4, 2, 8))
    plan = loader._plan(model, WEIGHT_RENAMES)
    layer = "model.layers.1.mlp."
    assert {name for name in plan if name.startswith(layer)} == \
        {layer + "gate.weight", layer + "experts.gate_up_proj", layer + "experts.down_proj"}
    assert plan[layer + "gate.weight"].shape == (4, hidden)
    assert isinstance(plan[layer + "experts.gate_up_proj"], loader._StackedExpertsSlot)
    assert plan[layer + "experts.gate_up_proj"].shape == (4, hidden, 16)  # published [E, H, 2I]
    assert plan[layer + "experts.down_proj"].shape == (4, 8, hidden)  # published [E, I, H]
