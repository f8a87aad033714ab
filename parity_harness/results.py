"""The results file: every parity check's variant, outcome and measured differences.

Parity checks attach their measured differences to the test's user_properties
(`record_diffs`); xdist ships those to the controller, which alone collects every
report and writes the results at the end (JSON for parity_harness/report.py, and JUnit
XML when asked), so workers never race on them. The variant comes from the test's
parameters: a variant object (or a tuple starting with one), else a parameter naming a
tested variant, else the first text parameter; the other parameters' ids name the case."""
from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from . import markers, variants

def diff_row(d) -> dict:
    finite = d.nonfinite == 0  # JSON has no inf: a non-finite output is recorded as None and counted
    return {"output": d.key, "max_abs": d.max_abs if finite else None, "max_rel": d.max_rel if finite else None,
            "index": list(d.index), "atol": d.atol, "rtol": d.rtol, "scale_rtol": d.scale_rtol, "mismatched": d.mismatched,
            "total": d.total, "nonfinite": d.nonfinite}


def recorder(node):
    """`record(diffs)`: a list of parity_harness.compare.Diff into the results file."""
    def record(diffs):
        for d in diffs:
            node.user_properties.append(("parity", diff_row(d)))
    return record


def keys_recorder(node):
    """`record(info, compared_with)`: from_pretrained's loading info and the recorded key-list
    line it was compared with, into the results file (upgrade-check reports changed key lists)."""
    def record(info, compared_with: str):
        node.user_properties.append(("keys", {
            "missing": sorted(info.get("missing_keys", [])), "unexpected": sorted(info.get("unexpected_keys", [])),
            "mismatched": sorted(str(k) for k in info.get("mismatched_keys", [])), "compared_with": compared_with}))
    return record


def _crash(report) -> str:
    """A failure's one-line message for the JSON (an exception from from_pretrained reads
    differently from a failed assertion: upgrade-check tells configs that no longer load)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)  # a strict XPASS is a plain string
    return (text.splitlines() or [""])[0][:300]


def variant_and_case(item) -> tuple[str, str]:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return "", ""
    known = {v.name for key in ("parity_variants", "parity_all_variants") for v in variants.variants(item.config, key)}
    variant, case = "", []
    for value in callspec.params.values():
        first, rest = (value[0], value[1:]) if isinstance(value, tuple) and value else (value, ())
        if not variant and variants.is_variant(first):
            variant, case = first.name, case + [str(r) for r in rest]
        elif not variant and isinstance(value, str) and value in known:
            variant = value
        elif isinstance(value, (str, int, float)):
            case.append(str(value))
    if not variant and any(isinstance(v, str) for v in callspec.params.values()):
        variant = next(v for v in callspec.params.values() if isinstance(v, str))
        case.remove(variant)
    return variant, "-".join(case)


def label(items) -> None:
    """On the worker (or a serial run), where the items are: name each recorded check's
    variant and check in its user_properties, which every report carries to the controller."""
    for item in items:
        if any(item.get_closest_marker(m) for m in markers.RECORDED):
            variant, case = variant_and_case(item)
            item.user_properties.append(("parity_check", {
                "variant": variant, "check": item.originalname + (f"[{case}]" if case else "")}))


def _status(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    return report.outcome


class Writer:
    """On the controller (or a serial run): one row per recorded check, from its call
    report or, when setup skipped it, its setup report; written once at the end."""

    def __init__(self, json_path: str | None, junit_path: str | None):
        self.json_path, self.junit_path, self.rows = json_path, junit_path, []

    def pytest_runtest_logreport(self, report):
        labels = [v for k, v in report.user_properties if k == "parity_check"]
        if labels and (report.when == "call" or (report.when == "setup" and report.skipped)):
            self.rows.append({**labels[0], "status": _status(report), "duration": round(report.duration, 4),
                              "outputs": [v for k, v in report.user_properties if k == "parity"],
                              **({"message": _message(report)} if report.failed or report.skipped else {}),
                              **({"crash": _crash(report)} if report.failed else {}),
                              **next(({"keys": v} for k, v in report.user_properties if k == "keys"), {})})

    def pytest_sessionfinish(self, session):
        if not self.rows:
            return  # nothing recorded ran, nothing to write
        from .report import write_results

        rows = [{**{k: v for k, v in r.items() if k not in ("message", "crash")},
                 **({"message": r["crash"]} if "crash" in r else {})} for r in self.rows]
        if self.json_path:
            write_results(self.json_path, rows)
        if self.junit_path:
            write_junit(self.junit_path, self.rows)


def _message(report) -> str:
    if hasattr(report, "wasxfail"):
        return report.wasxfail
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    return str(report.longrepr)[-4000:]


def write_junit(path: str | os.PathLike, rows: list[dict]) -> Path:
    """The rows as JUnit XML (CI dashboards read it): a testcase per check, classname the
    variant, each output's measured differences as properties; written atomically."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("failed", "skipped", "xfailed")}
    suite = ET.Element("testsuite", name="parity", tests=str(len(rows)), failures=str(counts["failed"]),
                       skipped=str(counts["skipped"] + counts["xfailed"]), errors="0",
                       time=f"{sum(r['duration'] for r in rows):.3f}")
    for r in sorted(rows, key=lambda r: (r["variant"], r["check"])):
        case = ET.SubElement(suite, "testcase", classname=r["variant"] or "-", name=r["check"], time=f"{r['duration']:.3f}")
        if r["outputs"]:
            props = ET.SubElement(case, "properties")
            for o in r["outputs"]:
                for field in ("max_abs", "max_rel", "atol", "rtol", "mismatched", "total", "nonfinite"):
                    ET.SubElement(props, "property", name=f"{o['output']}.{field}", value=str(o[field]))
        message = r.get("message", "")
        if r["status"] == "failed":
            ET.SubElement(case, "failure", message=(message.splitlines() or [""])[-1][:500]).text = message
        elif r["status"] in ("skipped", "xfailed"):
            ET.SubElement(case, "skipped", type=r["status"], message=message[:500])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        ET.ElementTree(suite).write(fh, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
    return path
