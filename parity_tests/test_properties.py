"""Property tests, generated from the families' rule tables: every table is total and
injective at any depth, undoes exactly, and every op a rule names round-trips with its
inverse and computes the original framework's map, for random sizes."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from converters import pipeline, reshape
from converters.registry import families, family, get_variant
from converters.rename import RenameError, Rule, invert_rules, rename_keys, rules
from fixtures import harness

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
    converted = pipeline.for_installed_transformers(variant, family(variant.family).convert(original, spec))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in hf.items()}


def test_rename_engine_refuses_gaps_and_collisions():
    table = rules(("a.{i}.w", "x.{i}.w"), ("b", "x.0.w"))
    with pytest.raises(RenameError, match="match no rename rule: \\['c'\\]"):
        rename_keys(["a.1.w", "c"], table)
    with pytest.raises(RenameError, match="not injective"):
        rename_keys(["a.0.w", "b"], table)
    with pytest.raises(RenameError, match="several rules"):
        rename_keys(["a.0.w"], rules(("a.{i}.w", "x"), ("a.0.{p}", "y")))
    split = rules(("qkv", ("q", "k", "v"), reshape.SPLIT_QKV), ("k", "k"))
    with pytest.raises(RenameError, match="'qkv' and 'k' both map to 'k'"):  # each of a split's targets counts
        rename_keys(["qkv", "k"], split)
    with pytest.raises(ValueError, match="2 target"):  # a split names as many targets as its op gives
        Rule("qkv", ("q", "k"), reshape.SPLIT_QKV)
    with pytest.raises(ValueError, match="drops its key"):
        Rule("w", None, reshape.MATMUL_KERNEL_TO_LINEAR)


@pytest.mark.filterwarnings("ignore:.*kept as inert data")  # the training config: tested on its own
def test_table_roundtrip_restores_the_original(variant):
    """The table's inverse (each rule's op undone by its inverse) gives back exactly the
    original state dict the loader read, bit for bit, but for the keys dropped on purpose;
    and every rule meets a key (a renamed module would leave its rule idle, its op unapplied)."""
    c = harness.case(variant.name)
    original = pipeline.load_original_state_dict(c.checkpoint, c.variant)
    table = family(variant.family).table(c.spec)
    assert [r.source for r in table if not any(r.apply(k)[0] for k in original)] == []
    restored = invert_rules(c.converted, table, original)
    dropped = {k for k, targets in rename_keys(original, table).items() if not targets}
    assert sorted(restored) == sorted(set(original) - dropped)
    wrong = [k for k in restored if restored[k].dtype != original[k].dtype or not torch.equal(restored[k], original[k])]
    assert wrong == [], f"not restored exactly: {wrong[:10]}"


# ---- the ops the tables name ---------------------------------------------------------------

def _rules_with_ops() -> dict[str, list[str]]:
    """Op name -> the rules (family: source) that name it, over every table of every family."""
    used: dict[str, list[str]] = {}
    for fam in families():
        for table in fam.tables.values():
            for rule in table:
                if rule.op is not None:
                    used.setdefault(rule.op.name, []).append(f"{fam.name}: {rule.source}")
    return used


USED = _rules_with_ops()
OPS = {op.name: op for op in vars(reshape).values() if isinstance(op, reshape.Op)}

dims = st.integers(min_value=1, max_value=6)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _split_qkv(data, seed):
    """A fused (3 D, D) in-projection: its output split in three is what the three layers compute."""
    width, n = data.draw(dims) * data.draw(dims), data.draw(dims)
    fused, bias, x = _randn(3 * width, width, seed=seed), _randn(3 * width, seed=seed + 1), _randn(n, width, seed=seed + 2)

    def same_map(parts):
        outputs = [F.linear(x, w, b) for w, b in zip(parts, reshape.SPLIT_QKV(bias))]
        return torch.allclose(torch.cat(outputs, -1), F.linear(x, fused, bias))
    return fused, same_map


def _matmul_kernel(data, seed):
    """Flax/Haiku dense and CLIP's projections compute x @ w."""
    kernel = _randn(data.draw(dims), data.draw(dims), seed=seed)
    x = _randn(data.draw(dims), kernel.shape[0], seed=seed + 1)
    return kernel, lambda weight: torch.allclose(F.linear(x, weight), x @ kernel)


