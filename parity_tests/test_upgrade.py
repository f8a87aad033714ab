"""upgrade-check's comparison, report and bisection on results files the tests make (no
environment is built here), the key-list fallback, and one error line for a registry
that cannot be reached."""
from __future__ import annotations

import json
import socket
import time

import pytest

from converters import cli
from parity_harness import expected_keys, report, upgrade

TIMESFORMER = "timesformer-base-finetuned-k400"  # family atol 2e-5 (parity_harness/tolerances.py)


def _row(variant, check, status="passed", max_abs=None, atol=1e-5, **extra):
    outputs = [] if max_abs is None else [{"output": "logits", "max_abs": max_abs, "max_rel": max_abs, "index": [0],
                                            "atol": atol, "rtol": 1e-4, "mismatched": 0, "total": 4, "nonfinite": 0}]
    return {"variant": variant, "check": check, "status": status, "duration": 0.1, "outputs": outputs, **extra}


def _doc(version, rows):
    return {"schema": report.SCHEMA, "created": "2026-12-01T00:00:00+00:00",
            "versions": {"transformers": version, "torch": "2.13.0+cpu"}, "rows": rows}


def _keys(missing=(), compared_with="4.57"):
    return {"missing": list(missing), "unexpected": [], "mismatched": [], "compared_with": compared_with}


BASE = _doc("4.57.6", [
    _row(TIMESFORMER, "test_logits_parity", max_abs=1e-6),
    _row(TIMESFORMER, "test_golden", max_abs=0.0),
    _row("v-x", "test_logits_parity", max_abs=1e-6, atol=1e-3),  # not in the registry: its recorded atol
    _row("v-x", "test_round_trip"),
    _row("v-y", "test_round_trip", status="failed"),
    _row("v-z", "test_output_shape"),
    _row("v-l", "test_loading_keys", keys=_keys()),
    _row("v-m", "test_loading_keys", keys=_keys()),
    _row("v-n", "test_loading_keys", keys=_keys()),
])
OTHER = _doc("5.24.0", [
    _row(TIMESFORMER, "test_logits_parity", max_abs=4e-5),  # moved 3.9e-5 > 2e-5: beyond
    _row(TIMESFORMER, "test_golden", max_abs=1e-5),  # moved 1e-5 <= 2e-5
    _row("v-x", "test_logits_parity", max_abs=5e-4, atol=1e-3),  # moved 5e-4 <= its recorded 1e-3
    _row("v-x", "test_round_trip", status="failed", message="AssertionError: outputs differ"),
    _row("v-y", "test_round_trip"),  # an improvement
    # v-z's check vanished
    _row("v-l", "test_loading_keys", keys=_keys(compared_with="5.23")),  # no record for 5.24: nearest line
    _row("v-m", "test_loading_keys", status="failed", keys=_keys(["pooler.dense.weight"], "5.23"),
         message="AssertionError: missing keys changed from transformers 5.23"),
    _row("v-n", "test_loading_keys", status="failed", message="OSError: Unrecognized model in /tmp/x"),
])


def test_compare_runs_finds_regressions_drift_keys_and_configs_that_no_longer_load():
    c = upgrade.compare_runs(BASE, OTHER)
    changes = {(s["variant"], s["check"]): (s["before"], s["after"], s["regression"]) for s in c["status_changes"]}
    assert changes == {("v-x", "test_round_trip"): ("passed", "failed", True),
                       ("v-y", "test_round_trip"): ("failed", "passed", False),
                       ("v-z", "test_output_shape"): ("passed", "missing", True),
                       ("v-m", "test_loading_keys"): ("passed", "failed", True),
                       ("v-n", "test_loading_keys"): ("passed", "failed", True)}
    assert c["regressions"] == 4
    assert [(d["variant"], d["check"], d["beyond"]) for d in c["drift"]] == [
        ("v-x", "test_logits_parity", False), (TIMESFORMER, "test_logits_parity", True),
        (TIMESFORMER, "test_golden", False)]  # largest change first
    assert c["drift"][1]["tolerance"] == 2e-5 and c["drift"][0]["tolerance"] == 1e-3
    assert c["beyond_tolerance"] == 1
    assert [(k["variant"], k["after"]["missing"]) for k in c["key_changes"]] == [
        ("v-m", ["pooler.dense.weight"])]  # v-n recorded no keys: it did not load
    assert c["nearest_key_line"] == ["5.23"]
    assert c["no_longer_load"] == [{"variant": "v-n", "message": "OSError: Unrecognized model in /tmp/x"}]
    assert upgrade.failed(c)


def test_unchanged_release_passes_and_says_so():
    c = upgrade.compare_runs(BASE, {**BASE, "versions": {"transformers": "4.57.6"}})
    assert not upgrade.failed(c) and c["status_changes"] == [] and c["drift"] == []
    assert "**PASS**" in upgrade.render_markdown([c])


