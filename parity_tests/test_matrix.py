"""The parity matrix: every check, for every variant that has a converter.

Each test id carries the variant name (`test_logits_parity[timesformer-hr-finetuned-k600]`).
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from converters import output_dir, pipeline
from converters.registry import all_variants, family, known_divergence
from parity_fixtures import harness
from parity_harness import expected_keys
from parity_harness.compare import assert_measured, assert_parity, compare, compare_outputs

pytestmark = pytest.mark.parity

EXPECTED_KEYS_DIR = Path(harness.__file__).parent / "expected_keys"
TRANSFORMERS_LINE = ".".join(transformers.__version__.split(".")[:2])


def test_logits_parity(variant, record_diffs, request):
    """The converted HF model computes what the original computes, on the same input. Where
    the HF class hard-codes another computation (registry.known_divergence), a strict xfail
    with the cause and size; its weights are checked by test_weight_mapping_parity."""
    if known := known_divergence(variant):
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"HF port differs: {known.describe()}"))
    c = harness.case(variant.name)
    diffs = compare_outputs(c.reference, c.hf_outputs(), **c.original.tolerance)
    record_diffs(diffs)
    assert_parity(diffs, f"{variant.name} original vs HF")


@pytest.mark.parametrize("diverging", [
    pytest.param(v, id=v.name, marks=pytest.mark.xdist_group(v.name)) for v in all_variants()
    if known_divergence(v)])
def test_weight_mapping_parity(diverging, record_diffs):
    """For a variant whose port is known to diverge, the weight mapping on its own: the HF
    model against the original's weights run with the HF class's structure."""
    c = harness.case(diverging.name)
    diffs = compare_outputs(harness.weights_reference(c), c.hf_outputs(), **c.original.tolerance)
    record_diffs(diffs)
    assert_parity(diffs, f"{diverging.name} original with the port's structure vs HF")


def test_output_shape(variant):
    c = harness.case(variant.name)
    outputs = c.hf_outputs()
    for key, shape in c.original.output_shapes(c.spec, c.inputs).items():
        assert tuple(outputs[key].shape) == tuple(shape), f"{key}: {tuple(outputs[key].shape)} != {shape}"


def _converted_dir(c: harness.Case) -> Path:
    """The product's output: the converted state dict written as from_pretrained reads it."""
    out = c.workdir / "converted"
    if not out.exists():
        processor = family(c.variant.family).hf_processor(c.spec)
        output_dir.save_converted(c.converted, c.hf_config(), out, processor=processor)
    return out


@functools.cache
def _loaded(variant_name: str):
    """from_pretrained on the converted output, with its loading info; shared by the two
    checks that need it (the variant's xdist group keeps them on one worker)."""
    c = harness.case(variant_name)
    model, info = pipeline.hf_model_class(c.variant).from_pretrained(_converted_dir(c), output_loading_info=True)
    return model.eval(), info


def test_loading_keys(variant, record_keys):
    """from_pretrained on the converted output reports exactly the recorded missing and
    unexpected keys (and no shape mismatches). A transformers line with no record of its
    own is compared with the nearest recorded line, and a warning says which."""
    recorded = json.loads((EXPECTED_KEYS_DIR / f"{variant.family}.json").read_text())
    line = expected_keys.nearest_line(recorded, TRANSFORMERS_LINE)
    assert line is not None, f"no expected key lists recorded for {variant.family}"
    expected = recorded[line]
    _, info = _loaded(variant.name)
    record_keys(info, line)
    against = f"transformers {line}" + (f" (nearest recorded line to {TRANSFORMERS_LINE})"
                                        if line != TRANSFORMERS_LINE else "")
    if line != TRANSFORMERS_LINE:
        warnings.warn(expected_keys.NearestKeyLine(
            f"{variant.name}: no key lists recorded for transformers {TRANSFORMERS_LINE}; compared with {against}"))
    assert sorted(info["missing_keys"]) == sorted(expected["missing"]), f"missing keys changed from {against}"
    assert sorted(info["unexpected_keys"]) == sorted(expected["unexpected"]), f"unexpected keys changed from {against}"
    assert not info.get("mismatched_keys"), f"shape mismatches: {info['mismatched_keys']}"