def _heads_in_kernel(data, seed):
    """Flax DenseGeneral onto (heads, head_dim): one projection per head."""
    kernel = _randn(data.draw(dims), data.draw(dims), data.draw(dims), seed=seed)
    d, heads, hd = kernel.shape
    x = _randn(data.draw(dims), d, seed=seed + 1)
    return kernel, lambda weight: torch.allclose(F.linear(x, weight).reshape(len(x), heads, hd),
                                                 torch.einsum("nd,dhk->nhk", x, kernel))


def _heads_bias(data, seed):
    bias = _randn(data.draw(dims), data.draw(dims), seed=seed)
    y = _randn(data.draw(dims), *bias.shape, seed=seed + 1)
    return bias, lambda flat: torch.equal(y.flatten(1) + flat, (y + bias).flatten(1))


def _heads_out_kernel(data, seed):
    """Flax DenseGeneral out of (heads, head_dim): sums over heads and head dims."""
    kernel = _randn(data.draw(dims), data.draw(dims), data.draw(dims), seed=seed)
    y = _randn(data.draw(dims), *kernel.shape[:2], seed=seed + 1)
    return kernel, lambda weight: torch.allclose(F.linear(y.flatten(1), weight), torch.einsum("nhk,hkd->nd", y, kernel))


def _conv_kernel(data, seed):
    """HWIO or THWIO (Flax Conv, hk.Conv2D) against the channels-last convolution of jax."""
    import jax

    spatial = tuple(data.draw(st.integers(1, 3)) for _ in range(data.draw(st.sampled_from((2, 3)))))
    kernel = _randn(*spatial, data.draw(dims), data.draw(dims), seed=seed)
    x = _randn(1, *(k + 3 for k in spatial), kernel.shape[-2], seed=seed + 1)  # NHWC / NTHWC
    letters = "HW" if len(spatial) == 2 else "DHW"

    def same_map(weight):
        with jax.enable_x64(True):  # compare in float64: layout errors, not rounding
            want = jax.lax.conv_general_dilated(x.numpy(), kernel.numpy(), (1,) * len(spatial), "VALID",
                                                dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"))
        conv = F.conv2d if len(spatial) == 2 else F.conv3d
        got = conv(x.movedim(-1, 1), weight).movedim(1, -1)
        return np.allclose(got.numpy(), np.asarray(want), rtol=1e-10, atol=1e-10)
    return kernel, same_map


def _batch_norm_vector(data, seed):
    """hk.BatchNorm broadcasts (1, 1, 1, C) over NHWC; torch (C,) over NCHW channels."""
    channels = data.draw(dims)
    vector, x = _randn(1, 1, 1, channels, seed=seed), _randn(2, 3, 4, channels, seed=seed + 1)
    return vector, lambda flat: torch.equal((x * vector).permute(0, 3, 1, 2), x.permute(0, 3, 1, 2) * flat[:, None, None])


def _counter(data, seed):
    """hk.ExponentialMovingAverage's counter (int32) as num_batches_tracked (int64): the same count."""
    count = torch.tensor(data.draw(st.integers(0, 2**31 - 1)), dtype=torch.int32)
    return count, lambda wide: wide.dtype == torch.int64 and int(wide) == int(count)


# op name -> draw(data, seed) -> (an original tensor, does the converted tensor compute the original's map?)
PROPERTIES = {
    "split_qkv": _split_qkv,
    "matmul_kernel_to_linear": _matmul_kernel,
    "heads_in_kernel_to_linear": _heads_in_kernel,
    "heads_bias_to_linear": _heads_bias,
    "heads_out_kernel_to_linear": _heads_out_kernel,
    "conv_kernel_channels_last_to_first": _conv_kernel,
    "flatten": _batch_norm_vector,
    "to_int64": _counter,
}


def test_every_op_has_its_properties():
    """Each op a table names is property-tested below, and each op reshape defines is used."""
    assert sorted(USED) == sorted(PROPERTIES) == sorted(OPS)


@pytest.mark.parametrize("op_name", sorted(USED))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_op_roundtrip_and_linear_map(op_name, data, seed):
    """op then inverse is the identity (bit for bit, dtype too), and the torch layer computes
    with the converted tensor what the original framework's layer computes with the original."""
    op = OPS[op_name]
    original, same_map = PROPERTIES[op_name](data, seed)
    converted = op(original)
    back = op.inverse(converted, original)
    assert back.dtype == original.dtype and torch.equal(back, original), f"{op_name}, used by {USED[op_name][:3]}"
    assert same_map(converted), f"{op_name} does not compute the original's map; used by {USED[op_name][:3]}"
