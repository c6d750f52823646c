"""The CPU int4 path end to end on tiny AWQ / GPTQ checkpoints: what loads, and greedy outputs
equal to the dequantized reference path."""
from __future__ import annotations

import pytest
import torch

from checkpoints import reference_config
from qwen2vl.api import Qwen2VL
from qwen2vl.cli import build_parser
from qwen2vl.engine import LLMEngine
from qwen2vl.kernels import int4_cpu, int8_cpu
from qwen2vl.layers.linear import Int4Linear, QuantizedLinear
from qwen2vl.layers.vocab import Int8VocabTable, VocabTable
from qwen2vl.loader import load_model
from qwen2vl.processor import Processor
from qwen2vl.sampling_params import SamplingParams
from qwen2vl.tools.random_checkpoint import write_random_checkpoint
from test_engine import picture, user

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="this torch has no CPU int4 kernel")

NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
CONVERSATIONS = {
    "text": [user("Write a short poem about the sea.")],
    "image": [user({"type": "image", "image": picture(84, 56, 1)}, "Describe this image.")],
}


@pytest.fixture(scope="module", params=["awq", "gptq4"])
def quant_ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"int4-{request.param}")
    return write_random_checkpoint(reference_config("a").to_dict(), out, dtype="fp16", quant=request.param,
                                   group_size=32)


def quantized_modules(model) -> list:
    return [m for m in model.language_model.modules() if isinstance(m, (QuantizedLinear, Int4Linear))]


def greedy_ids(model, ckpt) -> dict[str, list[int]]:
    processor = Processor.from_pretrained(ckpt)
    engine = LLMEngine(model, processor, num_kv_blocks=64)
    outputs = {}
    for name, messages in CONVERSATIONS.items():
        request_id = engine.add_request(processor.prepare(messages), GREEDY)
        while engine.has_unfinished():
            for output in engine.step():
                if output.finished and output.request_id == request_id:
                    outputs[name] = output.token_ids
    return outputs


@pytest.fixture(scope="module")
def reference_ids(quant_ckpt):
    return greedy_ids(load_model(quant_ckpt, dtype=torch.float32, int4_kernel=False), quant_ckpt)


def test_int4_path_keeps_only_the_packed_layout(quant_ckpt):
    model = load_model(quant_ckpt, dtype=torch.float32, int4_kernel=True)
    modules = quantized_modules(model)
    assert len(modules) == 4 * 2 and all(isinstance(m, Int4Linear) for m in modules)
    for m in modules:
        assert m.packed.dtype == torch.uint8 and m.packed.shape == (m.out_features, m.in_features // 2)
        assert m.scales_and_zeros.shape == (m.in_features // 32, m.out_features, 2)
        assert not hasattr(m, "weight") and not hasattr(m, "qweight")
    assert model.language_model.layers[0].self_attn.qkv_proj.bias.dtype == torch.float32


def test_int4_greedy_ids_equal_dequantized_path_fp32_activations(quant_ckpt, reference_ids):
    """fp32 everywhere except the int4 matmuls' bf16 inputs."""
    assert len(set(map(tuple, reference_ids.values()))) == len(reference_ids)  # prompts lead somewhere different
    assert all(len(set(ids)) > 3 for ids in reference_ids.values())  # and not one repeated token
    model = load_model(quant_ckpt, dtype=torch.float32, int4_kernel=True)
    assert model.dtype == torch.float32
    assert greedy_ids(model, quant_ckpt) == reference_ids


def test_auto_dtype_on_cpu_runs_int4_in_bfloat16(quant_ckpt, reference_ids):
    model = Qwen2VL.from_pretrained(quant_ckpt, device="cpu", dtype="auto").engine.model
    assert model.dtype == torch.bfloat16
    assert all(isinstance(m, Int4Linear) for m in quantized_modules(model))
    ids = greedy_ids(model, quant_ckpt)
    # bf16 everywhere (not only around the int4 matmuls) may flip a later near-tie: the start agrees.
    assert all(ids[name][:4] == reference_ids[name][:4] for name in ids)


def test_float32_keeps_the_exact_dequantized_path(quant_ckpt):
    modules = quantized_modules(load_model(quant_ckpt, dtype=torch.float32))
    assert all(isinstance(m, QuantizedLinear) and m.weight.dtype == torch.float32 for m in modules)


def test_dense_checkpoint_stays_float32_on_cpu(tiny_ckpt):
    assert Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", dtype="auto").engine.model.dtype == torch.float32


@pytest.mark.skipif(not int8_cpu.available(), reason="this torch has no CPU int8 kernel")
def test_int4_path_reads_the_vocabulary_as_int8_rows(quant_ckpt):
    model = load_model(quant_ckpt, dtype=torch.bfloat16)
    exact = load_model(quant_ckpt, dtype=torch.float32, int4_kernel=False)
    table, head = model.language_model.embed_tokens, model.head
    assert isinstance(table, Int8VocabTable) and isinstance(head, Int8VocabTable) and head is not table  # untied
    assert table.values.dtype == torch.int8 and model.dtype == torch.bfloat16
    assert type(exact.head) is VocabTable and type(exact.language_model.embed_tokens) is VocabTable
    assert type(load_model(quant_ckpt, dtype=torch.bfloat16, int8_vocab=False).head) is VocabTable
    # the same switch through the API and the command line
    assert type(Qwen2VL.from_pretrained(quant_ckpt, device="cpu", int8_vocab=False).engine.model.head) is VocabTable
    assert build_parser().parse_args(["chat", "--no-int8-vocab", "hi"]).int8_vocab is False
    assert build_parser().parse_args(["serve"]).int8_vocab is True
    ids = torch.tensor([0, 17, 151643, 151655])
    rows = exact.language_model.embed_tokens.weight[ids]
    step = rows.abs().amax(1, keepdim=True) / 127  # one int8 step of each row
    # half a step of rounding, plus the bfloat16 scale's and result's roundings
    assert ((table.embed(ids).float() - rows).abs() <= step + rows.abs() * 2**-7).all()
    x = torch.randn(3, rows.shape[1], generator=torch.Generator().manual_seed(0))
    reference = x @ exact.head.weight.T
    logits = head.logits(x.bfloat16())
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert ((logits - reference).norm() / reference.norm()).item() < 1e-2


@pytest.mark.skipif(not int8_cpu.available(), reason="this torch has no CPU int8 kernel")
def test_int8_matmul_matches_reference():
    generator = torch.Generator().manual_seed(3)
    values, scales = int8_cpu.quantize_rows(torch.randn(300, 96, generator=generator), torch.bfloat16)
    x = torch.randn(5, 96, generator=generator).bfloat16()
    out = int8_cpu.int8_matmul(x, values, scales)
    expected = int8_cpu.int8_matmul_reference(x, values, scales)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=2**-7 * expected.float().abs().max().item())
