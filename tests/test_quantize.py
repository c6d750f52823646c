"""`qwen2vl quantize`: AWQ and round-to-nearest checkpoints in the AutoAWQ GEMM format."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from answers import box_gap
from qwen2vl import Qwen2VL
from qwen2vl.cli import main
from qwen2vl.engine import LLMEngine
from qwen2vl.evals.shapes import make_samples
from qwen2vl.kernels import int4_cpu
from qwen2vl.layers.linear import Int4Linear
from qwen2vl.loader import load_model
from qwen2vl.processor import Processor
from qwen2vl.quantize import default_calibration, quantize
from qwen2vl.quantize.awq import fake_quantize, search_scales

GROUP = 32
DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "qwen2-vl-shapes-demo"


@pytest.fixture(scope="module")
def source(tiny_ckpt_factory):
    # Variant c: multi-head attention (v -> o is searched too), intermediate 96 (three groups of 32).
    return tiny_ckpt_factory("c")


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    calibration = default_calibration(n_per_task=2)
    awq = quantize(source, tmp_path_factory.mktemp("awq"), "awq", GROUP, calibration, log=lambda line: None)
    rtn = quantize(source, tmp_path_factory.mktemp("rtn"), "rtn", GROUP, log=lambda line: None)
    return awq, rtn


def test_config_carries_the_cards_quantization_config(quantized):
    for out in quantized:
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"] == {"bits": 4, "group_size": GROUP, "modules_to_not_convert": ["visual"],
                                                 "quant_method": "awq", "version": "gemm", "zero_point": True}
        assert config["torch_dtype"] == "float16"
        assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_tensors_in_awq_gemm_layout_vision_untouched(source, quantized):
    tensors = load_file(quantized[0] / "model.safetensors")
    reference = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                 for k, v in load_file(source / "model.safetensors").items()}
    for part, (out_features, in_features) in {"self_attn.q_proj": (128, 128), "self_attn.v_proj": (128, 128),
                                              "self_attn.o_proj": (128, 128), "mlp.gate_proj": (96, 128),
                                              "mlp.down_proj": (128, 96)}.items():
        prefix = f"model.layers.0.{part}"
        assert f"{prefix}.weight" not in tensors
        assert tensors[f"{prefix}.qweight"].shape == (in_features, out_features // 8)
        assert tensors[f"{prefix}.qweight"].dtype == torch.int32
        assert tensors[f"{prefix}.qzeros"].shape == (in_features // GROUP, out_features // 8)
        assert tensors[f"{prefix}.scales"].shape == (in_features // GROUP, out_features)
        assert tensors[f"{prefix}.scales"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.k_proj.bias"].dtype == torch.float16
    visual = [k for k in reference if k.startswith("visual.")]
    assert visual and all(torch.equal(tensors[k], reference[k].half()) for k in visual)


def test_rtn_weights_within_half_a_step(source, quantized):
    original = load_model(source)
    rounded = load_model(quantized[1])
    for (name, module), ref in zip(rounded.language_model.layers.named_modules(),
                                   original.language_model.layers.modules()):
        if not hasattr(module, "scales"):
            continue
        step = module.scales.float().t().repeat_interleave(GROUP, dim=1)  # [out, in]
        error = (module.weight - ref.weight).abs()
        assert (error <= step / 2 + 1e-3 * step + 1e-6).all(), name
        assert error.max() > 0


def _first_token_logprobs(model_dir, conversations):
    llm = Qwen2VL.from_pretrained(model_dir, device="cpu")
    return llm.chat(conversations, temperature=0.0, max_tokens=1, logprobs=20)


def test_awq_keeps_logits_closer_than_rtn(source, quantized):
    conversations = [s.messages for s in make_samples(2, seed=99)]
    reference = _first_token_logprobs(source, conversations)
    errors = {}
    for name, out in zip(("awq", "rtn"), quantized):
        answers = _first_token_logprobs(out, conversations)
        diffs = [abs(ref.logprobs[0][token] - logprob)
                 for ref, answer in zip(reference, answers)
                 for token, logprob in answer.logprobs[0].items() if token in ref.logprobs[0]]
        errors[name] = sum(diffs) / len(diffs)
    assert errors["awq"] < 0.75 * errors["rtn"], errors
    assert errors["awq"] < 0.3


@pytest.mark.skipif(not int4_cpu.available(), reason="this torch has no CPU int4 kernel")
def test_quantized_demo_model_answers_alike_on_the_int4_kernel_and_dequantized(tmp_path):
    """The demo model quantized by our AWQ, through the CPU int4 kernel and through weights
    dequantized once, float32 activations elsewhere in both: the same greedy answers, but for
    box coordinates, by a few units. The kernel reads activations and scales in bfloat16, and
    the model writes a box's last digits from nearly flat distributions (its boxes are good to
    about 25 units of 1000), where such a rounding can pick a neighbouring digit."""
    awq = quantize(DEMO_MODEL, tmp_path / "awq", "awq", 64, default_calibration(n_per_task=1), log=lambda line: None)
    processor = Processor.from_pretrained(awq)
    conversations = [sample.messages for sample in make_samples(3, seed=31)]
    answers = {}
    for kernel in (True, False):
        network = load_model(awq, dtype=torch.float32, int4_kernel=kernel)
        assert sum(isinstance(m, Int4Linear) for m in network.modules()) == (24 if kernel else 0)
        llm = Qwen2VL(LLMEngine(network, processor, max_model_len=512), processor, awq)
        answers[kernel] = [answer.raw_text for answer in llm.chat(conversations, temperature=0.0, max_tokens=48)]
    assert len(set(answers[False])) > len(conversations) // 2  # answers that differ, boxes among them
    assert [box_gap(*pair) < 50 for pair in zip(answers[True], answers[False])] == [True] * len(conversations)


def test_scale_search_protects_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    x[:, :4] *= 30  # a few channels with large activations, as in real LLMs
    weight = torch.randn(48, 64, generator=generator) * 0.1
    output = lambda inputs, w: inputs @ w.T  # noqa: E731
    scales = search_scales(x, weight, 32, output)
    rtn_error = (output(x, fake_quantize(weight, 32)) - output(x, weight)).pow(2).mean()
    awq_error = (output(x, fake_quantize(weight * scales, 32) / scales) - output(x, weight)).pow(2).mean()
    assert awq_error < 0.5 * rtn_error
    assert scales[:4].mean() > scales[4:].mean()


def test_cli_refuses_a_group_size_that_does_not_divide(source, tmp_path, capsys):
    assert main(["quantize", str(source), str(tmp_path / "out"), "--group-size", "128", "--method", "rtn"]) == 2
    assert capsys.readouterr().err == (
        f"qwen2vl: loading {source}\n"
        "qwen2vl: error: --group-size 128 does not divide the 96 inputs of language_model.layers.0.mlp.down_proj "
        "(the decoder's linears take 96 and 128 inputs); use --group-size 32\n")
    assert not (tmp_path / "out").exists()


def test_the_readmes_default_group_size_on_the_demo_model_suggests_64(tmp_path, capsys):
    assert main(["quantize", str(DEMO_MODEL), str(tmp_path / "out"), "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert "--group-size 128 does not divide the 64 inputs of language_model.layers.0.self_attn.qkv_proj" in err
    assert err.endswith("use --group-size 64\n")


def test_a_non_empty_output_dir_is_refused_unless_forced(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    with monkeypatch.context() as patch:
        patch.setattr(Qwen2VL, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
        assert main(["quantize", str(source), str(out), "--group-size", "32", "--method", "rtn"]) == 2
        assert capsys.readouterr().err == (f"qwen2vl: error: output {out} exists and is not empty; choose a new "
                                           "directory, or pass --force to replace the checkpoint in it\n")
        assert main(["quantize", str(source), str(source), "--group-size", "32", "--force"]) == 2
        assert "is the source checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model-00002-of-00002.safetensors", "notes.txt"]
    assert main(["quantize", str(source), str(out), "--group-size", "32", "--method", "rtn", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # the stale shard is gone
    assert load_model(out).config.quant.group_size == 32


def test_the_weights_file_gets_the_mode_of_the_other_files(quantized):
    for out in quantized:  # safetensors writes 0600 on its own
        assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_awq_of_a_real_model_needs_a_calibration_choice(source, tmp_path, capsys, monkeypatch):
    import qwen2vl.quantize
    from qwen2vl.errors import InputError

    with pytest.raises(InputError, match="needs calibration conversations like the ones it will answer") as caught:
        quantize(source, tmp_path / "out", "awq", GROUP, log=lambda line: None)
    assert caught.value.field == "calibration" and not (tmp_path / "out").exists()
    assert main(["quantize", str(source), str(tmp_path / "out"), "--group-size", str(GROUP)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2vl: error: AWQ of {source} needs calibration conversations")
    assert "--calibration shapes uses it anyway, and --method rtn needs none" in err
    chosen = []
    monkeypatch.setattr(qwen2vl.quantize, "quantize",
                        lambda *args, calibration, **kw: chosen.append(calibration) or args[1])
    assert main(["quantize", str(source), str(tmp_path / "out"), "--calibration", "shapes"]) == 0
    assert chosen == [default_calibration()]
