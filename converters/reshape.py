"""Layout changes between original frameworks and torch, each a named `Op` that
carries its inverse; a rule of a family's table (converters/rename.py) names the op
its tensor goes through.

Every op is a view or permutation (no arithmetic; the batch-norm counter's is a dtype
widening), so a converted weight holds the same numbers as the original.
parity_tests/test_properties.py checks, for every op the tables use and random shapes,
that it round-trips and that the torch layer computes the same map as the original
framework's layer with the original layout, and for every variant that the inverse
table restores the original state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Op:
    """A named layout change and its inverse.

    `inverse(converted, like)` gets the original tensor's shape and dtype from `like`
    (a meta tensor will do): a torch layout alone cannot tell, say, how many heads an
    attention kernel had. An op with `outputs` > 1 returns that many tensors (one
    source key, several targets) and its inverse takes them as a tuple."""

    name: str
    forward: Callable
    inverse: Callable
    outputs: int = 1

    def __call__(self, tensor: torch.Tensor):
        return self.forward(tensor)

    def __repr__(self) -> str:
        return self.name


def split_qkv(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3D, ...) fused in-projection -> q, k, v, each (D, ...).

    Both PyTorch layouts in use (timm's `qkv` and nn.MultiheadAttention's
    `in_proj_weight`) stack q, k, v along dim 0 in that order.
    """
    if fused.shape[0] % 3:
        raise ValueError(f"fused qkv has {fused.shape[0]} rows, not a multiple of 3")
    return tuple(fused.chunk(3, dim=0))  # type: ignore[return-value]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v], dim=0)


def matmul_kernel_to_linear(kernel: torch.Tensor) -> torch.Tensor:
    """A matrix (in, out) applied as x @ w (Flax/Haiku dense kernels, CLIP's text and visual
    projections) -> torch Linear weight (out, in)."""
    return kernel.T


def linear_to_matmul_kernel(weight: torch.Tensor) -> torch.Tensor:
    return weight.T


def heads_in_kernel_to_linear(kernel: torch.Tensor) -> torch.Tensor:
    """Flax attention q/k/v kernel (D, heads, head_dim) -> Linear weight (heads*head_dim, D)."""
    d, h, hd = kernel.shape
    return kernel.reshape(d, h * hd).T


def linear_to_heads_in_kernel(weight: torch.Tensor, heads: int) -> torch.Tensor:
    out, d = weight.shape
    return weight.T.reshape(d, heads, out // heads)


def heads_bias_to_linear(bias: torch.Tensor) -> torch.Tensor:
    """Flax attention q/k/v bias (heads, head_dim) -> (heads*head_dim,)."""
    return bias.reshape(-1)


def linear_to_heads_bias(bias: torch.Tensor, heads: int) -> torch.Tensor:
    return bias.reshape(heads, -1)


def heads_out_kernel_to_linear(kernel: torch.Tensor) -> torch.Tensor:
    """Flax attention output kernel (heads, head_dim, D) -> Linear weight (D, heads*head_dim)."""
    h, hd, d = kernel.shape
    return kernel.reshape(h * hd, d).T


def linear_to_heads_out_kernel(weight: torch.Tensor, heads: int) -> torch.Tensor:
    d, inner = weight.shape
    return weight.T.reshape(heads, inner // heads, d)


def conv_kernel_channels_last_to_first(kernel: torch.Tensor) -> torch.Tensor:
    """(*spatial, in, out) kernel (Flax/Haiku HWIO, THWIO) -> torch (out, in, *spatial).

    Only the channel axes move; the spatial axes keep their order (reversing all
    axes would also swap H and W, a transposed filter).
    """
    n = kernel.dim()
    return kernel.permute(n - 1, n - 2, *range(n - 2))


def conv_kernel_channels_first_to_last(weight: torch.Tensor) -> torch.Tensor:
    n = weight.dim()
    return weight.permute(*range(2, n), 1, 0)


def flatten(tensor: torch.Tensor) -> torch.Tensor:
    """hk.BatchNorm keeps its parameters and statistics as (1, 1, 1, C); torch as (C,)."""
    return tensor.reshape(-1)


def to_int64(count: torch.Tensor) -> torch.Tensor:
    """An update counter as torch's num_batches_tracked (int64)."""
    return count.to(torch.int64)


SPLIT_QKV = Op("split_qkv", split_qkv, lambda parts, like: merge_qkv(*parts), outputs=3)
MATMUL_KERNEL_TO_LINEAR = Op("matmul_kernel_to_linear", matmul_kernel_to_linear,
                             lambda weight, like: linear_to_matmul_kernel(weight))
HEADS_IN_KERNEL_TO_LINEAR = Op("heads_in_kernel_to_linear", heads_in_kernel_to_linear,
                               lambda weight, like: linear_to_heads_in_kernel(weight, like.shape[1]))
HEADS_BIAS_TO_LINEAR = Op("heads_bias_to_linear", heads_bias_to_linear,
                          lambda bias, like: linear_to_heads_bias(bias, like.shape[0]))
HEADS_OUT_KERNEL_TO_LINEAR = Op("heads_out_kernel_to_linear", heads_out_kernel_to_linear,
                                lambda weight, like: linear_to_heads_out_kernel(weight, like.shape[0]))
CONV_KERNEL_CHANNELS_LAST_TO_FIRST = Op("conv_kernel_channels_last_to_first", conv_kernel_channels_last_to_first,
                                        lambda weight, like: conv_kernel_channels_first_to_last(weight))
FLATTEN = Op("flatten", flatten, lambda flat, like: flat.reshape(like.shape))
TO_INT64 = Op("to_int64", to_int64, lambda count, like: count.to(like.dtype))