def test_markdown_lists_every_finding_largest_drift_first():
    md = upgrade.render_markdown([upgrade.compare_runs(BASE, OTHER)])
    assert "## transformers 4.57.6 -> 5.24.0" in md and "**FAIL**: 4 status regression(s), 1 output(s)" in md
    section = md.split("### Numeric drift")[1].split("###")[0]
    drift = [line for line in section.splitlines() if line.startswith(("| v-", "| timesformer"))]
    assert [line.split(" | ")[:2] for line in drift] == [
        ["| v-x", "test_logits_parity"], [f"| {TIMESFORMER}", "test_logits_parity"], [f"| {TIMESFORMER}", "test_golden"]]
    assert "| 4e-05 | 3.9e-05 | 2e-05 | **yes** |" in drift[1]
    assert "| test_loading_keys | passed | failed | yes | 1: v-m | AssertionError: missing keys changed" in md
    assert "| test_loading_keys | 1: v-m | missing 0; unexpected 0; mismatched 0 | missing 1 (pooler.dense.weight);" in md
    assert "compared with the nearest recorded line 5.23" in md
    assert "### Configs that no longer load (1)" in md and "- v-n: OSError: Unrecognized model" in md


def test_outputs_are_strict_json_markdown_and_the_reports_plot(tmp_path):
    other = _doc("5.24.0", [_row(TIMESFORMER, "test_logits_parity", status="failed", max_abs=None)])
    other["rows"][0]["outputs"] = [{**BASE["rows"][0]["outputs"][0], "max_abs": None, "nonfinite": 2}]
    runs = [("transformers 4.57.6", BASE), ("transformers 5.24.0", other)]
    files = upgrade.write_outputs(runs, [upgrade.compare_runs(BASE, other)], tmp_path)
    data = json.loads(files["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["comparisons"][0]["drift"][0]["change"] is None and data["comparisons"][0]["drift"][0]["beyond"]
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "non-finite" in files["md"].read_text()


def test_upgrade_check_exit_code_and_step_summary(tmp_path, monkeypatch, capsys):
    docs = {"4.57.6": BASE, "5.24.0": OTHER, "4.57.5": {**BASE, "versions": {"transformers": "4.57.5"}}}
    monkeypatch.setattr(upgrade, "_measure", lambda v, *a: docs[v])
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert upgrade.upgrade_check("4.57.6", ["4.57.5"], None, tmp_path / "a", []) == 0
    assert upgrade.upgrade_check("4.57.6", ["4.57.5", "5.24.0"], None, tmp_path / "b", []) == 1
    assert summary.read_text().count("# Upgrade check") == 2
    assert "## transformers 4.57.6 -> 4.57.5" in capsys.readouterr().out


RELEASES = ["4.57.6", "5.0.0", "5.1.0", "5.2.0", "5.3.0", "5.4.0", "5.5.0", "5.6.0", "5.7.0"]


def _bisect(tmp_path, first_bad, broken=(), threshold=None, drift_from=None):
    measured = []

    def measure(v):
        measured.append(v)
        if v in broken:
            raise upgrade.EnvBuildError(f"transformers {v} cannot be installed with torch==2.13.0+cpu")
        bad = upgrade._version(v) >= upgrade._version(first_bad)
        moved = drift_from and upgrade._version(v) >= upgrade._version(drift_from)
        return _doc(v, [_row("v-x", "test_vision", "failed" if bad else "passed", max_abs=3e-3 if moved else 0.0)])

    code = upgrade.bisect("test_vision", "4.57.6", "5.7.0", None, tmp_path, threshold, RELEASES, measure)
    return code, measured, json.loads((tmp_path / "bisect.json").read_text()) if code == 0 else None


def test_bisect_finds_the_first_release_that_changes(tmp_path, capsys):
    code, measured, found = _bisect(tmp_path, "5.3.0")
    assert code == 0 and found["first"] == "5.3.0" and found["previous"] == "5.2.0" and found["next"] == "5.4.0"
    assert len(measured) == len(set(measured)) <= 2 + 3  # good, bad, then log2(7) probes
    assert "first release where the check changes: transformers 5.3.0" in capsys.readouterr().out


def test_bisect_skips_a_release_that_cannot_be_installed(tmp_path, capsys):
    code, measured, found = _bisect(tmp_path, "5.3.0", broken={"5.3.0"})
    assert code == 0 and found["first"] == "5.4.0" and found["previous"] == "5.2.0"  # 5.3.0 could not be tried
    assert "cannot be installed" in found["skipped"]["5.3.0"]
    assert "skipped 5.3.0: transformers 5.3.0 cannot be installed" in capsys.readouterr().out


def test_bisect_on_drift_beyond_a_threshold(tmp_path):
    code, _, found = _bisect(tmp_path, "9.0.0", drift_from="5.5.0", threshold=1e-3)
    assert code == 0 and found["first"] == "5.5.0" and "moved 0.003 (> 0.001)" in found["changes"][0]
    assert _bisect(tmp_path / "wide", "9.0.0", drift_from="5.5.0", threshold=1e-2)[0] == 1  # 3e-3 is within


def test_key_lists_fall_back_to_the_nearest_recorded_line():
    recorded = {"_about": "", "4.57": {}, "5.23": {}}
    assert expected_keys.nearest_line(recorded, "5.23") == "5.23"
    assert expected_keys.nearest_line(recorded, "5.24") == "5.23"
    assert expected_keys.nearest_line(recorded, "5.3") == "4.57"  # 5.3 < 5.23: versions, not strings
    assert expected_keys.nearest_line(recorded, "4.50") == "4.57"  # nothing below: the oldest above
    assert expected_keys.nearest_line({"_about": ""}, "5.23") is None


def test_environment_recipe_pins_torch_exactly_and_follows_pip_registry(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch==2.13.0", "transformers==5.23.0", "numpy>=1.26"]\n'
                         '[project.optional-dependencies]\ntest = ["pytest>=8", "uv>=0.5"]\n')
    assert upgrade.project_pins(pyproject) == ("numpy>=1.26", "pytest>=8")
    assert upgrade.torch_requirement(pyproject).startswith("torch==2.13.0")  # this interpreter's build, e.g. +cpu
    args = upgrade.registry_args({"extra-index-url": ["file:///a", "file:///a"], "find-links": ["/w"]})
    assert args == ("--extra-index-url", "file:///a", "--find-links", "/w", "--index-strategy", "unsafe-best-match")
    r = upgrade.Recipe(tmp_path, tmp_path, "python", "torch==2.13.0+cpu", ("numpy",), args)
    assert r.key("5.0.0") != r.key("5.1.0") != upgrade.dataclasses.replace(r, pins=("numpy<2",)).key("5.1.0")


def test_unreachable_registry_is_one_error_line_and_no_environment(tmp_path, monkeypatch, capsys):
    """No network: uv is pointed at a closed port on 127.0.0.1 and must give up quickly,
    leaving nothing in the cache; the command prints one `error:` line."""
    pytest.importorskip("packaging")
    try:
        upgrade._uv()
    except upgrade.EnvBuildError:
        pytest.skip("uv is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    r = upgrade.Recipe(tmp_path, tmp_path / "envs", upgrade.sys.executable, "torch==2.13.0",
                       ("numpy",), ("--index-url", f"http://127.0.0.1:{port}/simple", "--no-cache"), build_timeout=120)
    monkeypatch.setattr(upgrade, "recipe", lambda *a, **k: r)
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "parity_tests").mkdir()
    t0 = time.monotonic()
    code = cli.main(["upgrade-check", "--from", "4.57.6", "--to", "5.23.0", "--checkout", str(tmp_path),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and time.monotonic() - t0 < 100
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "transformers 4.57.6 cannot be installed with torch==2.13.0" in errors[0], err
    assert list((tmp_path / "envs").iterdir()) == []


@pytest.mark.slow
def test_a_real_environment_runs_a_check(tmp_path, capsys):
    """End to end in a real environment of the installed transformers release (the cached
    one in $CONVERT_PARITY_CACHE/envs if it exists: then this takes about a minute; building
    it takes uv's cache, or the registry): one key-list check, compared with itself."""
    import transformers

    try:
        upgrade._uv()
    except upgrade.EnvBuildError:
        pytest.skip("uv is not installed")
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[1]
    version = transformers.__version__
    code = cli.main(["upgrade-check", "--from", version, "--to", version, "--checkout", str(checkout),
                     "--out", str(tmp_path), "--tests", "parity_tests/test_matrix.py", "--jobs", "0",
                     "-k", "test_loading_keys and timesformer-base-finetuned-k400"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    doc = report.read_results(tmp_path / "results" / f"transformers-{version}.json")
    assert doc["versions"]["transformers"] == version and doc["versions"]["torch"].startswith("2.13.0")
    assert [(r["check"], r["status"], r["keys"]["missing"]) for r in doc["rows"]] == [("test_loading_keys", "passed", [])]
    assert "**PASS**" in out


def test_one_summary_row_per_kind_of_status_change():
    base = _doc("4.57.6", [_row(f"v-{i}", "test_vision") for i in range(6)])
    other = _doc("5.23.0", [_row(f"v-{i}", "test_vision", "failed", message="AssertionError: 63 of 63 keys missing")
                            for i in range(6)])
    c = upgrade.compare_runs(base, other)
    assert c["regressions"] == 6 and len(c["status_changes"]) == 6  # the JSON keeps each
    rows = [line for line in upgrade.render_markdown([c]).splitlines() if line.startswith("| test_vision")]
    assert rows == ["| test_vision | passed | failed | yes | 6: v-0, v-1, v-2, v-3, ... | "
                    "AssertionError: 63 of 63 keys missing |"]
