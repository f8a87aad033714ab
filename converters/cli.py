"""convert-parity: list variants, convert a checkpoint, run the offline parity matrix."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from . import errors
from .errors import shown
from .registry import UnknownVariantError, all_variants, get_variant, hub_config_values, known_divergence


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
    known = known_divergence(v)
    return "yes" if known is None else f"NO: {known.summary()}"


def cmd_list(args) -> int:
    variants = [v for v in all_variants() if not args.family or v.family == args.family]
    rows = [[v.name, v.family, _config_summary(v), _original_summary(v), v.source.url or "-", _reference_summary(v)]
            for v in variants]
    print(_table(rows, ["variant", "family", "config", "reproduces original", "source", "published reference"]))
    print(f"\n{len(variants)} variants")
    for name in dict.fromkeys(v.family for v in variants):
        first = next(v for v in variants if v.family == name)
        if hub := hub_config_values(first):
            print(f"{name}: the converted config keeps the original's numerics; the published hub config has "
                  f"{_changes(first, hub)} and computes the published "
                  f"values instead (convert --hub-config writes it)")
    return 0


def _changes(variant, hub: dict) -> str:
    return ", ".join(f"{k} {hub[k]!r} where the conversion writes the original's {variant.config.get(k)!r}"
                     for k in hub)


def cmd_convert(args) -> int:
    import contextlib

    from . import downloads, pipeline

    variant = get_variant(args.variant)
    verdicts = []
    verify = _verifier(variant, args, verdicts) if args.verify else None
    with downloads.forced_offline("--offline") if args.offline else contextlib.nullcontext():
        out = pipeline.convert_file(variant, args.checkpoint, args.out, overwrite=args.overwrite,
                                    hub_config=args.hub_config, progress=lambda msg: print(msg, file=sys.stderr),
                                    verify=verify)
    hub = hub_config_values(variant) if args.hub_config else {}
    if hub:
        print(f"note: --hub-config wrote the published hub config ({_changes(variant, hub)}): the model computes "
              f"the published values, not the original's outputs", file=sys.stderr)
    if known := known_divergence(variant):
        print(f"warning: {variant.name} does not reproduce the original in any config: {known.describe()}",
              file=sys.stderr)
    if not verdicts:
        return 0
    verdict = verdicts[0]
    print("\n".join(verdict.lines()), file=sys.stderr)
    print(f"evidence: {out / 'parity.json'}, {out / 'README.md'}", file=sys.stderr)
    return verdict.exit_code


def _verifier(variant, args, verdicts: list):
    """The `verify` step of pipeline.convert_file: the verdict (kept in `verdicts`) and its evidence files."""
    from . import downloads, evidence, verify

    def run(staged, checkpoint, box, conversion_seconds, spec):
        verdict = verify.verify(variant, spec, staged, checkpoint, box, hub_config=args.hub_config, seed=args.seed,
                                progress=lambda msg: print(msg, file=sys.stderr))
        verdicts.append(verdict)
        source = {"source": shown(args.checkpoint), "sha256": downloads.sha256_file(checkpoint),
                  "bytes": checkpoint.stat().st_size}
        return evidence.evidence_files(verdict, variant, spec, source, args.hub_config, conversion_seconds)

    return run


def cmd_matrix(args) -> int:
    """The offline parity matrix; the harness runs it (parity_harness/matrix.py)."""
    try:
        from parity_harness import matrix
    except ImportError:
        raise SystemExit("error: the matrix needs the repository checkout (fixtures/); run it from there")
    return matrix.run(args.k)


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
        print(f"error: {errors.one_line(err)}", file=sys.stderr)
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
    p.add_argument("--verify", action="store_true",
                   help="prove the result against the original model: the checkpoint's weights in the project's "
                        "re-implementation of the original, both run on one input, every output compared at the "
                        "family tolerance; writes parity.json and a model card. Exit 0: within tolerance; "
                        "1: beyond (the first diverging layer is printed); 3: a known port divergence, named")
    p.add_argument("--seed", type=int, default=None,
                   help="with --verify: run a seeded input (default: the published recipe's input when its files "
                        "are cached, else seed 0)")
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


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one `warning:` line each, without the source line Python adds."""
    warning = message if isinstance(message, Warning) else Warning(message)
    print(f"warning: {errors.one_line(warning)}", file=sys.stderr)


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
            errors.OutputPathError, errors.VerifyError) as err:
        print(f"error: {errors.one_line(err)}", file=sys.stderr)
        return 1
    except SystemExit:
        raise
    except Exception as err:  # a bug, or an input no check foresaw: still one line, no traceback
        logging.getLogger("convert_parity").info("unexpected error", exc_info=True)
        print(f"error: unexpected {type(err).__name__}: {errors.one_line(err)} (run with -v for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous_showwarning
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
