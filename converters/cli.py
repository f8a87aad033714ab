"""convert-parity: list variants, convert a checkpoint, run the offline parity matrix."""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from . import errors
from .errors import shown
from .registry import (UnknownVariantError, all_variants, family_module, get_variant, hub_config_values,
                       known_divergence)


def _config_summary(v) -> str:
    c = v.config
    parts = [f"{c['image_size']}px" if "image_size" in c else None,
             f"{c['num_frames']}f" if "num_frames" in c else None,
             f"p{c['patch_size']}" if "patch_size" in c else None,
             f"d{c['hidden_size']}" if "hidden_size" in c else None,
             f"{c['num_labels']} labels" if "num_labels" in c else None]
    return " ".join(p for p in parts if p)


def _reference_summary(v) -> str:
    if not v.published:
        return "-"
    return "; ".join(f"{p.output}={list(p.values)}" if p.values is not None else f"none ({p.note})"
                     for p in v.published)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _original_summary(v) -> str:
    """Whether the converted model (default config) reproduces the original as released."""
    if not hasattr(family_module(v.family), "convert"):
        return "-"
    known = known_divergence(v)
    return "yes" if known is None else f"NO: {known.summary()}"


def cmd_list(args) -> int:
    variants = [v for v in all_variants() if not args.family or v.family == args.family]
    rows = [[v.name, v.family, "yes" if hasattr(family_module(v.family), "convert") else "data only",
             _config_summary(v), _original_summary(v), v.source.url or "-", _reference_summary(v)] for v in variants]
    print(_table(rows, ["variant", "family", "converter", "config", "reproduces original", "source",
                        "published reference"]))
    print(f"\n{len(variants)} variants")
    for family in dict.fromkeys(v.family for v in variants):
        hub = hub_config_values(next(v for v in variants if v.family == family))
        if hub:
            print(f"{family}: the converted config keeps the original's numerics; the published hub config has "
                  f"{_changes(next(v for v in variants if v.family == family), hub)} and computes the published "
                  f"values instead (convert --hub-config writes it)")
    return 0


def _changes(variant, hub: dict) -> str:
    return ", ".join(f"{k} {hub[k]!r} where the conversion writes the original's {variant.config.get(k)!r}"
                     for k in hub)


def cmd_convert(args) -> int:
    import contextlib

    from . import downloads, pipeline

    variant = get_variant(args.variant)
    if not hasattr(family_module(variant.family), "convert"):
        raise SystemExit(f"error: {variant.family} has no converter yet (variant {variant.name} is registry data only)")
    with downloads.forced_offline("--offline") if args.offline else contextlib.nullcontext():
        out = pipeline.convert_file(variant, args.checkpoint, args.out, overwrite=args.overwrite,
                                    hub_config=args.hub_config, progress=lambda msg: print(msg, file=sys.stderr))
    if args.verify:
        _verify(variant, out)
    hub = hub_config_values(variant) if args.hub_config else {}
    if hub:
        print(f"note: --hub-config wrote the published hub config ({_changes(variant, hub)}): the model computes "
              f"the published values, not the original's outputs", file=sys.stderr)
    if known := known_divergence(variant):
        print(f"warning: {variant.name} does not reproduce the original in any config: {known.describe()}",
              file=sys.stderr)
    return 0


def _verify(variant, out) -> None:
    """Load the output as a user would, with no missing, unexpected or mismatched
    keys, and run it once on a random input of the right shape."""
    import torch

    from . import pipeline

    model, info = pipeline.hf_model_class(variant).from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise SystemExit(f"verify failed: {problems}")
    family = family_module(variant.family)
    if not hasattr(family, "verify_inputs"):
        print(f"verified: from_pretrained loads {out} with no missing, unexpected or mismatched keys", file=sys.stderr)
        return
    with torch.no_grad():
        outputs = model.eval()(**family.verify_inputs(model.config))
    bad = [k for k, v in outputs.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"verify failed: non-finite outputs {bad}")
    shapes = {k: tuple(v.shape) for k, v in outputs.items() if torch.is_tensor(v)}
    print(f"verified: from_pretrained loads {out} with no missing, unexpected or mismatched keys; "
          f"a random input gives finite outputs {shapes}", file=sys.stderr)


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


