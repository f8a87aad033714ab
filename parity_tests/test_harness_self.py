"""The harness can fail: a converter with one rule broken must turn parity red, and
the failure must say how much and where."""
from __future__ import annotations

import pytest
import torch

from converters import timesformer
from converters.rename import apply_renames, rules
from fixtures import harness


def _swap_targets(table, a: str, b: str):
    """The table with the targets of the rules whose source is `a` and `b` exchanged."""
    by_source = {r.source: r.target for r in table}
    return rules(*((r.source, by_source[b] if r.source == a else by_source[a] if r.source == b else r.target)
                   for r in table))


MUTATIONS = {
    "spatial<->temporal qkv": lambda sd: apply_renames(sd, _swap_targets(
        timesformer.RENAMES, "blocks.{i}.attn.qkv.{p}", "blocks.{i}.temporal_attn.qkv.{p}")),
    "norm1<->norm2": lambda sd: apply_renames(sd, _swap_targets(
        timesformer.RENAMES, "blocks.{i}.norm1.{p}", "blocks.{i}.norm2.{p}")),
    "temporal_fc transposed": lambda sd: {k: (v.T if k.endswith("temporal_dense.weight") else v)
                                          for k, v in timesformer.convert(sd).items()},
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_broken_conversion_fails_parity(mutation):
    c = harness.case("timesformer-base-finetuned-k400")
    original = {k.removeprefix("model."): v for k, v in torch.load(c.checkpoint)["model_state"].items()}
    model = type(c.hf_model())(c.hf_config()).eval()
    model.load_state_dict(MUTATIONS[mutation](original))
    diffs = harness.compare_outputs(c.reference, c.adapter.hf_outputs(model, c.inputs), **c.adapter.tolerance)
    with pytest.raises(AssertionError, match=r"logits: \d+/800 elements out of tolerance .*max abs diff .* at index \(\d+, \d+\), max rel diff"):
        harness.assert_parity(diffs, "mutated")


def test_compare_reports_place_and_size():
    d = harness.compare("x", torch.zeros(2, 3), torch.tensor([[0, 0, 0], [0, 0.5, 0]]), atol=1e-3, rtol=0)
    assert (d.max_abs, d.index, d.mismatched, d.total) == (0.5, (1, 1), 1, 6)


def test_select_published_expression():
    out = {"logits": torch.arange(12.0).reshape(2, 6)}
    assert harness.select(out, "logits[0, :3]").tolist() == [0, 1, 2]
    assert harness.select(out, "logits[1, 2:4]").tolist() == [8, 9]
