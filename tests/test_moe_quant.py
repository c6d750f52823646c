"""Mixture-of-experts checkpoints that store the routed experts one per expert
(`mlp.experts.<e>.(gate_proj|up_proj|down_proj).*`): unquantized, AWQ (QuantTrio's Qwen3-VL-MoE
AWQ), GPTQ and block FP8 (Qwen's `*-FP8`), read into the stacked `Experts` as the exact
dequantization of each expert; the block then equals transformers 5.17's on those weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import reference_config_3
from fp8_checkpoints import dequantize_reference
from test_quant import reference_dequantized
from qwen2vl import loader
from qwen2vl.loader import load_model
from qwen2vl.config import MoEConfig, QuantConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.layers import quantization as q
from qwen2vl.layers.moe import SparseMoeBlock
from qwen2vl.tools.random_checkpoint import _quantized_linear, quantization_config, write_random_checkpoint

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 64, 32, 6, 2
# AWQ / GPTQ groups of 32 input rows; FP8 blocks of 24 x 24: partial blocks at the end of each of
# gate and up (32 rows) and of the 64 columns.
GROUP_SIZES = {"awq": 32, "gptq4": 32, "gptq8": 32, "fp8": 24}
PREFIX = "model.layers.0.mlp"
PROJECTIONS = (("gate_proj", INTERMEDIATE, HIDDEN), ("up_proj", INTERMEDIATE, HIDDEN),
               ("down_proj", HIDDEN, INTERMEDIATE))  # (name, out_features, in_features)


def quant_config(fmt: str) -> QuantConfig | None:
    return None if fmt == "bf16" else QuantConfig.from_dict(quantization_config(fmt, GROUP_SIZES[fmt]))


def per_expert_tensors(fmt: str, seed: int, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """A sparse MLP's router and experts, one per expert: random weights (std 0.08) stored as bf16,
    or quantized and packed by the random checkpoint writer."""
    generator = torch.Generator().manual_seed(seed)
    quant = quant_config(fmt)
    tensors = {f"{prefix}.gate.weight": torch.randn(EXPERTS, HIDDEN, generator=generator) * 0.08}
    for expert in range(EXPERTS):
        for proj, out_features, in_features in PROJECTIONS:
            name = f"{prefix}.experts.{expert}.{proj}"
            if quant is None:
                weight = torch.randn(out_features, in_features, generator=generator) * 0.08
                tensors[f"{name}.weight"] = weight.bfloat16()
            else:
                tensors.update(_quantized_linear(name, out_features, in_features, quant).make(generator))
    return tensors


def dequantized_experts(path, fmt: str, prefix: str = PREFIX) -> tuple[torch.Tensor, torch.Tensor]:
    """(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) float32, each expert dequantized by the
    tests' own per-element formulas from the stored tensors."""
    def weight(f, name):
        if fmt == "bf16":
            return f.get_tensor(f"{name}.weight").float()
        if fmt == "fp8":
            return dequantize_reference(f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale_inv"),
                                        (GROUP_SIZES[fmt],) * 2)
        method, bits = ("awq", 4) if fmt == "awq" else ("gptq", int(fmt[-1]))
        return reference_dequantized(f, name, method, bits, GROUP_SIZES[fmt])

    with safe_open(path, "pt") as f:
        experts = [{proj: weight(f, f"{prefix}.experts.{e}.{proj}") for proj, _, _ in PROJECTIONS}
                   for e in range(EXPERTS)]
    return (torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in experts]),
            torch.stack([e["down_proj"] for e in experts]))


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = SparseMoeBlock(HIDDEN, MoEConfig(EXPERTS, TOP_K, INTERMEDIATE))


