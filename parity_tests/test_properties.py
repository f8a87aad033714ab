"""Property tests: rename tables and reshape ops, for random sizes."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from converters import reshape
from converters.registry import family_module, get_variant
from converters.rename import RenameError, rename_keys, rules
from fixtures import harness
from converters import pipeline

# ---- rename tables ---------------------------------------------------------------------------

@functools.cache
def _structures(variant_name: str, layers: int) -> tuple[dict, dict]:
    """Original and HF state dicts (meta tensors) of the variant at this depth."""
    variant = get_variant(variant_name)
    original = harness.original(variant.family)
    spec = {**pipeline.spec_of(variant), **{k: layers for k in original.depth_keys}}
    return original.on_meta(spec), harness.hf_state_on_meta(variant, spec), spec


# Each example builds two full-width models on the meta device (about 40 ms per depth,
# 24 depths x 39 variants was 46 s of a 100 s suite). Depth only repeats the tables'
# per-layer rules, the published depth is checked by test_full_size_structure, so a
# few depths per variant run by default and the nightly profile walks all 24.
DEPTH_EXAMPLES = 24 if settings.get_current_profile_name() == "nightly" else 5


@settings(max_examples=DEPTH_EXAMPLES)
@given(layers=st.integers(min_value=1, max_value=24))
def test_conversion_is_injective_and_total(variant, layers):
    """For any depth the converter consumes every original key (its rename table
    raises on a key no rule matches and on two keys landing on one name) and yields
    exactly the HF model's keys and shapes."""
    original, hf, spec = _structures(variant.name, layers)
    converted = pipeline.for_installed_transformers(variant, family_module(variant.family).convert(original, spec))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in hf.items()}


def test_rename_engine_refuses_gaps_and_collisions():
    table = rules(("a.{i}.w", "x.{i}.w"), ("b", "x.0.w"))
    with pytest.raises(RenameError, match="match no rename rule: \\['c'\\]"):
        rename_keys(["a.1.w", "c"], table)
    with pytest.raises(RenameError, match="not injective"):
        rename_keys(["a.0.w", "b"], table)
    with pytest.raises(RenameError, match="several rules"):
        rename_keys(["a.0.w"], rules(("a.{i}.w", "x"), ("a.0.{p}", "y")))


# ---- reshape ops ------------------------------------------------------------------------------

dims = st.integers(min_value=1, max_value=6)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(d=dims, heads=dims, n=dims, seed=st.integers(0, 2**16))
def test_split_qkv(d, heads, n, seed):
    width = d * heads
    fused_w, fused_b, x = _randn(3 * width, width, seed=seed), _randn(3 * width, seed=seed + 1), _randn(n, width, seed=seed + 2)
    q, k, v = reshape.split_qkv(fused_w)
    assert torch.equal(reshape.merge_qkv(q, k, v), fused_w)
    # The fused layer's output, split in three, is what the three layers compute.
    fused_out = F.linear(x, fused_w, fused_b)
    parts = [F.linear(x, w, b) for w, b in zip((q, k, v), reshape.split_qkv(fused_b))]
    assert torch.allclose(torch.cat(parts, -1), fused_out)


@given(i=dims, o=dims, n=dims, seed=st.integers(0, 2**16))
def test_dense_kernel(i, o, n, seed):
    kernel, x = _randn(i, o, seed=seed), _randn(n, i, seed=seed + 1)
    weight = reshape.dense_kernel_to_linear(kernel)
    assert torch.equal(reshape.linear_to_dense_kernel(weight), kernel)
    assert torch.allclose(F.linear(x, weight), x @ kernel)  # Flax/Haiku: x @ w


@given(d=dims, heads=dims, hd=dims, n=dims, seed=st.integers(0, 2**16))
def test_attention_kernels(d, heads, hd, n, seed):
    qk, qb, out = _randn(d, heads, hd, seed=seed), _randn(heads, hd, seed=seed + 1), _randn(heads, hd, d, seed=seed + 2)
    x, y = _randn(n, d, seed=seed + 3), _randn(n, heads, hd, seed=seed + 4)
    w, b, wo = reshape.heads_in_kernel_to_linear(qk), reshape.heads_bias_to_linear(qb), reshape.heads_out_kernel_to_linear(out)
    assert torch.equal(reshape.linear_to_heads_in_kernel(w, heads), qk)
    assert torch.equal(reshape.linear_to_heads_bias(b, heads), qb)
    assert torch.equal(reshape.linear_to_heads_out_kernel(wo, heads), out)
    # Flax DenseGeneral: projections per head, then the output sums over heads and head dims.
    assert torch.allclose(F.linear(x, w, b).reshape(n, heads, hd), torch.einsum("nd,dhk->nhk", x, qk) + qb)
    assert torch.allclose(F.linear(y.reshape(n, heads * hd), wo), torch.einsum("nhk,hkd->nd", y, out))


@given(kh=st.integers(1, 4), kw=st.integers(1, 4), cin=dims, cout=dims, seed=st.integers(0, 2**16))
def test_conv2d_kernel_matches_channels_last_conv(kh, kw, cin, cout, seed):
    import jax

    kernel, x = _randn(kh, kw, cin, cout, seed=seed), _randn(1, 5, 6, cin, seed=seed + 1)  # HWIO, NHWC
    weight = reshape.conv_kernel_channels_last_to_first(kernel)
    assert torch.equal(reshape.conv_kernel_channels_first_to_last(weight), kernel)
    with jax.enable_x64(True):  # compare in float64: layout errors, not rounding
        want = jax.lax.conv_general_dilated(x.numpy(), kernel.numpy(), (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = F.conv2d(x.permute(0, 3, 1, 2), weight).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-10, atol=1e-10)


@given(kt=st.integers(1, 3), kh=st.integers(1, 3), kw=st.integers(1, 3), cin=dims, cout=dims, seed=st.integers(0, 2**16))
def test_conv3d_kernel_matches_channels_last_conv(kt, kh, kw, cin, cout, seed):
    import jax

    kernel, x = _randn(kt, kh, kw, cin, cout, seed=seed), _randn(1, 3, 4, 5, cin, seed=seed + 1)  # THWIO, NTHWC
    weight = reshape.conv_kernel_channels_last_to_first(kernel)
    assert torch.equal(reshape.conv_kernel_channels_first_to_last(weight), kernel)
    with jax.enable_x64(True):  # compare in float64: layout errors, not rounding
        want = jax.lax.conv_general_dilated(x.numpy(), kernel.numpy(), (1, 1, 1), "VALID",
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    got = F.conv3d(x.permute(0, 4, 1, 2, 3), weight).permute(0, 2, 3, 4, 1)
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-10, atol=1e-10)
