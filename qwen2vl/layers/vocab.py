"""The vocabulary table: token embeddings, and the LM head's weight (the same table when tied).

`VocabTable` keeps the checkpoint's rows; `Int8VocabTable` (swapped in by the loader where a
4-bit checkpoint runs on an int4 kernel, CPU or GPU) keeps int8 rows with one scale each, looks
embeddings up from them and computes logits with the int8 kernel: half the bytes per decoded
token, and the bfloat16 table is gone from memory.
"""
from __future__ import annotations

import torch
from torch import nn

from qwen2vl import kernels


class VocabTable(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits `[rows, vocab]`."""
        return (x @ self.weight.T).float()


class Int8VocabTable(nn.Module):
    """int8 rows with one scale each, filled block by block as the loader reads the checkpoint's
    table (`fill_rows`): the bfloat16 table is never whole in memory."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("values", torch.empty(vocab_size, hidden_size, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(vocab_size, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def fill_rows(self, start: int, rows: torch.Tensor) -> None:
        values, scales = kernels.int8_rows(rows, self.dtype)
        self.values[start:start + len(rows)] = values
        self.scales[start:start + len(rows)] = scales

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.values[token_ids].to(self.dtype) * self.scales[token_ids, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_matmul(x.to(self.dtype), self.values, self.scales).float()
