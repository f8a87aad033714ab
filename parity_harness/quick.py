"""The quick profile: a plain `pytest -n auto` checks a few representative variants, not all.

Every per-variant check of the other variants is deselected (reported, never skipped)
unless the run asks for them: `--all-variants`, `--run-slow` (CI and the nightly), a `-k`
expression or a test id, so `pytest -n auto -k timesformer` runs every TimeSformer variant.
The project names its representatives in the ini (`parity_quick_variants = module:callable`,
variants or their names); without that key every variant runs."""
from __future__ import annotations

from . import results, variants

_STASH_KEY = "parity_quick_deselected"


def active(config) -> bool:
    if not config.getini("parity_quick_variants"):
        return False
    if config.getoption("--all-variants") or config.getoption("--run-slow") or config.getoption("keyword"):
        return False
    return not any("::" in arg for arg in config.args)  # a test id names what it wants


def representatives(config) -> set[str]:
    return {getattr(v, "name", v) for v in variants.load(config.getini("parity_quick_variants"))()}


def deselect(config, items) -> None:
    if not active(config):
        return
    keep = representatives(config)
    known = {v.name for key in ("parity_variants", "parity_all_variants") for v in variants.variants(config, key)}
    dropped, kept = [], []
    for item in items:
        variant = results.variant_and_case(item)[0] if hasattr(item, "callspec") else None
        (dropped if variant in known and variant not in keep else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def header(config) -> str | None:
    """Printed by the process that reports (the xdist controller does not collect)."""
    if not active(config):
        return None
    names = sorted(representatives(config))
    return (f"quick profile: per-variant checks of {len(names)} representative variants only ({', '.join(names)}); "
            f"--all-variants, --run-slow or -k runs every variant")
