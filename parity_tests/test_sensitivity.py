"""Parity on weights that make a wrong layer-norm eps visible (fixtures/sensitive.py).

One variant per family whose converter writes eps (the value is the family's, not the
variant's); Perceiver has none to write (its HF modules build nn.LayerNorm with the
default 1e-5, as the original's hk.LayerNorm).
"""
from __future__ import annotations

import pytest

from converters import pipeline
from converters.registry import all_variants
from fixtures import harness
from parity_harness.compare import assert_parity, compare_outputs

pytestmark = pytest.mark.parity

FIRST_OF_FAMILY = [next(v.name for v in all_variants() if v.family == f)
                   for f in ("timesformer", "xclip", "vivit", "vit_msn")]


@pytest.mark.parametrize("name", FIRST_OF_FAMILY)
def test_sensitive_parity(name, record_diffs):
    """The converted model matches the original on the rescaled weights too."""
    c = harness.case(name, weights="sensitive")
    diffs = compare_outputs(c.reference, c.hf_outputs(), **c.original.tolerance)
    record_diffs(diffs)
    assert_parity(diffs, f"{name} original vs HF, sensitive weights")


def _set(config, path: str, value):
    *parents, field = path.split(".")
    for p in parents:
        config = getattr(config, p)
    setattr(config, field, value)


# The eps mutants, each invisible on the random weights (measured 1.5e-5, 1.9e-5, 6e-6).
EPS_MUTANTS = {
    "xclip text eps 1e-5 -> 1e-6": ("xclip-base-patch32", "text_config.layer_norm_eps", 1e-6),
    "xclip vision eps 1e-5 -> 1e-6": ("xclip-base-patch32", "vision_config.layer_norm_eps", 1e-6),
    "msn eps 1e-6 -> 1e-12": ("vit-msn-small", "layer_norm_eps", 1e-12),
    "timesformer eps 1e-6 -> 1e-12": ("timesformer-base-finetuned-k400", "layer_norm_eps", 1e-12),
    "vivit eps 1e-6 -> 1e-12": ("vivit-b-16x2-kinetics400", "layer_norm_eps", 1e-12),
}


@pytest.mark.parametrize("mutant", EPS_MUTANTS)
def test_a_wrong_eps_fails_on_the_sensitive_weights(mutant):
    name, field, value = EPS_MUTANTS[mutant]
    c = harness.case(name, weights="sensitive")
    config = c.hf_config()
    _set(config, field, value)
    model = pipeline.hf_model_class(c.variant)(config).eval()
    model.load_state_dict(pipeline.for_installed_transformers(c.variant, c.converted), strict=True)
    diffs = compare_outputs(c.reference, c.original.hf_forward(model, c.inputs), **c.original.tolerance)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_parity(diffs, mutant)
