"""The quick profile (parity_harness/quick.py): a plain run checks the representatives only;
--all-variants, --run-slow, -k and test ids bring every variant back; non-variant tests always run."""
from __future__ import annotations

import pytest

from converters.registry import all_variants, representatives

SUITE = """
def test_per_variant(variant):
    pass

def test_not_per_variant():
    pass
"""


@pytest.fixture
def collected(pytester):
    pytester.makeini("""
[pytest]
parity_variants = converters.registry:all_variants
parity_quick_variants = converters.registry:representatives
""")
    pytester.makepyfile(test_stand_in=SUITE)

    def run(*args: str) -> list[str]:
        result = pytester.runpytest_inprocess("--co", "-q", "-p", "no:xdist", "-p", "no:benchmark", "-p", "no:cacheprovider", *args)
        return [line for line in result.outlines if "::" in line]

    return run


def test_plain_run_checks_the_representatives(collected):
    ids = collected()
    assert ids == ["test_stand_in.py::test_per_variant[" + v.name + "]" for v in representatives()] + [
        "test_stand_in.py::test_not_per_variant"]
    assert len(representatives()) == 10  # one per family and Perceiver class


@pytest.mark.parametrize("args", [("--all-variants",), ("--run-slow",), ("-k", "per_variant or not_per")])
def test_asking_brings_every_variant_back(collected, args):
    assert len(collected(*args)) == len(all_variants()) + 1


def test_k_selects_among_every_variant(collected):
    timesformer = [v.name for v in all_variants() if v.family == "timesformer"]
    assert collected("-k", "timesformer") == [f"test_stand_in.py::test_per_variant[{n}]" for n in timesformer]
    assert len(timesformer) > 1
