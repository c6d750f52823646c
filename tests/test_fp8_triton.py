"""The block-scaled FP8 Triton kernel (`kernels.triton_fp8`) equals its torch reference.

Without a GPU it runs under Triton's interpreter, which must be on before triton is first
imported; where something earlier in this process imported triton without it (transformers'
models do), the cases run in a fresh process. The interpreter converts e4m3 as torch does, but
does not emulate bfloat16: bfloat16 is checked on a GPU only, float16 runs the same code here.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_THIS_PROCESS = DEVICE == "cuda" or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"

if not IN_THIS_PROCESS:
    def test_fp8_kernel_cases_in_a_fresh_interpreter_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        path = Path(__file__)
        done = subprocess.run([sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, env=env, cwd=path.parent.parent, timeout=600)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
        assert done.returncode == 0 and " passed" in summary, done.stdout[-4000:] + done.stderr[-2000:]
else:
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton", reason="triton is not installed: the FP8 kernel cannot be checked")

    from qwen2vl import kernels
    from qwen2vl.layers import quantization as q
    from qwen2vl.layers.linear import FP8Linear, Linear
    import reference_ops

    BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="the Triton interpreter does not emulate bfloat16 (checked on the GPU)"))
    ULP = {torch.float16: 2**-10, torch.bfloat16: 2**-7}

    def test_every_finite_e4m3_code_converts_exactly():
        """Identity activations read the weight back: each of the 254 finite codes (subnormals,
        both zeros, +-448), times a power-of-two block scale, exactly."""
        codes = torch.arange(256, dtype=torch.int32)
        codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)  # 0x7F, 0xFF: NaN
        weight = codes.view(q.FP8_DTYPE).reshape(2, 127)  # [N=2, K=127]
        scale_inv = torch.tensor([[0.5, 4.0, 0.25]])  # columns 0-63, 64-127 (of 127), one row block
        x = torch.eye(127, dtype=torch.float16)
        rows = q.fp8_scale_rows((2,), 8)
        out = kernels.fp8_block_linear(x.to(DEVICE), weight.to(DEVICE), scale_inv.to(DEVICE), rows.to(DEVICE), 64)
        expected = q.dequantize_fp8_blocks(weight, scale_inv, rows, 64).t().half()
        assert torch.equal(out.cpu(), expected)

    @pytest.mark.parametrize("dtype", [torch.float16, BF16])
    @pytest.mark.parametrize("m", [1, 5, 40])
    def test_fp8_block_matmul_matches_reference(m, dtype):
        """A fused projection whose parts (40, 24, 20 rows) are not multiples of the 16-row blocks,
        K = 100 not a multiple of the 24-column blocks or of the kernel's K tile; M and N tails."""
        generator = torch.Generator().manual_seed(m)
        sizes, k, block = (40, 24, 20), 100, (16, 24)
        parts = [q.quantize_fp8_blocks(torch.randn(size, k, generator=generator) * 0.1, block) for size in sizes]
        weight = torch.cat([values for values, _ in parts]).to(DEVICE)
        scale_inv = torch.cat([scales for _, scales in parts]).to(DEVICE)
        rows = q.fp8_scale_rows(sizes, block[0], DEVICE)
        x = torch.randn(m, k, generator=generator).to(DEVICE, dtype)
        bias = (torch.randn(sum(sizes), generator=generator) * 0.1).to(DEVICE, dtype)
        for b in (None, bias):
            out = kernels.fp8_block_linear(x, weight, scale_inv, rows, block[1], b)
            expected = reference_ops.fp8_block_matmul_reference(x, weight, scale_inv, rows, block[1], b)
            assert out.shape == (m, sum(sizes)) and out.dtype == dtype
            # Same products, float32 sums in another order: at most a rounding step of the output apart.
            torch.testing.assert_close(out.float(), expected.float(), rtol=ULP[dtype], atol=ULP[dtype] * 0.25)

    @pytest.mark.parametrize("dtype", [torch.float16, BF16])
    def test_fp8_linear_on_the_kernel_equals_the_dequantized_layer(dtype):
        """What the loader keeps on a GPU with FP8: the layer's call, leading dims kept."""
        generator = torch.Generator().manual_seed(3)
        sizes, k, block = (48, 16, 16), 64, (32, 32)
        layer = FP8Linear(Linear(k, list(sizes), bias=True), block)
        parts = [q.quantize_fp8_blocks(torch.randn(size, k, generator=generator) * 0.1, block) for size in sizes]
        layer.weight.data = torch.cat([values for values, _ in parts])
        layer.weight_scale_inv = torch.cat([scales for _, scales in parts])
        layer.bias.data = torch.randn(sum(sizes), generator=generator).to(dtype) * 0.1
        layer = layer.to(DEVICE)
        reference = copy.deepcopy(layer)
        reference.dequantize_(dtype)
        layer.use_kernel_()
        assert layer.weight.dtype == q.FP8_DTYPE and layer.weight_scale_inv is not None
        x = torch.randn(2, 3, k, generator=generator).to(DEVICE, dtype)
        out, expected = layer(x), reference(x)
        assert out.shape == (2, 3, sum(sizes)) and out.dtype == dtype
        tolerance = 4 * ULP[dtype]
        torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance,
                                   atol=tolerance * expected.abs().max().item())

    def test_fp8_kernel_runs_only_on_gpus_with_fp8():
        assert not kernels.fp8_kernel_runs(torch.device("cpu"), torch.bfloat16)
        if DEVICE == "cuda":
            has_fp8 = torch.cuda.get_device_capability() >= (8, 9)
            assert kernels.fp8_kernel_runs(torch.device("cuda"), torch.bfloat16) == has_fp8
            assert not kernels.fp8_kernel_runs(torch.device("cuda"), torch.float32)

    @pytest.mark.skipif(DEVICE == "cuda", reason="forces the kernel on the CPU, under the interpreter")
    def test_the_loader_keeps_fp8_for_the_kernel_where_it_runs(tmp_path, monkeypatch):
        """Where `fp8_kernel_runs` (forced here on the CPU, where the interpreter runs the kernel
        on float32 activations) and a kernel is wanted, decoder linears stay FP8 and the model's
        logits are the dequantized model's."""
        from checkpoints import prefill_batch, reference_config
        from qwen2vl.loader import load_model
        from qwen2vl.tools.random_checkpoint import write_random_checkpoint

        ckpt = write_random_checkpoint(reference_config("a").to_dict(), tmp_path, quant="fp8", group_size=24)
        reference = load_model(ckpt, dtype=torch.float32)
        monkeypatch.setattr(kernels, "fp8_kernel_runs", lambda device, dtype: True)
        unwanted = load_model(ckpt, dtype=torch.float32, int4_kernel=False)
        assert unwanted.language_model.layers[0].self_attn.qkv_proj.weight_scale_inv is None  # dequantized
        model = load_model(ckpt, dtype=torch.float32, int4_kernel=True)
        qkv = model.language_model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv, FP8Linear) and qkv.weight.dtype == q.FP8_DTYPE and qkv.scale_rows is not None
        assert reference.language_model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
        ids = torch.tensor([151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198])
        positions = torch.arange(len(ids)).expand(3, -1)
        logits = []
        for m in (model, reference):
            attn, caches, _ = prefill_batch(m.config.text, [len(ids)], block_size=4)
            with torch.no_grad():
                logits.append(m(ids, positions, attn, caches, None, None, torch.arange(len(ids))))
        assert (logits[0] - logits[1]).abs().max() <= 1e-4 * logits[1].abs().max()
        assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
