"""Parity results files and the report over them.

A results file is what one pytest run measured: every parity check's variant,
check, status, per-output max abs / max rel difference, tolerance and duration,
with the versions that ran it. `convert-parity report` reads one or more of them
(shards of one run are merged by transformers version) and writes report.md,
report.json, a PNG plot and the drift from the oldest line to the next, largest first.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

SCHEMA = 1


def runtime_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "jax", "flax", "dm-haiku", "numpy", "huggingface_hub"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_results(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One results file, written atomically (a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "versions": runtime_versions(), "rows": sorted(rows, key=lambda r: (r["variant"], r["check"]))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a convert-parity results file (schema {doc.get('schema')!r})")
    return doc


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split("."))


def load_runs(paths: Iterable[Path]) -> list[tuple[str, dict]]:
    """One run per transformers version, oldest first (the baseline of the drift);
    files of the same version (shards of one night) are merged."""
    by_version: dict[str, dict] = {}
    for path in paths:
        doc = read_results(path)
        version = doc["versions"].get("transformers", "?")
        if version in by_version:
            by_version[version]["rows"] = by_version[version]["rows"] + doc["rows"]
        else:
            by_version[version] = dict(doc)
    return [(f"transformers {v}", by_version[v]) for v in sorted(by_version, key=_version_key)]


def _max_abs(output: Mapping) -> float:
    """An output with NaN or inf values (recorded as `nonfinite`, max_abs None) is infinitely far off."""
    return math.inf if output.get("nonfinite") else output["max_abs"]


def worst(row: Mapping) -> float | None:
    values = [_max_abs(o) for o in row.get("outputs", [])]
    return max(values) if values else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else "non-finite" if math.isinf(x) else f"{x:.3g}"


def drift(base: Mapping, other: Mapping) -> list[dict]:
    """Per (variant, check, output): how the measured max abs difference moved, largest first."""
    def index(doc):
        return {(r["variant"], r["check"], o["output"]): (o, r["status"]) for r in doc["rows"] for o in r.get("outputs", [])}

    a, b = index(base), index(other)
    rows = []
    for key in sorted(set(a) | set(b)):
        (oa, sa), (ob, sb) = a.get(key, (None, None)), b.get(key, (None, None))
        va, vb = (_max_abs(oa) if oa else None), (_max_abs(ob) if ob else None)
        change = (0.0 if va == vb else abs(vb - va)) if va is not None and vb is not None else math.inf
        rows.append({"variant": key[0], "check": key[1], "output": key[2], "base": va, "other": vb,
                     "change": change, "base_status": sa, "other_status": sb})
    return sorted(rows, key=lambda r: (-r["change"], r["variant"], r["check"], r["output"]))


def plot(runs: list[tuple[str, dict]], path: Path, check: str = "test_logits_parity") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for _, doc in runs for r in doc["rows"] if r["check"] == check})
    if not variants:
        return
    floor, ceiling = 1e-12, 1e3  # a log axis cannot show an exact 0, nor an infinite (non-finite) difference
    fig, ax = plt.subplots(figsize=(max(8, 0.38 * len(variants)), 5))
    x = range(len(variants))
    for i, (label, doc) in enumerate(runs):
        by_variant = {r["variant"]: r for r in doc["rows"] if r["check"] == check}
        ys = [min(max(worst(by_variant[v]) or 0.0, floor), ceiling) if v in by_variant else float("nan")
              for v in variants]
        ax.scatter([xi + 0.12 * (i - (len(runs) - 1) / 2) for xi in x], ys, label=label, s=22, zorder=3)
    tol = {r["variant"]: r["outputs"][0]["atol"] for _, doc in runs for r in doc["rows"]
           if r["check"] == check and r.get("outputs")}
    ax.step([xi for xi in x], [tol.get(v, float("nan")) for v in variants], where="mid", color="red",
            linestyle="--", label="tolerance (atol)")
    ax.set_yscale("log")
    ax.set_xticks(list(x), variants, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(f"max abs diff (0 drawn at {floor:g}, non-finite at {ceiling:g})")
    ax.set_title("Parity: tiny original reference vs converted HF model")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(result_paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    paths = [Path(p) for p in result_paths]
    if not paths:
        raise ValueError("no results files given")
    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    summary = {}
    for label, doc in runs:
        counts = defaultdict(int)
        for r in doc["rows"]:
            counts[r["status"]] += 1
        summary[label] = {"versions": doc["versions"], "created": doc["created"], "counts": dict(counts)}
    comparison = drift(runs[0][1], runs[1][1]) if len(runs) > 1 else []

    lines = ["# Parity report", ""]
    for label, info in summary.items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(info["counts"].items()))
        versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        lines += [f"- **{label}** ({info['created']}): {counts}. Versions: {versions}."]
    lines += ["", "## Measured differences", "",
              "| variant | check | status | " + " | ".join(f"max abs ({label})" for label, _ in runs) + " | atol |",
              "|---|---|---|" + "---|" * len(runs) + "---|"]
    keyed = [{(r["variant"], r["check"]): r for r in doc["rows"]} for _, doc in runs]
    for key in sorted(set().union(*keyed)):
        rows = [k.get(key) for k in keyed]
        first = next(r for r in rows if r)
        status = "/".join(r["status"] if r else "-" for r in rows)
        atol = first["outputs"][0]["atol"] if first.get("outputs") else None
        lines.append(f"| {key[0]} | {key[1]} | {status} | " + " | ".join(_fmt(worst(r)) if r else "-" for r in rows)
                     + f" | {_fmt(atol)} |")
    if comparison:
        lines += ["", f"## Drift: {runs[0][0]} -> {runs[1][0]}", "",
                  "Largest change of the measured max abs difference first.", "",
                  "| variant | check | output | before | after | change | status |", "|---|---|---|---|---|---|---|"]
        for d in comparison:
            if d["change"] == 0:
                continue
            lines.append(f"| {d['variant']} | {d['check']} | {d['output']} | {_fmt(d['base'])} | {_fmt(d['other'])} | "
                         f"{_fmt(d['change'])} | {d['base_status']} -> {d['other_status']} |")
        unchanged = sum(d["change"] == 0 for d in comparison)
        lines += ["", f"{unchanged} of {len(comparison)} measured outputs did not move."]
    files = {"md": out / "report.md", "json": out / "report.json", "png": out / "parity.png"}
    files["md"].write_text("\n".join(lines) + "\n")
    files["json"].write_text(json.dumps({"runs": summary, "rows": {label: doc["rows"] for label, doc in runs},
                                         "drift": [{**d, **{k: None if d[k] is not None and math.isinf(d[k])
                                                            else d[k] for k in ("base", "other", "change")}}
                                                   for d in comparison]}, indent=1) + "\n")
    plot(runs, files["png"])
    return files
