"""The harness as another converter's authors use it: a toy project (one family, one
rule table, one tiny torch reference, a golden) in a temporary directory, configured
in its ini, run by pytest with the plugin. Its parity check passes, a planted bug in
its rule table turns it red with the size and place, and its golden is written when
missing, checked on the next run, and refused when the seed changes."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

INI = """
[pytest]
parity_variants = toy_project.registry:variants
parity_golden_dir = golden
addopts = -p no:cacheprovider --strict-markers
"""

REGISTRY = '''
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    width: int


def variants():
    return [Variant("toy-small", "toy", 4), Variant("toy-wide", "toy", 6)]
'''

# The rule table: original key -> HF key. The two hidden layers have the same shape, so
# a swapped pair still loads, and only parity can tell.
CONVERTER = '''
RULES = {
    "net.0.weight": "encoder.first.weight", "net.0.bias": "encoder.first.bias",
    "net.2.weight": "encoder.second.weight", "net.2.bias": "encoder.second.bias",
    "net.4.weight": "classifier.weight", "net.4.bias": "classifier.bias",
}


def convert(original_state):
    return {RULES[k]: v for k, v in original_state.items()}
'''

REFERENCE = '''
import torch
from torch import nn


class Original(nn.Module):
    """The original's layout: one nn.Sequential."""
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, x):
        return self.net(x)


def original(width, seed):
    torch.manual_seed(seed)
    return Original(width)


class Encoder(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.first, self.second = nn.Linear(3, width), nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.second(torch.tanh(self.first(x))))


class PortedModel(nn.Module):
    """The port's layout: named modules."""
    def __init__(self, width):
        super().__init__()
        self.encoder, self.classifier = Encoder(width), nn.Linear(width, 2)

    def forward(self, x):
        return {"logits": self.classifier(self.encoder(x))}
'''

# The planted bug: the two hidden layers' biases exchanged.
PLANTED = (CONVERTER.replace('"net.0.bias": "encoder.first.bias"', '"net.0.bias": "encoder.second.bias"')
           .replace('"net.2.bias": "encoder.second.bias"', '"net.2.bias": "encoder.first.bias"'))
assert PLANTED.count("encoder.first.bias") == PLANTED.count("encoder.second.bias") == 1 and PLANTED != CONVERTER

TESTS = '''
import pytest
import torch

from parity_harness.compare import assert_parity, compare_outputs
from toy_project import convert, reference

pytestmark = pytest.mark.parity
SEED = 0
TOLERANCE = {"logits": dict(atol=1e-6, rtol=1e-5)}


def outputs(variant):
    original = reference.original(variant.width, SEED).eval()
    ported = reference.PortedModel(variant.width).eval()
    ported.load_state_dict(convert.convert(original.state_dict()))
    x = torch.linspace(-1, 1, 5 * 3).reshape(5, 3)
    with torch.no_grad():
        return {"logits": original(x)}, {k: v for k, v in ported(x).items()}


def test_logits_parity(variant, record_diffs):
    expected, actual = outputs(variant)
    diffs = compare_outputs(expected, actual, **TOLERANCE["logits"])
    record_diffs(diffs)
    assert_parity(diffs, f"{variant.name} original vs port")


def test_golden(variant, golden):
    _, actual = outputs(variant)
    golden.check(variant.name, {k: v.numpy() for k, v in actual.items()}, spec={"width": variant.width},
                 seed=SEED, tolerance=TOLERANCE)
