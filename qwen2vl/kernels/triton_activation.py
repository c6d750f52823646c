"""SwiGLU on a fused [gate | up] projection in Triton (reference: `layers.activation.silu_and_mul`).

`silu(gate)` is computed in float32 and rounded to the activation dtype before the product with
`up` is taken and rounded, as the reference's two torch ops do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[..., 2I]` -> `[..., I]` in gate_up's dtype."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], width, device=gate_up.device, dtype=gate_up.dtype)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, BLOCK))](rows, out, rows.stride(0), width, BLOCK=BLOCK)
    return out.view(*gate_up.shape[:-1], width)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_up_ptr + row * stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride + width + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * width + cols, (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)
