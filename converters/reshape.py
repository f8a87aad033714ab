"""Layout changes between original frameworks and torch, each with its inverse.

Every op is a view or permutation (no arithmetic), so a converted weight holds the
same numbers as the original. parity_tests/test_reshape_ops.py checks, for random
shapes, that each op round-trips and that the torch layer computes the same map as
the original framework's layer with the original layout.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch


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


def split_fused_qkv(state_dict: Mapping[str, torch.Tensor], pattern: str, target: str,
                    names: tuple[str, str, str] = ("q", "k", "v")) -> dict[str, torch.Tensor]:
    """Every key fully matching `pattern` (a regex with named groups) is split into
    three, named by `target` formatted with those groups and `qkv` in `names`; other
    keys pass through. E.g. `(?P<m>.+)\\.in_proj_(?P<p>weight|bias)` -> `{m}.{qkv}_proj.{p}`."""
    regex, out = re.compile(pattern), {}
    for key, value in state_dict.items():
        m = regex.fullmatch(key)
        if m is None:
            out[key] = value
            continue
        for name, part in zip(names, split_qkv(value)):
            out[target.format(qkv=name, **m.groupdict())] = part
    return out


def dense_kernel_to_linear(kernel: torch.Tensor) -> torch.Tensor:
    """Flax/Haiku dense kernel (in, out), used as x @ w -> torch Linear weight (out, in)."""
    return kernel.T


def linear_to_dense_kernel(weight: torch.Tensor) -> torch.Tensor:
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
