"""Linear layers: plain, and the weight-only quantized forms that replace them at load.

A model builds only `Linear`s. When a checkpoint is quantized, the loader swaps the decoder's
`Linear`s for `AWQLinear` / `GPTQLinear` (same `in_features`, `out_features`, `output_sizes`,
same call), so model code never knows. Once their checkpoint tensors are in, the loader either
dequantizes them once to a `weight` in the compute dtype (the reference path), or swaps them
again for an `Int4Linear`, which keeps only a 4-bit kernel's layout and no dequantized weight.
Block-scaled FP8 checkpoints swap in an `FP8Linear`: dequantized the same way, or kept in FP8
for the FP8 kernel where one runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl import kernels
from qwen2vl.layers import quantization as q


class Linear(nn.Module):
    """`y = x W^T + b`. `output_sizes` lists the parts of a fused projection (q|k|v, gate|up);
    the loader fills each part from its own checkpoint tensor."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = tuple(out_features) if isinstance(out_features, (list, tuple)) else (out_features,)
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def checkpoint_shapes(self, out_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the checkpoint tensors of one part with `out_features` outputs."""
        shapes = {"weight": (out_features, self.in_features)}
        if self.bias is not None:
            shapes["bias"] = (out_features,)
        return shapes

    # Parts of a fused projection are stacked along this dim of each checkpoint tensor.
    part_dims = {"weight": 0, "bias": 0}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, output_sizes={self.output_sizes}, bias={self.bias is not None}"


class QuantizedLinear(Linear):
    """Shared shape of AWQ / GPTQ linears: packed int32 tensors + scales, and a dequantized weight."""

    packed_names: tuple[str, ...] = ()

    def __init__(self, linear: Linear, bits: int, group_size: int):
        super().__init__(linear.in_features, list(linear.output_sizes), bias=linear.bias is not None)
        self.bits = bits
        self.group_size = group_size if group_size > 0 else linear.in_features
        self.pack_factor = 32 // bits
        if self.in_features % self.group_size:
            raise ValueError(f"in_features {self.in_features} is not a multiple of group_size {self.group_size}")
        # Filled by the loader (packed tensors) and by `dequantize_` (weight).
        self.weight = None
        for name, shape in self.checkpoint_shapes(self.out_features).items():
            if name in self.packed_names:
                self.register_buffer(name, torch.empty(shape, dtype=torch.int32))

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def dequantize_(self, dtype: torch.dtype) -> None:
        """Materialize `weight [out, in]` in the compute dtype from the packed tensors."""
        self.weight = nn.Parameter(self.dequantized().to(dtype), requires_grad=False)

    # What the int4 kernel layout is made from: with `input_order` None (else the input read as
    # `x[..., input_order]`), `W[n, j] = (values[n, j] - zero_points[j // g, n]) * scales[j // g, n]`.
    input_order: torch.Tensor | None = None

    def values(self, start: int, end: int) -> torch.Tensor:
        """int32 `[end - start, K]`: the quantized values of output features `start:end`."""
        raise NotImplementedError

    def zero_points(self) -> torch.Tensor:
        """int32 `[G, N]`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


class AWQLinear(QuantizedLinear):
    """AWQ GEMM layout: qweight `[K, N/8]`, qzeros `[K/g, N/8]`, scales `[K/g, N]` (packed along N)."""

    packed_names = ("qweight", "qzeros")
    part_dims = {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}

    def __init__(self, linear: Linear, bits: int, group_size: int):
        super().__init__(linear, bits, group_size)
        self.register_buffer("scales", torch.empty(self.num_groups, self.out_features, dtype=torch.float16))

    def checkpoint_shapes(self, out_features: int) -> dict[str, tuple[int, ...]]:
        shapes = {
            "qweight": (self.in_features, out_features // self.pack_factor),
            "qzeros": (self.num_groups, out_features // self.pack_factor),
            "scales": (self.num_groups, out_features),
        }
        if self.bias is not None:
            shapes["bias"] = (out_features,)
        return shapes

    def dequantized(self) -> torch.Tensor:
        return q.dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size)

    def values(self, start, end):
        return q.unpack_awq(self.qweight[:, start // self.pack_factor: end // self.pack_factor]).t()

    def columns(self, start: int, end: int) -> torch.Tensor:
        """uint8 `[K, end - start]`: `values(start, end)` transposed, as AWQ stores them."""
        return q.unpack_awq_bytes(self.qweight[:, start // self.pack_factor: end // self.pack_factor])

    def zero_points(self):
        return q.unpack_awq(self.qzeros)


class GPTQLinear(QuantizedLinear):
    """GPTQ layout: qweight `[K*bits/32, N]` (packed along K), qzeros `[G, N*bits/32]`,
    scales `[G, N]`, g_idx `[K]` (the group of each input row; permuted when desc_act)."""

    packed_names = ("qweight", "qzeros", "g_idx")
    part_dims = {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0, "g_idx": None}

    def __init__(self, linear: Linear, bits: int, group_size: int, zero_offset: int):
        super().__init__(linear, bits, group_size)
        self.zero_offset = zero_offset  # 1 for the original format, which stores zero - 1
        self.register_buffer("scales", torch.empty(self.num_groups, self.out_features, dtype=torch.float16))

    def checkpoint_shapes(self, out_features: int) -> dict[str, tuple[int, ...]]:
        shapes = {
            "qweight": (self.in_features // self.pack_factor, out_features),
            "qzeros": (self.num_groups, out_features // self.pack_factor),
            "scales": (self.num_groups, out_features),
            "g_idx": (self.in_features,),
        }
        if self.bias is not None:
            shapes["bias"] = (out_features,)
        return shapes

    def dequantized(self) -> torch.Tensor:
        return q.dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset)

    @property
    def input_order(self) -> torch.Tensor | None:
        # act-order (desc_act) scatters each group's input rows; reading the input in group order
        # makes the groups contiguous again.
        order = torch.argsort(self.g_idx, stable=True)
        return None if torch.equal(order, torch.arange(self.in_features, device=order.device)) else order

    def values(self, start, end):
        values = q.unpack_words(self.qweight[:, start:end].t(), self.bits).flatten(1)
        order = self.input_order
        return values if order is None else values[:, order]

    def zero_points(self):
        return q.unpack_gptq_zeros(self.qzeros, self.bits) + self.zero_offset

    @property
    def groups_are_equal(self) -> bool:
        """Every group holds `group_size` input rows (what a contiguous-group layout needs)."""
        counts = torch.bincount(self.g_idx.long(), minlength=self.num_groups)
        return counts.numel() == self.num_groups and bool((counts == self.group_size).all())


class FP8Linear(Linear):
    """Block-scaled FP8 (Qwen's `*-FP8` checkpoints): `weight` e4m3 `[N, K]` and `weight_scale_inv`
    float32, one scale per `block_size` = (rows, columns) block of each part of a fused
    projection: `W[n, k] = weight[n, k] * scale`, the scale of n's block row and k's block column.

    Once loaded, either dequantized to a float `weight` (`dequantize_`: the reference path, and
    then a plain `Linear`'s call) or kept in FP8 for the kernel (`use_kernel_`).
    """

    part_dims = {"weight": 0, "weight_scale_inv": 0, "bias": 0}
    # Read from the checkpoint in these dtypes, not the compute dtype.
    stored_dtypes = {"weight": q.FP8_DTYPE, "weight_scale_inv": torch.float32}

    def __init__(self, linear: Linear, block_size: tuple[int, int]):
        super().__init__(linear.in_features, list(linear.output_sizes), bias=linear.bias is not None)
        self.block_size = tuple(block_size)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=q.FP8_DTYPE),
                                   requires_grad=False)
        scale_rows = sum(self.checkpoint_shapes(size)["weight_scale_inv"][0] for size in self.output_sizes)
        self.register_buffer("weight_scale_inv", torch.empty(scale_rows, -(-self.in_features // block_size[1])))
        self.register_buffer("scale_rows", None)  # `use_kernel_`: the scale row of each output row

    def checkpoint_shapes(self, out_features: int) -> dict[str, tuple[int, ...]]:
        rows, cols = self.block_size
        return {**super().checkpoint_shapes(out_features),
                "weight_scale_inv": (-(-out_features // rows), -(-self.in_features // cols))}

    def dequantized(self) -> torch.Tensor:
        """float32 `[N, K]`, exact."""
        scale_rows = q.fp8_scale_rows(self.output_sizes, self.block_size[0], self.weight.device)
        return q.dequantize_fp8_blocks(self.weight, self.weight_scale_inv, scale_rows, self.block_size[1])

    def dequantize_(self, dtype: torch.dtype) -> None:
        """Replace the FP8 weight and its scales by the dequantized weight in `dtype`."""
        self.weight = nn.Parameter(self.dequantized().to(dtype), requires_grad=False)
        self.weight_scale_inv = None

    def use_kernel_(self) -> None:
        """Keep the FP8 weight: calls run `kernels.fp8_block_linear` (where `kernels.fp8_kernel_runs`)."""
        self.scale_rows = q.fp8_scale_rows(self.output_sizes, self.block_size[0], self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return super().forward(x)
        return kernels.fp8_block_linear(x, self.weight, self.weight_scale_inv, self.scale_rows, self.block_size[1],
                                        self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, fp8={self.weight_scale_inv is not None}"


class Int4Linear(nn.Module):
    """A 4-bit AWQ / GPTQ linear kept only in a packed kernel's layout (see `qwen2vl.kernels`:
    torch's int4 CPU kernel, or the Triton W4A16 kernel on CUDA).

    Same `in_features`, `out_features`, `output_sizes` and call as the linear it replaces.
    `layout`: the packed tensors made already (`layout()` of an earlier one, as the load cache
    keeps it), in place of packing `source`'s (then only its shape and bias are read).
    """

    def __init__(self, source: QuantizedLinear, backend: str, layout: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.output_sizes, self.group_size, self.backend = source.output_sizes, source.group_size, backend
        if layout is None:
            # The checkpoint's qweight has the CPU layout's byte count: written over, not copied.
            weight = kernels.pack_int4(backend, source.values, source.scales, source.zero_points(),
                                       reuse=source.qweight, columns=getattr(source, "columns", None))
            input_order = source.input_order
        else:
            weight = {name: tensor for name, tensor in layout.items() if name != "input_order"}
            input_order = layout.get("input_order")
        self.weight_names = tuple(weight)
        for name, tensor in weight.items():
            self.register_buffer(name, tensor)
        self.register_buffer("input_order", input_order)
        self.bias = source.bias

    def layout(self) -> dict[str, torch.Tensor]:
        """The packed tensors (and the input order, where there is one) that rebuild this linear."""
        weight = {name: getattr(self, name) for name in self.weight_names}
        return weight if self.input_order is None else {**weight, "input_order": self.input_order}

    @staticmethod
    def backend_for(source: QuantizedLinear, dtype: torch.dtype, wanted: str | None = None) -> str | None:
        """The packed backend that runs `source` where it sits with activations in `dtype`
        (`wanted`: one by name), or None: it stays dequantized."""
        equal_groups = not isinstance(source, GPTQLinear) or source.groups_are_equal
        if source.bits != 4 or not equal_groups:
            return None
        return kernels.int4_backend(source.qweight.device, dtype, source.out_features, source.in_features,
                                    source.group_size, wanted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        weight = {name: getattr(self, name) for name in self.weight_names}
        return kernels.int4_linear(self.backend, x, weight, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, output_sizes={self.output_sizes}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, act_order={self.input_order is not None}, backend={self.backend}")