def cmd_matrix(args) -> int:
    """The offline parity matrix: tiny original reference vs converted HF model, per variant.
    Two verdicts: the weight mapping (against the original, or for a known port difference
    the original run with the port's structure) and whether the converted model
    reproduces the original as released."""
    try:
        from fixtures import harness
        from parity_harness import golden
        from parity_harness.compare import compare_outputs
    except ImportError:
        raise SystemExit("error: the matrix needs the repository checkout (fixtures/); run it from there")
    from .registry import convertible_variants

    variants = [v for v in convertible_variants() if not args.k or any(k in v.name for k in args.k)]
    if not variants:
        raise SystemExit(f"error: no convertible variant matches {args.k}")
    rows, weights_failed, vs_failed, diverging = [], 0, 0, 0
    for i, v in enumerate(variants, 1):
        t0 = time.perf_counter()
        c = harness.case(v.name)
        tol = c.adapter.tolerance
        outputs = c.hf_outputs()
        vs_diffs = compare_outputs(c.reference, outputs, **tol)
        weights = compare_outputs(harness.weights_reference(c), outputs, **tol)
        record = golden.read(v.name)
        drift = (max(d.max_abs for d in compare_outputs(record["arrays"], {k: o.numpy() for k, o in outputs.items()}, **tol))
                 if record else float("nan"))
        weights_ok = all(d.ok for d in weights)
        vs_text, vs_ok = _vs_original(v, vs_diffs)
        weights_failed += not weights_ok
        vs_failed += not vs_ok
        diverging += vs_ok and known_divergence(v) is not None
        worst = max(weights, key=lambda d: d.max_abs)
        rows.append([v.name, v.family, "PASS" if weights_ok else "FAIL", f"{worst.max_abs:.2e}", f"{worst.max_rel:.2e}",
                     f"{tol['atol']:g}/{tol['rtol']:g}", f"{drift:.2e}", f"{time.perf_counter() - t0:.2f}s", vs_text])
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


