"""The sparse MLP of a mixture-of-experts decoder (Qwen3-VL-MoE).

A router scores the experts for each token (softmax in float32), the token goes to the top k,
and its output is the sum of their SwiGLU MLPs' outputs weighted by those probabilities
(renormalized to sum to 1 over the chosen experts where the config says so).

The experts' weights are stacked: `gate_up_proj [E, 2I, H]` (per expert, a fused [gate | up]
`Linear`'s weight) and `down_proj [E, H, I]`. The (token, expert) pairs are sorted by expert, so
each expert's rows are contiguous and one matmul each: a loop over the experts in torch (exact,
the CPU path), one grouped-GEMM launch for all of them in Triton on CUDA (`qwen2vl.kernels`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl import kernels
from qwen2vl.config import MoEConfig
from qwen2vl.layers.activation import silu_and_mul


class Router(nn.Module):
    """`weight [E, H]`: each expert's logit is its row times the token."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights `[T, k]` in x's dtype, experts `[T, k]`) of each token's top-k experts."""
        probs = F.linear(x, self.weight).float().softmax(dim=-1)
        weights, experts = probs.topk(top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


class Experts(nn.Module):
    """The experts' SwiGLU MLPs, stacked (see the module's docstring for the layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`x [T, H]`, each token's top-k `experts [T, k]` and their `weights [T, k]` -> `[T, H]`."""
        num_tokens, top_k = experts.shape
        order = experts.flatten().argsort(stable=True)  # (token, slot) pairs, by expert
        offsets = torch.searchsorted(experts.flatten()[order],
                                     torch.arange(self.gate_up_proj.shape[0] + 1, device=x.device))
        matmul = kernels.moe_grouped_matmul if kernels.triton_runs(x) else grouped_matmul
        h = silu_and_mul(matmul(x, self.gate_up_proj, offsets, rows=order // top_k))
        y = matmul(h, self.down_proj, offsets) * weights.flatten()[order, None]
        return torch.empty_like(y).index_copy_(0, order, y).view(num_tokens, top_k, -1).sum(dim=1)


class SparseMoeBlock(nn.Module):
    """Qwen3-VL-MoE's sparse MLP: `gate` (the router) and `experts`, as the checkpoints name them."""

    def __init__(self, hidden_size: int, moe: MoEConfig):
        super().__init__()
        self.top_k, self.normalize = moe.num_experts_per_tok, moe.norm_topk_prob
        self.gate = Router(hidden_size, moe.num_experts)
        self.experts = Experts(moe.num_experts, hidden_size, moe.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, experts = self.gate(tokens, self.top_k, self.normalize)
        return self.experts(tokens, weights, experts).view(x.shape)


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """`[P, N]`: for each expert `e`, rows `offsets[e]:offsets[e + 1]` are `a[rows]` (or `a`) times
    `weight[e]^T` (`weight [E, N, K]`), one matmul per expert that has rows."""
    a = a if rows is None else a[rows]
    out = a.new_empty(a.shape[0], weight.shape[1])
    bounds = offsets.tolist()
    for expert, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if end > start:
            torch.mm(a[start:end], weight[expert].t(), out=out[start:end])
    return out
