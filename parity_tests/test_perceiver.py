"""Perceiver IO beyond the matrix: the published hub config's GELU against the original,
the two port differences no config can remove (their causes pinned in the installed
transformers, their recorded sizes against the measurement), the Haiku containers
through the real loader, and the conversion's layout routing.

The matrix (test_matrix.py) compares the converted model (the faithful default config)
with the original as released; for the two KNOWN_DIVERGENCES it is a strict xfail, and
their weight mapping is checked against the original run with the port's structure.
"""
from __future__ import annotations

import functools
import os
import pickle

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from converters import errors, perceiver, pipeline
from converters.registry import get_variant, known_divergence
from converters.rename import apply_rules
from parity_fixtures import harness
from parity_harness.compare import assert_measured, assert_parity, compare, compare_outputs
from parity_fixtures import parity_perceiver as pp
from parity_fixtures import perceiver_original as orig
from parity_harness.tolerances import TOLERANCE

TOL = TOLERANCE["perceiver"]
DIVERGING = sorted(perceiver.KNOWN_DIVERGENCES)


def _group(name: str):
    return pytest.mark.xdist_group(name)  # the same worker as the variant's matrix case


@functools.cache
def _reference(name: str) -> dict:
    c = harness.case(name)
    return pp.ORIGINAL.build(c.spec, harness.SEED)


@functools.cache
def _original_outputs(name: str) -> dict:
    """The original's raw outputs (all of them, before Architecture.selected) on the matrix case."""
    return pp.run_reference(_reference(name), harness.case(name).inputs)


@functools.cache
def _hf_model(name: str, hidden_act: str):
    """The converted weights in the HF class, with another activation than the default one."""
    c = harness.case(name)
    model = pipeline.hf_model_class(c.variant)(perceiver.hf_config({**c.spec, "hidden_act": hidden_act})).eval()
    model.load_state_dict(c.converted, strict=True)
    return model


# ---- GELU: the original is tanh, the published hub configs exact ---------------------------

def test_faithful_gelu_is_the_closest_tanh_form():
    """The default hidden_act is the transformers activation closest to jax.nn.gelu's tanh
    default in float32: at most 2 ulp apart and on average no further than the other tanh
    forms (gelu_new, gelu_fast); exact 'gelu' (the hub's) is 4.7e-4 away."""
    from transformers.activations import ACT2FN

    x = np.linspace(-12, 12, 1_000_001, dtype=np.float32)
    want = np.asarray(jax.jit(lambda v: jax.nn.gelu(v, approximate=True))(x)).astype(np.float64)
    gap = {name: np.abs(ACT2FN[name](torch.from_numpy(x)).double().numpy() - want)
           for name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")}
    chosen = get_variant("language-perceiver").config["hidden_act"]
    assert chosen == "gelu_pytorch_tanh" and gap[chosen].max() < 1e-6, gap[chosen].max()
    assert all(gap[chosen].mean() <= gap[other].mean() for other in ("gelu_new", "gelu_fast")), {
        k: v.mean() for k, v in gap.items()}
    assert gap["gelu"].max() > 4e-4


# Measured on the tiny models against the original (learned and conv against the original
# run with the HF class's structure): max abs difference with the hub config's exact GELU.
HUB_GELU_MAX_ABS = {"language-perceiver": "5.4e-3", "vision-perceiver-learned": "6.0e-4",
                    "vision-perceiver-fourier": "5.4e-4", "vision-perceiver-conv": "6.7e-4",
                    "optical-flow-perceiver": "4.3e-4", "multimodal-perceiver": "6.4e-4"}


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "HF hub config differs from the original: the published configs keep hidden_act='gelu' (exact erf, what "
    "`convert --hub-config` writes) while every original uses jax.nn.gelu (tanh approximation). Measured on "
    "the tiny models against the original, all else equal (learned and conv against the original run with the "
    "HF class's structure), max abs diff: " + ", ".join(f"{k} {v}" for k, v in HUB_GELU_MAX_ABS.items())
    + ". The default conversion writes hidden_act='gelu_pytorch_tanh' and passes (test_matrix.py "
    "test_logits_parity)."))
def test_port_difference_hub_config_gelu(perceiver_variant):
    name = perceiver_variant.name
    c = harness.case(name)
    diffs = compare_outputs(harness.weights_reference(c), pp.ORIGINAL.hf_forward(_hf_model(name, "gelu"), c.inputs), **TOL)
    assert_measured(f"{name}, exact GELU", max(d.max_abs for d in diffs), HUB_GELU_MAX_ABS[name])
    assert_parity(diffs, f"{name}: the hub config's exact GELU vs the original's tanh GELU")