def cmd_report(args) -> int:
    from parity_harness.report import build_report

    files = build_report(args.results, args.out)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def cmd_upgrade_check(args) -> int:
    """The suite under other transformers releases (parity_harness/upgrade.py), compared."""
    from pathlib import Path

    try:
        from parity_harness import upgrade
    except ImportError:
        raise SystemExit("error: upgrade-check needs the repository checkout (parity_harness/); run it from there")
    checkout = Path(args.checkout)
    if not (checkout / "pyproject.toml").exists() or not (checkout / "parity_tests").is_dir():
        raise SystemExit(f"error: {shown(str(checkout))} is not a convert-parity checkout (--checkout)")
    recipe = upgrade.recipe(checkout, Path(args.cache) if args.cache else None,
                            build_timeout=args.build_timeout, run_timeout=args.run_timeout)
    try:
        if args.bisect:
            if not (args.good and args.bad):
                raise SystemExit("error: --bisect needs --good and --bad")
            return upgrade.bisect(args.bisect, args.good, args.bad, recipe, Path(args.out), args.threshold)
        if not (args.from_ and args.to):
            raise SystemExit("error: upgrade-check needs --from and at least one --to (or --bisect)")
        pytest_args = [*(args.tests or upgrade.DEFAULT_TESTS), *(["-k", args.k] if args.k else [])]
        return upgrade.upgrade_check(args.from_, args.to, recipe, Path(args.out), pytest_args, args.jobs)
    except (upgrade.EnvBuildError, upgrade.SuiteError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert-parity", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print the variant table")
    p.add_argument("--family")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("convert", help="convert an original checkpoint to a from_pretrained directory")
    p.add_argument("variant")
    p.add_argument("--checkpoint", required=True, help="local path, hf:// or huggingface.co URL, Google Drive link or URL")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--verify", action="store_true", help="load the result with from_pretrained and run it")
    p.add_argument("--offline", action="store_true",
                   help="use cached files only: no download, no probe of the hub (label names, tokenizers)")
    p.add_argument("--hub-config", action="store_true",
                   help="write the published hub config where it differs from the original's computation "
                        "(Perceiver: exact hidden_act 'gelu' instead of the original's tanh GELU); it reproduces "
                        "the published values, not the original's outputs; families without a HUB_CONFIG are unchanged")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("matrix", help="run the offline parity matrix and print a summary table")
    p.add_argument("-k", action="append", help="only variants whose name contains this (repeatable)")
    p.set_defaults(func=cmd_matrix)
    p = sub.add_parser("report", help="report.md, report.json, a plot and the drift between results files")
    p.add_argument("results", nargs="+", help="results files written by pytest (--results); the first is the baseline")
    p.add_argument("--out", default="report", help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("upgrade-check", help="run the offline suite under other transformers releases and compare",
                       description="One cached uv environment per transformers release (pins from pyproject.toml, "
                                   "torch exactly this interpreter's); the suite's results compared with --from. "
                                   "Exit 1 on a status regression or drift beyond the family tolerance.")
    p.add_argument("--from", dest="from_", metavar="VERSION", help="the baseline transformers release")
    p.add_argument("--to", action="append", metavar="VERSION", help="a release to compare with it (repeatable)")
    p.add_argument("--tests", action="append", help="pytest paths to run (repeatable; default: the matrix and "
                                                    "test_xclip.py)")
    p.add_argument("-k", help="pytest -k expression")
    p.add_argument("--jobs", type=int, default=2, help="pytest-xdist workers per run (default: %(default)s)")
    p.add_argument("--bisect", metavar="CHECK",
                   help="pytest arguments selecting the check, e.g. a test id; finds the first release between --good "
                        "and --bad where its status changes or an output moves beyond --threshold")
    p.add_argument("--good", metavar="VERSION")
    p.add_argument("--bad", metavar="VERSION")
    p.add_argument("--threshold", type=float, default=None,
                   help="with --bisect: an output moving more than this is a change (default: the family atol)")
    p.add_argument("--out", default="upgrade-report", help="output directory (default: %(default)s)")
    p.add_argument("--cache", help="environment cache (default: $CONVERT_PARITY_CACHE/envs or "
                                   "~/.cache/convert-parity/envs)")
    p.add_argument("--checkout", default=".", help="the convert-parity checkout to test (default: the current directory)")
    p.add_argument("--build-timeout", type=float, default=1800, help="seconds for one environment (default: %(default)s)")
    p.add_argument("--run-timeout", type=float, default=3600, help="seconds for one suite run (default: %(default)s)")
    p.set_defaults(func=cmd_upgrade_check)
    return parser


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary output is removed


def _one_line(err: BaseException) -> str:
    """The error as one line: messages that quote file content are escaped already;
    this also folds any newline an exception from a library carries."""
    return shown(" ".join(str(err).split()) if str(err).strip() else type(err).__name__, limit=2000)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one `warning:` line each, without the source line Python adds."""
    print(f"warning: {_one_line(message if isinstance(message, Warning) else Warning(message))}", file=sys.stderr)


def main(argv=None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    # SIGTERM unwinds for this call only; signal handlers can only be set on the main thread.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    previous_showwarning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return args.func(args)
    except UnknownVariantError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (FileNotFoundError, errors.CheckpointError, errors.DownloadError, errors.OutputExistsError,
            errors.OutputPathError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    except SystemExit:
        raise
    except Exception as err:  # a bug, or an input no check foresaw: still one line, no traceback
        logging.getLogger("convert_parity").info("unexpected error", exc_info=True)
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (run with -v for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous_showwarning
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
