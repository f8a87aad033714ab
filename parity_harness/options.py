"""Command-line and ini options of the harness."""
from __future__ import annotations

import os


def add(parser) -> None:
    group = parser.getgroup("convert-parity")
    group.addoption("--update-golden", action="store_true",
                    help="rewrite the golden files from the current outputs instead of comparing")
    group.addoption("--real-checkpoints", action="store_true",
                    help="allow the real-checkpoint tier to download checkpoints (default: use caches only)")
    group.addoption("--run-slow", action="store_true", default=os.environ.get("CONVERT_PARITY_RUN_SLOW") == "1",
                    help="also run the tests marked slow (full-size end to end, subprocess self-tests); "
                         "CI and the nightly run them (or set CONVERT_PARITY_RUN_SLOW=1)")
    group.addoption("--all-variants", action="store_true",
                    default=os.environ.get("CONVERT_PARITY_ALL_VARIANTS") == "1",
                    help="check every variant, not only the quick profile's representatives (implied by --run-slow, "
                         "-k and test ids; or set CONVERT_PARITY_ALL_VARIANTS=1)")
    group.addoption("--results", default=os.environ.get("CONVERT_PARITY_RESULTS", "results/parity-results.json"),
                    help="where the parity outcomes are written as JSON (default: %(default)s)")
    group.addoption("--results-junit", default=os.environ.get("CONVERT_PARITY_RESULTS_JUNIT"), metavar="PATH",
                    help="also write the parity outcomes as JUnit XML, one testcase per check with each "
                         "output's measured differences as properties")
    parser.addini("parity_variants", "module:callable returning the variants to test (objects with .name and "
                  ".family); parametrizes `variant` and `<family>_variant`", default="")
    parser.addini("parity_all_variants", "module:callable returning every variant, also those without a "
                  "converter; parametrizes `any_variant` (default: parity_variants)", default="")
    parser.addini("parity_quick_variants", "module:callable returning the variants (or names) a plain run "
                  "checks; the others' per-variant checks need --all-variants, --run-slow or -k (default: all)",
                  default="")
    parser.addini("parity_golden_dir", "directory of the golden files, relative to the rootdir", default="golden")