# The original loaded from the tiny checkpoint through the project's loader, run with the port's
# structure (port_forward): tanh GELU (the original's) vs the hub config's exact GELU, max abs over
# the compared outputs. Measured on the tiny models (seed 0, harness.case inputs) by this test;
# within 4% of HUB_GELU_MAX_ABS above (that one includes the HF side's rounding).
ORIGINAL_TANH_VS_EXACT_MAX_ABS = {"language-perceiver": "5.4e-3", "vision-perceiver-learned": "6.0e-4",
                                  "vision-perceiver-fourier": "5.6e-4", "vision-perceiver-conv": "6.7e-4",
                                  "optical-flow-perceiver": "4.3e-4", "multimodal-perceiver": "6.4e-4"}


def test_port_forward_with_hub_config_is_the_hub_config_conversion(perceiver_variant):
    """`port_forward(loaded, inputs, hub_config)`, the original on the weights as the loader
    reads them from the file, with the port's structure and the hub config's numerics, is what
    the HF model with the --hub-config values computes (within the family tolerance), and not
    what the original's tanh GELU computes (outside it, by the measured amount)."""
    from converters.registry import hub_config_values

    variant = perceiver_variant
    c = harness.case(variant.name)
    hub = hub_config_values(variant)
    assert hub == {"hidden_act": "gelu"}
    loaded = pp.ORIGINAL.load(c.spec, pipeline.load_original_state_dict(c.checkpoint, variant))
    model = pipeline.hf_model_class(variant)(perceiver.hf_config({**c.spec, **hub})).eval()
    model.load_state_dict(pipeline.for_installed_transformers(variant, c.converted), strict=True)
    exact = pp.ORIGINAL.port_forward(loaded, c.inputs, hub)
    assert_parity(compare_outputs(exact, pp.ORIGINAL.hf_forward(model, c.inputs), **TOL),
                  f"{variant.name}: the original with the hub config's numerics vs the --hub-config conversion")
    tanh = compare_outputs(pp.ORIGINAL.port_forward(loaded, c.inputs), exact, **TOL)
    assert not all(d.ok for d in tanh), "the hub config's GELU made no difference beyond the tolerance"
    assert_measured(f"{variant.name}, original tanh vs exact GELU", max(d.max_abs for d in tanh),
                    ORIGINAL_TANH_VS_EXACT_MAX_ABS[variant.name])


def test_port_forward_refuses_hub_values_it_cannot_follow():
    model = pp.ORIGINAL.build(harness.case("vision-perceiver-fourier").spec, harness.SEED)
    inputs = harness.case("vision-perceiver-fourier").inputs
    for hub in ({"hidden_act": "relu"}, {"layer_norm_eps": 1e-12}):
        with pytest.raises(ValueError, match="cannot run with the hub config"):
            pp.ORIGINAL.port_forward(model, inputs, hub)


# ---- the two port differences no config removes (KNOWN_DIVERGENCES) ----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", DIVERGING)
def test_known_divergence_is_the_measured_one(name):
    """The recorded tiny size is what the matrix measures now (converted vs original, within
    5%), and removing the port's structure from the original removes the difference."""
    c = harness.case(name)
    diffs = compare_outputs(c.reference, c.hf_outputs(), **TOL)
    measured = max(d.max_abs for d in diffs)
    recorded = known_divergence(c.variant)
    assert abs(measured - recorded.tiny_max_abs) <= 0.05 * recorded.tiny_max_abs, (measured, recorded)
    assert_parity(compare_outputs(harness.weights_reference(c), c.hf_outputs(), **TOL),
                          f"{name}: the original with the port's structure")


@_group("vision-perceiver-learned")
def test_learned_cause_is_in_the_installed_transformers():
    """PerceiverForImageClassificationLearned builds its decoder with use_query_residual=True
    (modeling_perceiver.py, transformers 5.23 line 1086), whatever the config; the
    original learned config has none (its colab's decoder use_query_residual=False)."""
    attention = harness.case("vision-perceiver-learned").hf_model().perceiver.decoder.decoder \
        .decoding_cross_attention.attention
    assert attention.use_query_residual is True
    assert pp.ARCHS["PerceiverForImageClassificationLearned"].port_structure == dict(decoder_query_residual=True)
    assert orig.full_size_hparams("image_learned")["decoder_query_residual"] is False


