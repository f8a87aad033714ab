"""The mutation tool's own checks (parity_tools/mutation.py): the mutants it plants are the
kinds the issue planted, each one edit of valid Python; running them is the tool's job,
not the suite's (minutes per mutant)."""
from __future__ import annotations

import ast

import pytest

from parity_tools import mutation


@pytest.mark.slow
@pytest.mark.parametrize("module", mutation.MODULES)
def test_every_mutant_is_one_valid_edit(module):
    source = (mutation.ROOT / "converters" / f"{module}.py").read_text()
    mutants = mutation.mutants_of(module)
    assert mutants, f"no mutants in {module}"
    for m in mutants:
        mutated = mutation.apply(source, m)
        assert mutated != source, m.id
        ast.parse(mutated)  # still Python
    assert len({m.id for m in mutants}) == len(mutants)


def _descriptions(module):
    return {m.description for m in mutation.mutants_of(module)}


def test_the_issues_kinds_of_mutant_are_planted():
    """Numbers in the variant data (MSN small heads, X-CLIP eps), processor constants, swapped
    rename targets, activations, flipped comparisons; published values are left alone."""
    assert "6 -> 7" in _descriptions("vit_msn")
    assert "1e-5 -> 1e-06" in _descriptions("xclip")
    assert "0.45 -> 0.405" in _descriptions("timesformer")  # image_mean
    assert '"layernorm_before.{p}" <-> "attention.attention.qkv.{p}"'.join(("targets ", "")) in _descriptions("timesformer")
    assert "'gelu_fast' -> 'gelu'" in _descriptions("vivit")
    assert any(d.startswith("> -> >=: len(hits) > 1") for d in _descriptions("rename"))
    published = "-0.3016"  # timesformer base k400 logits[0, 0], read by the real-checkpoint tier only
    assert not any(d.startswith(published) for d in _descriptions("timesformer"))


def test_the_named_mutants_plant_where_they_say():
    """Each of the issue's named mutants finds its text once (named_mutants raises otherwise,
    so a refactor that moves a number shows here) and is one valid edit that changes it."""
    mutants = mutation.named_mutants()
    assert len(mutants) == len(mutation.NAMED)
    for m in mutants:
        source = (mutation.ROOT / "converters" / f"{m.module}.py").read_text()
        mutated = mutation.apply(source, m)
        assert mutated != source, m.id
        ast.parse(mutated)
    swap = next(m for m in mutants if "running_var" in m.description)
    assert len(swap.edits) == 2  # running_mean and running_var exchanged, not one duplicated


def test_the_tree_copy_leaves_out_git_and_results(tmp_path):
    copy = mutation._copy_tree(tmp_path / "tree")
    assert (copy / "converters" / "timesformer.py").read_text() == (mutation.ROOT / "converters" / "timesformer.py").read_text()
    assert not (copy / ".git").exists() and not (copy / "results").exists()