def load_layer(directory, tensors: dict[str, torch.Tensor], fmt: str, dtype=torch.float32):
    """Write `tensors` as a checkpoint and read them into a fresh layer through the loader's slots,
    as `_fill` does; (the layer's sparse MLP, the plan)."""
    directory.mkdir(exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    with torch.device("meta"):
        layer = _Layer()
    shards = loader._shard_keys(directory)
    per_expert = f"{PREFIX}.experts" in loader._per_expert_layers(shards)
    plan = loader._expert_slots(f"{PREFIX}.experts", layer.mlp.experts, (), quant_config(fmt), per_expert)
    plan[f"{PREFIX}.gate.weight"] = loader._Slot(layer.mlp.gate, "weight", (EXPERTS, HIDDEN))
    loader._check_keys(plan, shards, tied=False)
    for shard in shards.values():
        with open(shard.path, "rb") as f:
            for key in shard.entries:
                plan[key].fill(shard, f, key, dtype, torch.device("cpu"))
    return layer.mlp, plan


def reference_block(router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor):
    """transformers 5.17's Qwen3-VL-MoE sparse block with these weights."""
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    ref = m.Qwen3VLMoeTextSparseMoeBlock(m.Qwen3VLMoeTextConfig(
        hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=INTERMEDIATE))
    with torch.no_grad():
        ref.gate.weight.copy_(router)
        ref.experts.gate_up_proj.copy_(gate_up)
        ref.experts.down_proj.copy_(down)
    return ref.eval()


@pytest.mark.parametrize("fmt", ["bf16", "awq", "gptq4", "gptq8", "fp8"])
def test_per_expert_checkpoint_loads_to_the_exact_dequantization(tmp_path, fmt):
    tensors = per_expert_tensors(fmt, seed=len(fmt))
    block, plan = load_layer(tmp_path, tensors, fmt)
    gate_up, down = dequantized_experts(tmp_path / "model.safetensors", fmt)
    assert block.experts.gate_up_proj.dtype == torch.float32
    assert torch.equal(block.experts.gate_up_proj, gate_up) and torch.equal(block.experts.down_proj, down)
    assert gate_up.abs().mean() > 0.02  # real weights, not zeros
    # Each expert's staging linear was emptied once dequantized: nothing is kept twice.
    stagings = {id(slot.staging): slot.staging for slot in plan.values() if isinstance(slot, loader._PerExpertSlot)}
    assert len(stagings) == 2 * EXPERTS
    assert all(t.is_meta for s in stagings.values() for t in [*s.linear.parameters(), *s.linear.buffers()])

    x = torch.randn(1, 40, HIDDEN, generator=torch.Generator().manual_seed(9))
    ref = reference_block(tensors[f"{PREFIX}.gate.weight"], gate_up, down)
    with torch.no_grad():
        out, expected = block(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().mean() > 1e-3


def test_per_expert_fp8_loads_in_bfloat16_as_the_rounded_exact_dequantization(tmp_path):
    tensors = per_expert_tensors("fp8", seed=3)
    block, _ = load_layer(tmp_path, tensors, "fp8", dtype=torch.bfloat16)
    gate_up, down = dequantized_experts(tmp_path / "model.safetensors", "fp8")
    assert block.experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(block.experts.gate_up_proj, gate_up.bfloat16())
    assert torch.equal(block.experts.down_proj, down.bfloat16())


def test_per_expert_fp8_with_bfloat16_scales(tmp_path):
    """Third-party notes on Qwen's later FP8 MoE releases say their `weight_scale_inv` is bf16: read
    exactly (as float32) all the same."""
    tensors = {k: v.bfloat16() if k.endswith("weight_scale_inv") else v
               for k, v in per_expert_tensors("fp8", seed=6).items()}
    block, _ = load_layer(tmp_path, tensors, "fp8")
    gate_up, down = dequantized_experts(tmp_path / "model.safetensors", "fp8")
    assert torch.equal(block.experts.gate_up_proj, gate_up) and torch.equal(block.experts.down_proj, down)


def test_per_expert_and_stacked_unquantized_layouts_load_the_same(tmp_path):
    tensors = per_expert_tensors("bf16", seed=4)
    per_expert, _ = load_layer(tmp_path / "per_expert", tensors, "bf16")
    experts = [[tensors[f"{PREFIX}.experts.{e}.{proj}.weight"] for proj, _, _ in PROJECTIONS] for e in range(EXPERTS)]
    stacked = {f"{PREFIX}.gate.weight": tensors[f"{PREFIX}.gate.weight"],  # the published [E, H, 2I], [E, I, H]
               f"{PREFIX}.experts.gate_up_proj": torch.stack([torch.cat(e[:2]).t() for e in experts]).contiguous(),
               f"{PREFIX}.experts.down_proj": torch.stack([e[2].t() for e in experts]).contiguous()}
    from_stacked, plan = load_layer(tmp_path / "stacked", stacked, "bf16")
    assert isinstance(plan[f"{PREFIX}.experts.gate_up_proj"], loader._StackedExpertsSlot)
    for name, param in from_stacked.named_parameters():
        assert torch.equal(per_expert.get_parameter(name), param), name


def _drop(tensors, *names):
    return {k: v for k, v in tensors.items() if k not in names}


@pytest.mark.parametrize("fmt, edit, message", [
    ("awq", lambda t: _drop(t, f"{PREFIX}.experts.3.up_proj.qweight"),
     rf"missing tensor {PREFIX}\.experts\.3\.up_proj\.qweight \[expected shape \[64, 4\]\]"),
    ("fp8", lambda t: _drop(t, *[k for k in t if ".experts.5." in k]),
     rf"missing tensor {PREFIX}\.experts\.5\.\w+_proj\.weight"),
    ("bf16", lambda t: _drop(t, f"{PREFIX}.experts.0.gate_proj.weight"),
     rf"missing tensor {PREFIX}\.experts\.0\.gate_proj\.weight \[expected shape \[32, 64\]\]"),
    ("gptq4", lambda t: {**t, f"{PREFIX}.experts.2.down_proj.scales": torch.zeros(2, 32, dtype=torch.float16)},
     rf"tensor {PREFIX}\.experts\.2\.down_proj\.scales: expected shape \[1, 64\], found \[2, 32\]"),
    ("bf16", lambda t: {**t, f"{PREFIX}.experts.6.down_proj.weight": torch.zeros(HIDDEN, INTERMEDIATE)},
     rf"tensor {PREFIX}\.experts\.6\.down_proj\.weight in model\.safetensors is not part of this model"),
    ("awq", lambda t: {**_drop(t, *[f"{PREFIX}.experts.1.gate_proj.{n}" for n in ("qweight", "qzeros", "scales")]),
                       f"{PREFIX}.experts.1.gate_proj.weight": torch.zeros(INTERMEDIATE, HIDDEN)},
     rf"tensor {PREFIX}\.experts\.1\.gate_proj\.weight is stored unquantized"),
    ("fp8", lambda t: {**t, f"{PREFIX}.experts.4.gate_proj.weight": torch.zeros(INTERMEDIATE, HIDDEN)},
     rf"tensor {PREFIX}\.experts\.4\.gate_proj\.weight: expected torch\.float8_e4m3fn"),
])
def test_wrong_per_expert_tensors_are_named(tmp_path, fmt, edit, message):
    tensors = edit(per_expert_tensors(fmt, seed=5))
    with pytest.raises(CheckpointError, match=message):
        load_layer(tmp_path, tensors, fmt)


# --- a whole checkpoint from the random writer ------------------------------------------------

def moe_checkpoint_config() -> dict:
    """The tiny Qwen3-VL test config as Qwen3-VL-MoE, with a sparse MLP in layer 1 (layer 0 keeps
    the dense one)."""
    config = reference_config_3("a").to_dict()
    config["model_type"] = "qwen3_vl_moe"
    config["text_config"].update(vocab_size=512, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                 moe_intermediate_size=INTERMEDIATE, mlp_only_layers=[0])
    return config


def load_moe_model(ckpt):
    return load_model(ckpt, dtype=torch.float32, int4_kernel=False)


@pytest.mark.parametrize("fmt", ["bf16", "awq", "fp8"])
def test_random_writer_moe_checkpoint_loads(tmp_path, fmt):
    """bf16: the experts stacked in the published layout; AWQ and FP8: one per expert."""
    ckpt = write_random_checkpoint(moe_checkpoint_config(), tmp_path, quant=None if fmt == "bf16" else fmt,
                                   group_size=GROUP_SIZES.get(fmt, 32))
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        router = f.get_tensor("model.language_model.layers.1.mlp.gate.weight").float()
        stacked = f.get_tensor("model.language_model.layers.1.mlp.experts.gate_up_proj").float() if fmt == "bf16" else None
    assert "model.language_model.layers.0.mlp.gate_proj." + ("weight" if fmt != "awq" else "qweight") in keys
    assert not any(k.startswith("model.language_model.layers.0.mlp.experts") for k in keys)
    model = load_moe_model(ckpt)
    block = model.language_model.layers[1].mlp
    assert torch.equal(block.gate.weight, router)
    if fmt == "bf16":
        assert stacked.shape == (EXPERTS, HIDDEN, 2 * INTERMEDIATE)
        assert torch.equal(block.experts.gate_up_proj, stacked.transpose(1, 2))
        return
    last_scales = "scales" if fmt == "awq" else "weight_scale_inv"
    assert f"model.language_model.layers.1.mlp.experts.{EXPERTS - 1}.down_proj.{last_scales}" in keys
    gate_up, down = dequantized_experts(ckpt / "model.safetensors", fmt, "model.language_model.layers.1.mlp")
    assert torch.equal(block.experts.gate_up_proj, gate_up) and torch.equal(block.experts.down_proj, down)


def test_current_key_layout_and_qwen_fp8_skip_list(tmp_path):
    """Qwen's FP8 releases name their tensors in the current layout (`model.language_model.*`, as the
    writer does for Qwen3-VL) and list each router in modules_to_not_convert
    (`model.language_model.layers.<i>.mlp.gate`)."""
    ckpt = write_random_checkpoint(moe_checkpoint_config(), tmp_path, quant="fp8", group_size=24)
    tensors = load_file(ckpt / "model.safetensors")
    assert "model.language_model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in tensors
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] += ["model.language_model.layers.1.mlp.gate"]
    (ckpt / "config.json").write_text(json.dumps(config))
    block = load_moe_model(ckpt).language_model.layers[1].mlp
    gate_up, down = dequantized_experts(ckpt / "model.safetensors", "fp8", "model.language_model.layers.1.mlp")
    assert torch.equal(block.experts.gate_up_proj, gate_up) and torch.equal(block.experts.down_proj, down)
    assert torch.equal(block.gate.weight, tensors["model.language_model.layers.1.mlp.gate.weight"].float())