@_group("vision-perceiver-conv")
def test_conv_cause_is_in_the_installed_transformers():
    """The HF conv stem (Conv2dSamePadding, Conv2DDownsample) zero-pads the 7x7/2 conv (3, 3) on
    every side and max-pools 3x3/2 with no padding, whatever the config; the original pads
    both TF SAME (io_processors.py Conv2DDownsample)."""
    stem = harness.case("vision-perceiver-conv").hf_model().perceiver.input_preprocessor.convnet
    assert stem.conv.zero_pad_2d.padding == (3, 3, 3, 3)
    assert (stem.max_pool.kernel_size, stem.max_pool.stride, stem.max_pool.padding) == (3, 2, 0)
    assert pp.ARCHS["PerceiverForImageClassificationConvProcessing"].port_structure == dict(
        conv_padding=((3, 3), (3, 3)), pool_padding="VALID")


def _tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _original_stem_size(size: int) -> tuple[int, int]:
    import haiku as hk
    import jax.numpy as jnp

    stem = hk.transform_with_state(lambda x: orig.Conv2DDownsample(64)(x, True))
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    params, state = jax.eval_shape(stem.init, jax.random.PRNGKey(0), image)
    return tuple(jax.eval_shape(lambda p, s, x: stem.apply(p, s, None, x)[0], params, state, image).shape[1:3])


STEM_CONV_MAX_ABS = "4.0"  # the converted tiny kernel on a 224 px image, HF's padding vs the original's


@_group("vision-perceiver-conv")
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "HF port differs: at 224 px the HF stem's feature map is 55x55, the original's 56x56 (max-pool without "
    "padding); before the pool both are 112x112, but the (3, 3) padding samples the image one pixel off the "
    f"original's (2, 3): with the converted tiny kernel on a 224 px image the convolutions differ by up to "
    f"{STEM_CONV_MAX_ABS}."))
def test_port_difference_conv_stem_size():
    c = harness.case("vision-perceiver-conv")
    stem = pipeline.hf_model_class(c.variant)(perceiver.hf_config(c.spec)).perceiver.input_preprocessor.convnet
    weight = c.converted["perceiver.input_preprocessor.convnet.conv.weight"]
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32))
    lo, hi = _tf_same(224, 7, 2)
    with torch.no_grad():
        same = F.conv2d(F.pad(x, (lo, hi, lo, hi)), weight, stride=2)
        hf = F.conv2d(stem.conv.zero_pad_2d(x), weight, stride=2)
        size = tuple(stem(x).shape[-2:])
    conv = compare("stem convolution", same, hf, **TOL)
    assert_measured("stem feature maps (HF, original) at 224 px", (size, _original_stem_size(224)), ((55, 55), (56, 56)))
    assert_measured("stem convolution", conv.max_abs, STEM_CONV_MAX_ABS)
    assert size == _original_stem_size(224) and conv.ok, (
        f"HF stem output {size}, original {_original_stem_size(224)}; {conv.describe()}")


# ---- MLM ------------------------------------------------------------------------------------

MLM_MAX_ABS = {"attended": "1.3e-5", "padded": "21.9"}  # tiny model logits, HF vs the original


@_group("language-perceiver")
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "HF port differs: PerceiverForMaskedLM passes the attention mask to its decoder as query_mask, but the "
    "decoder's cross-attention replaces it with inputs_mask=None, so padded query positions attend normally; "
    f"the original zeroes the attention output of fully masked query rows. Attended positions agree "
    f"({MLM_MAX_ABS['attended']}); measured on the tiny model at padded positions, max abs diff "
    f"{MLM_MAX_ABS['padded']} in the logits (padding only: the published values and masked predictions are at "
    "attended positions)."))
def test_port_difference_mlm_padded_query_positions():
    name = "language-perceiver"
    c = harness.case(name)
    mask = torch.from_numpy(c.inputs["original"]["input_mask"]).bool()
    assert not mask.all(), "the tiny input must contain padding"
    expected = _original_outputs(name)["logits"]
    with torch.no_grad():
        actual = pp.hf_raw_outputs(c.hf_model(), c.inputs)["logits"]
    attended, padded = (compare(f"{k}_logits", expected[m], actual[m], **TOL) for k, m in (("attended", mask),
                                                                                       ("padded", ~mask)))
    assert_measured("attended positions", attended.max_abs, MLM_MAX_ABS["attended"])
    assert_measured("padded positions", padded.max_abs, MLM_MAX_ABS["padded"])
    assert_parity([padded], "padded positions")