def test_round_trip(variant, tmp_path):
    """Converted output -> from_pretrained -> save_pretrained -> from_pretrained:
    bit-identical outputs and an equal config at every step."""
    c = harness.case(variant.name)
    loaded, _ = _loaded(variant.name)
    loaded.save_pretrained(tmp_path)
    reloaded = pipeline.hf_model_class(variant).from_pretrained(tmp_path).eval()
    in_memory = c.hf_outputs()
    for model in (loaded, reloaded):
        for key, value in c.hf_outputs(model).items():
            assert torch.equal(value, in_memory[key]), compare(key, in_memory[key], value, 0, 0).describe()
    assert _architecture(reloaded.config) == _architecture(loaded.config) == _architecture(c.hf_config())


SAVE_METADATA = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"}


def _architecture(config) -> dict:
    """The config without what saving adds (model class name, dtype, version), also
    inside sub-configs."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in SAVE_METADATA}
    return strip(config.to_dict())


def test_full_size_structure(variant):
    """The full-size original, built on the meta device, converts to exactly the
    full-size HF model's keys and shapes: nothing left over, nothing missing."""
    spec = pipeline.spec_of(variant)
    original = harness.original(variant.family).on_meta(spec)
    converted = pipeline.for_installed_transformers(variant, family(variant.family).convert(original, spec))
    want = {k: tuple(v.shape) for k, v in harness.hf_state_on_meta(variant, spec).items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(want) - set(got)) == [], "HF keys the conversion does not produce"
    assert sorted(set(got) - set(want)) == [], "converted keys the HF model does not have"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}, f"shape (converted, HF) mismatches: {wrong}"


def test_golden(variant, golden):
    """The tiny converted model's outputs against its golden file, made from the same tiny
    spec and seed (parity_harness.golden.Golden)."""
    c = harness.case(variant.name)
    golden.check(variant.name, {k: v.numpy() for k, v in c.hf_outputs().items()}, spec=c.spec, seed=harness.SEED,
                 tolerance=c.original.tolerance)


def test_original_containers(variant_container):
    """Every further container layout the original is seen in loads to the same weights."""
    variant, container = variant_container
    c, first = harness.case(variant.name, container), harness.case(variant.name)
    assert c.converted.keys() == first.converted.keys()
    assert all(torch.equal(c.converted[k], first.converted[k]) for k in c.converted)


# Measured on the tiny models with half the configured frames: max abs logit difference.
HALF_FRAMES_MAX_ABS = {
    "timesformer-base-finetuned-k400": "0.896", "timesformer-base-finetuned-k600": "0.896",
    "timesformer-base-finetuned-ssv2": "0.896", "timesformer-hr-finetuned-k400": "0.575",
    "timesformer-hr-finetuned-k600": "0.575", "timesformer-hr-finetuned-ssv2": "0.575",
    "timesformer-large-finetuned-k400": "0.263", "timesformer-large-finetuned-k600": "0.263",
    "timesformer-large-finetuned-ssv2": "0.400",
}


def test_port_difference_other_frame_count(timesformer_variant, record_diffs, request):
    """A strict xfail whose quoted size is measured: another size fails the test."""
    variant = timesformer_variant
    c = harness.case(variant.name)
    frames = c.spec["num_frames"]
    request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "HF port differs: TimesformerLayer reshapes tokens with config.num_frames, while the original takes T "
        "from the input and nearest-resizes time_embed. A video with half the configured frames gives silently "
        f"wrong logits; measured on the tiny model ({frames // 2} of {frames} frames): max abs diff "
        f"{HALF_FRAMES_MAX_ABS[variant.name]}")))
    video = c.inputs[:, :, : frames // 2]  # (B, C, T, H, W): half the frames
    reference = c.original.forward(harness.original(variant.family).build(c.spec, harness.SEED), video)
    diffs = compare_outputs(reference, c.original.hf_forward(c.hf_model(), video), **c.original.tolerance)
    record_diffs(diffs)
    assert_measured(f"{variant.name}, half the frames", max(d.max_abs for d in diffs), HALF_FRAMES_MAX_ABS[variant.name])
    assert_parity(diffs, f"{variant.name}, half the frames")
