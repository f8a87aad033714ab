"""The family references through their one interface (`parity_fixtures.harness.Original`), as
`convert --verify` (#16) will drive them: the original at a spec, loaded from a state dict
named as the project's safe loader returns it, run on the seeded input of its shape."""
from __future__ import annotations

import warnings

import pytest
import torch

from converters import pipeline
from converters.registry import FAMILY_NAMES, all_variants, get_variant
from parity_fixtures import harness

# One variant per family: the cheapest of each (the full-size check builds nothing real).
ONE_PER_FAMILY = {
    "timesformer": "timesformer-base-finetuned-k400",
    "xclip": "xclip-base-patch32",
    "vivit": "vivit-b-16x2-kinetics400",
    "vit_msn": "vit-msn-small",
    "perceiver": "vision-perceiver-fourier",
}


def test_one_variant_per_family():
    assert sorted(ONE_PER_FAMILY) == sorted(FAMILY_NAMES)
    assert all(get_variant(name).family == family for family, name in ONE_PER_FAMILY.items())


def _on_meta(inputs):
    """The input with its torch tensors on the meta device (numpy arrays stay: the Haiku
    reference takes their shapes)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to("meta")
    if isinstance(inputs, dict):
        return {k: _on_meta(v) for k, v in inputs.items()}
    return inputs


@pytest.mark.parametrize("name", ONE_PER_FAMILY.values())
def test_loaded_original_reproduces_the_reference(name):
    """The tiny checkpoint read back through the project's loader and loaded into the original
    gives the very outputs the reference that wrote it gave: the loader's names are the
    original's, with nothing left over or missing (the torch loads are strict)."""
    c = harness.case(name)
    original = harness.original(c.variant.family)
    with warnings.catch_warnings():  # X-CLIP's inert training-config warning is tested on its own
        warnings.simplefilter("ignore")
        state_dict = pipeline.load_original_state_dict(c.checkpoint, c.variant)
    loaded = original.load(c.spec, state_dict)
    outputs = original.forward(loaded, c.inputs)
    assert outputs.keys() == c.reference.keys()
    unequal = [k for k in outputs if not torch.equal(outputs[k], c.reference[k])]
    assert unequal == [], f"outputs the loaded original changes: {unequal}"


@pytest.mark.parametrize("name", ONE_PER_FAMILY.values())
def test_full_size_original_runs_on_meta(name):
    """At full size, on the meta device (shapes only, nothing allocated): the original loads
    its own on-meta weights, takes the seeded input of its spec and gives outputs of the
    shapes the comparison expects."""
    variant = get_variant(name)
    original, spec = harness.original(variant.family), pipeline.spec_of(variant)
    model = original.load(spec, original.on_meta(spec))
    inputs = original.inputs(spec, harness.SEED)
    outputs = original.forward(model, _on_meta(inputs))
    want = original.output_shapes(spec, inputs)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {k: tuple(s) for k, s in want.items()}
    assert all(v.is_meta for v in outputs.values())


def _leaves(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, dict):
        return [leaf for v in inputs.values() for leaf in _leaves(v)]
    if isinstance(inputs, (tuple, list)):
        return [leaf for v in inputs for leaf in _leaves(v)]
    return [torch.as_tensor(inputs)]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


@pytest.mark.parametrize("name", ONE_PER_FAMILY.values())
def test_inputs_are_seeded(name):
    """The same seed gives the same input, another seed another: the seed --verify prints replays it."""
    variant = get_variant(name)
    original, spec = harness.original(variant.family), pipeline.spec_of(variant)
    first = original.inputs(spec, 5)
    assert _same(first, original.inputs(spec, 5))
    assert not _same(first, original.inputs(spec, 6))


@pytest.mark.parametrize("v", [pytest.param(v, id=v.name) for v in all_variants()])
def test_input_description_says_whether_the_seed_enters(v):
    """What --verify records as its input: a reference that says its input is seeded gives
    another input for another seed, and one that says it is fixed gives the same."""
    original = harness.original(v.family)
    spec = original.tiny_spec(v)
    _, seeded = original.input_description(spec, 5)
    assert _same(original.inputs(spec, 5), original.inputs(spec, 6)) is not seeded