@_group("language-perceiver")
def test_mlm_masked_argmax():
    """The masked positions are where the mask token was placed (the script's 51:60 on
    the sentence without special tokens; the last 9 bytes of the [CLS] row), and the
    converted model predicts exactly the original's tokens there."""
    from transformers import PerceiverTokenizer

    c = harness.case("language-perceiver")
    ids = c.inputs["original"]["inputs"]
    rows, cols = c.inputs["masked"]
    assert cols[0].tolist() == list(range(51, 60))
    assert (ids[rows, cols] == PerceiverTokenizer().mask_token_id).all()
    assert (ids == PerceiverTokenizer().mask_token_id).sum() == rows.size
    got, want = c.hf_outputs()["masked_argmax"], c.reference["masked_argmax"]
    assert torch.equal(got, want), f"HF {got.tolist()} != original {want.tolist()}"
    assert len(set(want.flatten().tolist())) > 1  # not a constant prediction


# ---- optical flow: the colab's x20 ------------------------------------------------------------

@_group("optical-flow-perceiver")
def test_flow_output_is_the_models_not_the_colabs():
    """HF's logits are the original model's output (decoder / 100); the colab's flow in
    pixels is 20x that (FLOW_SCALE_FACTOR), applied outside the model. Measured on the tiny
    model: HF vs the model output 1.9e-8, HF vs the colab's flow 0.47 (|logits| <= 0.025)."""
    name = "optical-flow-perceiver"
    c = harness.case(name)
    original = _original_outputs(name)
    with torch.no_grad():
        hf = pp.hf_raw_outputs(c.hf_model(), c.inputs)["logits"]
    assert_parity([compare("logits", original["logits"], hf, **TOL)], "flow model output")
    torch.testing.assert_close(original["flow"], 20 * original["logits"])
    assert (original["flow"] - hf).abs().max() > 10 * hf.abs().max(), "HF would include the colab's x20"


# ---- configs -------------------------------------------------------------------------------

PUBLISHED_CONFIG = {  # config.json fields of the hub models that the converter derives or fixes
    "language-perceiver": dict(hidden_act="gelu", qk_channels=256, v_channels=1280, d_model=768, image_size=56),
    "vision-perceiver-learned": dict(hidden_act="gelu", image_size=224, d_model=512),
    "vision-perceiver-fourier": dict(hidden_act="gelu", image_size=56, d_model=261),
    "vision-perceiver-conv": dict(hidden_act="gelu", image_size=56, d_model=322),
    "optical-flow-perceiver": dict(hidden_act="gelu", train_size=[368, 496], d_model=322),
    "multimodal-perceiver": dict(hidden_act="gelu", image_size=56, output_shape=[1, 16, 224, 224],
                                 num_frames=16, d_model=704),
}


@pytest.mark.parametrize("name", PUBLISHED_CONFIG)
def test_full_size_config_is_the_published_one(name):
    """With the hub config's values (convert --hub-config), hf_config on the registry writes
    the published values, including those it derives (train_size, output_shape) and the
    class-ignored image_size the hub keeps at 56; the default differs in hidden_act only,
    the original's tanh GELU."""
    variant = get_variant(name)
    spec = pipeline.spec_of(variant)
    hub = perceiver.hf_config({**spec, **perceiver.HUB_CONFIG}).to_dict()
    assert {k: hub[k] for k in PUBLISHED_CONFIG[name]} == PUBLISHED_CONFIG[name]
    default = perceiver.hf_config(spec).to_dict()
    assert {k for k in hub if hub[k] != default[k]} == {"hidden_act"}
    assert default["hidden_act"] == "gelu_pytorch_tanh"


# ---- Haiku pickles through the real loader path ---------------------------------------------

def _save(name: str, path, **kwargs):
    reference = _reference(name)
    orig.save_checkpoint(reference["arch"].original, reference["params"], reference["state"], path, **kwargs)
    return path


def _loads_like_the_matrix(name: str, path) -> None:
    c = harness.case(name)
    converted = perceiver.FAMILY.convert(pipeline.load_original_state_dict(path, c.variant), c.spec)
    assert converted.keys() == c.converted.keys()
    assert all(torch.equal(converted[k], c.converted[k]) for k in converted)


# The released files were written by Haiku between 2020-08 and 2021-12: params are
# FlatMapping objects pickled by reference to haiku._src.data_structures.FlatMapping.
def test_released_flatmapping_container_loads(perceiver_variant, tmp_path):
    name = perceiver_variant.name
    _loads_like_the_matrix(name, _save(name, tmp_path / "ckpt", container="flatmapping"))


# numpy pickles arrays through numpy._core.numeric._frombuffer at protocol 5.
def test_protocol_5_pickle_loads(perceiver_variant, tmp_path):
    name = perceiver_variant.name
    _loads_like_the_matrix(name, _save(name, tmp_path / "ckpt", protocol=5))


