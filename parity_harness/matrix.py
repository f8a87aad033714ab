"""The offline parity matrix (`convert-parity matrix`): per variant, the tiny original
reference against the converted HF model, and a table of both verdicts."""
from __future__ import annotations

import sys
import time

from converters.cli import _table
from converters.registry import all_variants, known_divergence
from parity_fixtures import harness  # the tiny references: the matrix runs from the repository checkout

from . import golden
from .compare import compare_outputs


def _vs_original(v, diffs) -> tuple[str, bool]:
    """The matrix's second verdict: does the converted model reproduce the original as
    released? A known port difference (registry.known_divergence) must still be seen."""
    worst = max(diffs, key=lambda d: d.max_abs)
    reproduces, known = all(d.ok for d in diffs), known_divergence(v)
    if known is None:
        return ("REPRODUCES" if reproduces else f"FAIL {worst.describe()}"), reproduces
    if reproduces:
        return (f"FAIL reproduces ({worst.max_abs:.2e}) but is listed as diverging: update "
                f"{v.family}.KNOWN_DIVERGENCES"), False
    return f"DIVERGES {worst.max_abs:.3g}: {known.cause}", True


def run(names: list[str] | None = None) -> int:
    """The offline parity matrix: tiny original reference vs converted HF model, per variant.
    Two verdicts: the weight mapping (against the original, or for a known port difference
    the original run with the port's structure) and whether the converted model
    reproduces the original as released."""
    variants = [v for v in all_variants() if not names or any(n in v.name for n in names)]
    if not variants:
        raise SystemExit(f"error: no variant matches {names}")
    rows, weights_failed, vs_failed, diverging = [], 0, 0, 0
    for i, v in enumerate(variants, 1):
        t0 = time.perf_counter()
        c = harness.case(v.name)
        tol = c.original.tolerance
        outputs = c.hf_outputs()
        vs_diffs = compare_outputs(c.reference, outputs, **tol)
        weights = compare_outputs(harness.weights_reference(c), outputs, **tol)
        record = golden.read(v.name, harness.GOLDEN_DIR)
        drift = (max(d.max_abs for d in compare_outputs(record["arrays"], {k: o.numpy() for k, o in outputs.items()}, **tol))
                 if record else float("nan"))
        weights_ok = all(d.ok for d in weights)
        vs_text, vs_ok = _vs_original(v, vs_diffs)
        weights_failed += not weights_ok
        vs_failed += not vs_ok
        diverging += vs_ok and known_divergence(v) is not None
        worst = max(weights, key=lambda d: d.max_abs)
        rows.append([v.name, v.family, "PASS" if weights_ok else "FAIL", f"{worst.max_abs:.2e}", f"{worst.max_rel:.2e}",
                     f"{tol['atol']:g}/{tol['rtol']:g}" + (f"+{tol['scale_rtol']:g}max" if tol.get("scale_rtol") else ""),
                     f"{drift:.2e}", f"{time.perf_counter() - t0:.2f}s", vs_text])
        print(f"[{i}/{len(variants)}] {v.name}: weights {'PASS' if weights_ok else 'FAIL ' + worst.describe()}; "
              f"vs original {vs_text}", file=sys.stderr)
    print(_table(rows, ["variant", "family", "weights", "max abs", "max rel", "atol/rtol", "golden drift", "time",
                        "vs original (as converted)"]))
    passed = len(variants) - weights_failed
    reproduce = len(variants) - vs_failed - diverging
    summary = (f"{passed} weight mappings pass" + (f", {weights_failed} fail" if weights_failed else "")
               + f"; {reproduce} reproduce the original, {diverging} diverge (known port differences)"
               + (f", {vs_failed} fail" if vs_failed else ""))
    print(f"\n{summary}")
    return 1 if weights_failed or vs_failed else 0