'''


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(pytester, monkeypatch):
    """The toy project in pytester's directory; `run(*args)` runs pytest on it in a
    subprocess (as its authors would: torch in a pytest process of its own), with this
    checkout's harness first on the path."""
    pytester.makeini(INI)
    package = pytester.mkpydir("toy_project")
    for name, source in {"registry": REGISTRY, "convert": CONVERTER, "reference": REFERENCE}.items():
        (package / f"{name}.py").write_text(source)
    pytester.makepyfile(test_toy=TESTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(pytester.path), os.environ.get("PYTHONPATH", "")]))

    def run(*args):
        # `-p no:convert_parity`: where the entry point is installed, the plugin is then
        # loaded by its module name all the same, once.
        return pytester.runpytest_subprocess("-p", "no:convert_parity", "-p", "parity_harness.plugin",
                                             "--results", "results.json", "--results-junit", "results.xml", *args)

    return pytester, run


@pytest.mark.slow  # three pytest processes, each importing torch: ~15 s CPU
def test_toy_project_runs_on_the_plugin(toy):
    """A missing golden is written and its test fails; the next run passes and writes the
    results (JSON and JUnit XML, the variant from the parameters); the planted bug fails
    parity with the size and place, and the golden too."""
    pytester, run = toy
    first = run()
    first.assert_outcomes(passed=2, failed=2)
    first.stdout.fnmatch_lines(["*no golden for toy-small: wrote *golden/toy-small.json*"])
    record = json.loads((pytester.path / "golden" / "toy-small.json").read_text())
    assert (record["tiny_spec"], record["seed"], record["command"].split()[0]) == ({"width": 4}, 0, "pytest")

    second = run()
    second.assert_outcomes(passed=4)
    rows = {(r["variant"], r["check"]): r for r in json.loads((pytester.path / "results.json").read_text())["rows"]}
    assert sorted(rows) == [(v, c) for v in ("toy-small", "toy-wide") for c in ("test_golden", "test_logits_parity")]
    assert rows["toy-small", "test_golden"]["outputs"][0]["max_abs"] == 0.0
    suite = ET.parse(pytester.path / "results.xml").getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("4", "0")
    assert {c.get("classname") for c in suite.iter("testcase")} == {"toy-small", "toy-wide"}

    (pytester.path / "toy_project" / "convert.py").write_text(PLANTED)
    planted = run()
    planted.assert_outcomes(failed=4)
    planted.stdout.fnmatch_lines([
        "*toy-small original vs port: logits: * elements out of tolerance*max abs diff * at index (*",
        "*toy-small drifted from its golden*max abs diff * at index (*"])
    suite = ET.parse(pytester.path / "results.xml").getroot()
    assert suite.get("failures") == "4" and all(c.find("failure") is not None for c in suite.iter("testcase"))


def _golden(tmp_path, update=False):
    from parity_harness.golden import Golden

    return Golden(tmp_path, update, "pytest --update-golden")


@pytest.mark.parametrize("changed", ["seed", "tiny_spec"])
def test_golden_made_from_another_spec_or_seed_is_refused(tmp_path, changed):
    """The golden records the tiny spec and seed that made it; outputs from others are not
    compared against it (they would drift for a reason that is not the numerics)."""
    outputs, spec = {"logits": np.arange(4.0)}, {"width": 4}
    _golden(tmp_path, update=True).check("v", outputs, spec=spec, seed=0, tolerance=dict(atol=0, rtol=0))
    now = {"seed": dict(spec=spec, seed=1), "tiny_spec": dict(spec={"width": 5}, seed=0)}[changed]
    with pytest.raises(pytest.fail.Exception, match=f"made from another {changed} .{changed}: golden"):
        _golden(tmp_path).check("v", outputs, **now, tolerance=dict(atol=0, rtol=0))


def test_golden_tolerance_is_per_output_and_update_rewrites(tmp_path):
    spec, tolerance = {"width": 4}, {"a": dict(atol=1e-3, rtol=0), "b": dict(atol=0, rtol=0)}
    _golden(tmp_path, update=True).check("v", {"a": np.zeros(2), "b": np.zeros(2)}, spec=spec, seed=0,
                                         tolerance=tolerance)
    diffs = _golden(tmp_path).check("v", {"a": np.full(2, 1e-4), "b": np.zeros(2)}, spec=spec, seed=0,
                                    tolerance=tolerance)
    assert [(d.key, d.atol, d.ok) for d in diffs] == [("a", 1e-3, True), ("b", 0, True)]
    with pytest.raises(AssertionError, match=r"b: 1/2 elements out of tolerance"):
        _golden(tmp_path).check("v", {"a": np.zeros(2), "b": np.array([0, 1e-4])}, spec=spec, seed=0,
                                tolerance=tolerance)
    _golden(tmp_path, update=True).check("v", {"a": np.zeros(2), "b": np.array([0, 1e-4])}, spec=spec, seed=0,
                                         tolerance=tolerance)
    assert _golden(tmp_path).check("v", {"a": np.zeros(2), "b": np.array([0, 1e-4])}, spec=spec, seed=0,
                                   tolerance=tolerance)[1].ok
    with pytest.raises(ValueError, match=r"no tolerance for outputs \['c'\]"):
        _golden(tmp_path).check("v", {"c": np.zeros(2)}, spec=spec, seed=0, tolerance=tolerance)
