"""What the console script tells a Perceiver user: the faithful config by default,
`--hub-config` for the published one, and the two port differences no config removes
(KNOWN_DIVERGENCES) in `convert`, `list` and `matrix`, through the real CLI."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from converters import cli, perceiver, pipeline
from converters.family import KnownDivergence
from fixtures import harness

DIVERGING = sorted(perceiver.KNOWN_DIVERGENCES)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_convert(tmp_path, monkeypatch, capsys):
    """`convert <variant>` on the matrix case's tiny checkpoint (the registry's full-size
    spec would not fit it); returns (exit code, stderr, config.json)."""
    monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")  # label names: cache only
    monkeypatch.setattr(pipeline, "spec_of", lambda variant: dict(harness.case(variant.name).spec))

    def convert(name: str, *options: str):
        out = tmp_path / f"{name}{'-'.join(options)}"
        code, _, err = run(capsys, "convert", name, "--checkpoint", str(harness.case(name).checkpoint),
                           "--out", str(out), *options)
        config = json.loads((out / "config.json").read_text()) if code == 0 else None
        return code, err, config

    return convert


@pytest.mark.xdist_group("language-perceiver")
def test_convert_writes_the_original_gelu_unless_hub_config(tiny_convert):
    code, err, config = tiny_convert("language-perceiver")
    assert code == 0, err
    assert config["hidden_act"] == "gelu_pytorch_tanh"
    assert "warning" not in err and "note" not in err
    code, err, config = tiny_convert("language-perceiver", "--hub-config")
    assert code == 0, err
    assert config["hidden_act"] == "gelu"
    assert "note: --hub-config wrote the published hub config (hidden_act 'gelu' where the conversion writes " \
           "the original's 'gelu_pytorch_tanh')" in err


@pytest.mark.parametrize("name", DIVERGING)
def test_convert_warns_where_no_config_reproduces_the_original(name, tiny_convert):
    known = perceiver.KNOWN_DIVERGENCES[name]
    for options in ((), ("--hub-config",)):
        code, err, config = tiny_convert(name, *options)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert warnings == [f"warning: {name} does not reproduce the original in any config: {known.describe()}"]
        assert f"{known.full_size_max_abs:.2g} at full size" in warnings[0]


def test_list_shows_which_variants_reproduce_the_original(capsys):
    code, out, _ = run(capsys, "list", "--family", "perceiver")
    assert code == 0
    lines = out.splitlines()
    column = lines[0].index("reproduces original")
    cells = {line.split()[0]: line[column:].split("  ")[0] for line in lines[2:] if line.startswith(
        tuple(v.name for v in perceiver.VARIANTS))}
    assert cells == {v.name: f"NO: {perceiver.KNOWN_DIVERGENCES[v.name].summary()}"
                     if v.name in perceiver.KNOWN_DIVERGENCES else "yes" for v in perceiver.VARIANTS}
    assert ("perceiver: the converted config keeps the original's numerics; the published hub config has "
            "hidden_act 'gelu' where the conversion writes the original's 'gelu_pytorch_tanh'") in out
    assert "(convert --hub-config writes it)" in out


def _matrix(capsys, monkeypatch, divergences):
    monkeypatch.setattr(perceiver, "FAMILY", dataclasses.replace(perceiver.FAMILY, known_divergences=divergences))
    code, out, _ = run(capsys, "matrix", "-k", "perceiver-learned", "-k", "perceiver-fourier", "-k", "perceiver-conv")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("vision-perceiver-")}
    return code, rows, out.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.xdist_group("vision-perceiver-conv")
def test_matrix_tells_weights_from_reproducing_the_original(capsys, monkeypatch):
    """Both verdicts per variant; a known divergence must still be seen and an unknown one fails."""
    known = dict(perceiver.KNOWN_DIVERGENCES)
    code, rows, summary = _matrix(capsys, monkeypatch, known)
    assert code == 0
    for name in DIVERGING:
        assert rows[name].split()[2] == "PASS"
        assert re.search(rf"DIVERGES \d\.\d+: {re.escape(known[name].cause)}$", rows[name]), rows[name]
    assert rows["vision-perceiver-fourier"].split()[2] == "PASS" and rows["vision-perceiver-fourier"].endswith("REPRODUCES")
    assert summary == "3 weight mappings pass; 1 reproduce the original, 2 diverge (known port differences)"

    # A divergence nobody recorded fails the run; so does a recorded one that is no longer seen.
    fourier = KnownDivergence("a made-up cause", "-", 1.0, 1.0, "-")
    code, rows, summary = _matrix(capsys, monkeypatch, {"vision-perceiver-fourier": fourier,
                                                        "vision-perceiver-conv": known["vision-perceiver-conv"]})
    assert code == 1
    assert "FAIL reproduces" in rows["vision-perceiver-fourier"] and "KNOWN_DIVERGENCES" in rows["vision-perceiver-fourier"]
    # Unrecorded, learned's weights are checked against the original itself, and fail too.
    assert rows["vision-perceiver-learned"].split()[2] == "FAIL" and "FAIL logits" in rows["vision-perceiver-learned"]
    assert summary == ("2 weight mappings pass, 1 fail; 0 reproduce the original, 1 diverge (known port "
                       "differences), 2 fail")
