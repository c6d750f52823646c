"""Normalizations. RMSNorm statistics are taken in float32 whatever the compute dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.triton_runs(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm of the new residual stream, the stream `x + residual`; `x` alone when there is
        no residual yet). One launch on the GPU instead of an add and a norm."""
        if residual is None:
            return self(x), x
        if kernels.triton_runs(x):
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        stream = x + residual
        return self(stream), stream


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
