"""converters/localise.py: where a converted model first departs from the original (#16).

On every family's tiny case (one variant per family, every Perceiver HF class): the correct
conversion has no diverging pair and every layer is compared, so the pairing through the
rename table is trustworthy; a planted mapping bug (two weights of the middle layer
exchanged, fixtures/planted.py) is localised to exactly that layer, at the first module
reading a swapped weight; the two known port divergences are localised to their part.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from converters import localise, pipeline
from converters.registry import get_variant
from parity_fixtures import harness, planted

ONE_PER_FAMILY = ("timesformer-base-finetuned-k400", "xclip-base-patch32", "vivit-b-16x2-kinetics400",
                  "vit-msn-small")
PERCEIVERS = ("language-perceiver", "vision-perceiver-learned", "vision-perceiver-fourier",
              "vision-perceiver-conv", "optical-flow-perceiver", "multimodal-perceiver")
# Where the original and the HF class compute differently on a correct conversion
# (converters.registry.known_divergence, and the MLM decoder's ignored query mask).
KNOWN_FIRST = {
    # the HF decoder hard-codes the query residual: the cross-attention's sum before its MLP differs
    "vision-perceiver-learned": ("classification_decoder/~/basic_decoder/cross_attention/layer_norm_2",
                                 "perceiver.decoder.decoder.decoding_cross_attention.layernorm"),
    # the HF stem pads the 7x7/2 conv symmetrically, the original TF-SAME: the first module differs
    "vision-perceiver-conv": ("image_preprocessor/~/conv2_d_downsample/~/conv", "perceiver.input_preprocessor.convnet.conv"),
}


# Each Perceiver class compiles its own captured forward (5-17 s on the tiny models): a plain run
# localises the fourier one, --run-slow (CI) every class.
QUICK = set(ONE_PER_FAMILY) | {"vision-perceiver-fourier"}


def variant_params(names):
    return [pytest.param(n, id=n, marks=[pytest.mark.xdist_group(n), *([] if n in QUICK else [pytest.mark.slow])])
            for n in names]


@functools.cache
def _original(name: str):
    c = harness.case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state_dict = pipeline.load_original_state_dict(c.checkpoint, c.variant)
    return c.original.load(c.spec, state_dict), tuple(state_dict)


def run(name: str, hf_model=None) -> localise.Localisation:
    c = harness.case(name)
    model, keys = _original(name)
    return localise.localise(c.variant, c.spec, c.original, model, hf_model or c.hf_model(), c.inputs,
                             c.original.tolerance["atol"], c.original.tolerance["rtol"], original_keys=keys)


def hf_model_carrying(c: harness.Case, converted: dict):
    model = pipeline.hf_model_class(c.variant)(c.hf_config()).eval()
    model.load_state_dict(pipeline.for_installed_transformers(c.variant, converted), strict=True)
    return model


def numbered_layers(c: harness.Case) -> set[str]:
    """Every numbered HF block of the converted model (installed names)."""
    names = localise.installed_names(c.variant, c.converted)
    return {localise.block_of(names[k].rpartition(".")[0]) for k in c.converted
            if any(p.isdigit() for p in names[k].split("."))}


# ---- layouts -------------------------------------------------------------------------------

def test_layouts_find_the_sequence_first_and_heads_layouts():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(3, 2, 4)  # (L, N, D), as X-CLIP's original
    (perm, laid_out), = localise.layouts(x, (2, 3, 4))
    assert perm == (1, 0, 2) and np.array_equal(laid_out, x.transpose(1, 0, 2))
    heads = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # flax (B, L, H, hd)
    found = dict(localise.layouts(heads, (2, 3, 20)))
    assert np.array_equal(found[(0, 1, 2, 3)], heads.reshape(2, 3, 20))
    assert set(found) == {(0, 1, 2, 3), (0, 1, 3, 2)}  # (B, L, hd, H) fits too: the smaller difference decides


def test_no_layout_fits_is_not_comparable_not_a_divergence():
    pair = localise.Pair("a", ("b",))
    result = localise.compare_pair(pair, 0, 0, np.zeros((2, 16, 8)), np.ones((2, 9, 8)), 1e-5, 1e-4)
    assert isinstance(result, localise.Skipped) and "fit no layout" in result.reason


def test_fused_qkv_pairs_with_the_three_projections_in_target_order():
    v = get_variant("vit-msn-small")
    c = harness.case(v.name)
    table = {p.original: p.hf for p in localise.pairs(v, c.spec, _original(v.name)[1])}
    assert [m.rsplit(".", 1)[1] for m in table["blocks.0.attn.qkv"]] in (
        ["query", "key", "value"], ["q_proj", "k_proj", "v_proj"])  # transformers 4.x / 5.x names


# ---- the correct conversion ----------------------------------------------------------------

@pytest.mark.parametrize("name", variant_params(ONE_PER_FAMILY + PERCEIVERS))
def test_correct_conversion_compares_every_layer_without_divergence(name):
    c = harness.case(name)
    loc = run(name)
    assert numbered_layers(c) <= loc.layers_compared(), loc.describe()
    observed = len(loc.compared) + len(loc.skipped)
    assert len(loc.compared) >= 0.9 * observed, [s.reason for s in loc.skipped]
    if name in KNOWN_FIRST:
        first = loc.first
        assert first is not None, loc.describe()
        assert (first.pair.original, first.pair.hf) == (KNOWN_FIRST[name][0], (KNOWN_FIRST[name][1],)), loc.describe()
    else:
        assert not loc.diverged, loc.describe()
        assert loc.describe().startswith("no divergence")


@pytest.mark.slow
def test_mlm_decoder_is_compared_on_the_attended_query_rows(monkeypatch):
    """The port ignores the decoder's query mask, so its padded query rows differ; the output
    check leaves them out, and so does localisation (Original.compared_rows). Without that
    selection a correct conversion would be reported diverging at the decoder, at a padded row."""
    c = harness.case("language-perceiver")
    assert not run("language-perceiver").diverged
    monkeypatch.setattr(c.original, "compared_rows", lambda spec, inputs: None)
    first = run("language-perceiver").first
    assert first is not None and first.pair.original.startswith("basic_decoder/")
    row, position = first.diff.index[:2]
    assert c.inputs["original"]["input_mask"][row, position] == 0


# ---- a planted mapping bug ------------------------------------------------------------------

@pytest.mark.parametrize("name", variant_params(n for n in ONE_PER_FAMILY + PERCEIVERS if n != "vision-perceiver-conv"))
def test_planted_swap_is_localised_to_its_layer_and_module(name):
    c = harness.case(name)
    layer = planted.middle_layer(c.variant, c.converted)
    assert 0 < layer  # a layer before it is compared within tolerance
    converted, swapped = planted.plant_swap(c.variant, c.converted, layer)
    loc = run(name, hf_model_carrying(c, converted))
    first = loc.first
    installed = localise.installed_names(c.variant, c.converted)
    broken = {installed[k].rpartition(".")[0] for k in swapped}
    assert first is not None and set(first.pair.hf) & broken, loc.describe()
    assert first.pair.layer == localise.block_of(next(iter(broken))), loc.describe()
    assert f"({first.pair.layer})" in loc.describe() and "max abs" in loc.describe()
    before = [cmp for cmp in loc.compared if cmp.order < first.order]
    assert before and all(cmp.ok for cmp in before)


@pytest.mark.slow
def test_conv_stem_divergence_comes_before_a_planted_encoder_bug():
    """The conv model's known stem difference is its first pair whatever follows: localisation
    names it, and says a divergence upstream hides later ones."""
    c = harness.case("vision-perceiver-conv")
    converted, _ = planted.plant_swap(c.variant, c.converted, planted.middle_layer(c.variant, c.converted))
    first = run("vision-perceiver-conv", hf_model_carrying(c, converted)).first
    assert first.pair.original == KNOWN_FIRST["vision-perceiver-conv"][0]
    assert first.order == 0


def test_planted_family_converts_with_the_swap():
    c = harness.case("vit-msn-small")
    _, keys = _original(c.variant.name)
    fam = planted.planted_family(c.variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state_dict = pipeline.load_original_state_dict(c.checkpoint, c.variant)
    converted = fam.convert(state_dict, c.spec)
    a, b = planted.swapped_keys(c.variant, c.converted, planted.middle_layer(c.variant, c.converted))
    assert converted[a].equal(c.converted[b]) and converted[b].equal(c.converted[a])