class _Payload:
    """Pickles as a call to os.system: what a hostile checkpoint would carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _hostile(path, payload_at):
    """A Haiku-shaped params tree with the payload at `payload_at` ("leaf" or "root")."""
    marker = path.with_suffix(".pwned")
    payload = _Payload(f"touch {marker}")
    tree = payload if payload_at == "root" else {"embed": {"embeddings": np.zeros((2, 2), np.float32)},
                                                  "embedding_decoder": {"bias": payload}}
    path.write_bytes(pickle.dumps(tree, protocol=4))
    return marker


@pytest.mark.parametrize("payload_at", ["leaf", "root"])
def test_hostile_haiku_pickle_is_refused_by_name(payload_at, tmp_path):
    variant = get_variant("language-perceiver")
    path = tmp_path / variant.source.filename
    marker = _hostile(path, payload_at)
    with pytest.raises(errors.CheckpointError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        pipeline.load_original_state_dict(path, variant)
    assert not marker.exists(), "the payload ran"


def test_non_container_haiku_global_is_refused(tmp_path):
    """Allowing Haiku's containers must not open Haiku: a pickle that calls another Haiku
    function is refused by name."""
    from haiku._src import data_structures

    path = tmp_path / "params.pickle"
    evil = type("Evil", (), {"__reduce__": lambda self: (data_structures.to_haiku_dict, ({},))})
    path.write_bytes(pickle.dumps({"embed": {"embeddings": evil()}}, protocol=4))
    with pytest.raises(errors.CheckpointError, match="haiku._src.data_structures.to_haiku_dict"):
        pipeline.load_original_state_dict(path, get_variant("language-perceiver"))


# ---- layout routing on the real key names -----------------------------------------------------

small = st.integers(min_value=1, max_value=5)


def _relayout(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as its rule converts it, in the table of a class whose checkpoint holds `key`."""
    table = next(t for t in perceiver.FAMILY.tables.values() if any(r.apply(key)[0] for r in t))
    (converted,) = apply_rules({key: tensor}, table).values()
    return converted


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@given(kh=st.integers(1, 7), kw=st.integers(1, 7), cin=small, cout=small, seed=st.integers(0, 2**16))
def test_conv_kernels_keep_their_spatial_axes(kh, kw, cin, cout, seed):
    """Both Haiku conv keys route to HWIO -> OIHW (a plain .T on a 4-D kernel, the upstream
    script's transpose, would also swap H and W); the torch conv then computes Haiku's."""
    kernel, x = _rand(kh, kw, cin, cout, seed=seed), _rand(1, 9, 8, cin, seed=seed + 1)
    want = np.asarray(jax.lax.conv_general_dilated(x.numpy(), kernel.numpy(), (2, 2), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                   precision=jax.lax.Precision.HIGHEST))
    for key in ("image_preprocessor/~/conv2_d_downsample/~/conv/w", "image_preprocessor/~/conv2_d/w"):
        weight = _relayout(key, kernel)
        (top, bottom), (left, right) = _tf_same(9, kh, 2), _tf_same(8, kw, 2)
        got = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (left, right, top, bottom)), weight, stride=2)
        np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, rtol=1e-4, atol=1e-4)


@given(i=small, o=small, c=small, seed=st.integers(0, 2**16))
def test_linear_and_batchnorm_layouts(i, o, c, seed):
    """hk.Linear keys transpose (x @ w == F.linear), batch-norm (1, 1, 1, C) tensors keep
    their channel order, the EMA counter becomes torch's int64 count."""
    w, x = _rand(i, o, seed=seed), _rand(3, i, seed=seed + 1)
    for key in ("perceiver_encoder/~/self_attention_3/attention/linear_2/w", "image_preprocessor/patches_linear/w",
                "classification_decoder/~/basic_decoder/output/w"):
        torch.testing.assert_close(F.linear(x, _relayout(key, w)), x @ w)
    stat = _rand(1, 1, 1, c, seed=seed + 2)
    bn = "image_preprocessor/~/conv2_d_downsample/~/batchnorm"
    for key in (f"{bn}/scale", f"{bn}/offset", f"state/{bn}/~/mean_ema/average", f"state/{bn}/~/var_ema/average"):
        assert torch.equal(_relayout(key, stat), stat[0, 0, 0])
    count = _relayout(f"state/{bn}/~/mean_ema/counter", torch.tensor(7, dtype=torch.int32))
    assert count.dtype == torch.int64 and int(count) == 7
    pos = _rand(c, o, seed=seed + 3)  # position encodings and embeddings are used as stored
    assert torch.equal(_relayout("embed/embeddings", pos), pos)
