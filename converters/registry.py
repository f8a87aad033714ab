"""The variant registry: every checkpoint the project converts, as data.

Each family module exports its `Family` record (converters/family.py) as FAMILY;
`all_variants()` collects their variants in a fixed order (family order below, then
declaration order), so test ids and their order are the same on every xdist worker.
"""
from __future__ import annotations

import difflib
from typing import Any

from . import perceiver, timesformer, vit_msn, vivit, xclip
from .family import Family, KnownDivergence, Variant

_MODULES = (timesformer, xclip, vivit, vit_msn, perceiver)  # the family order


def families() -> tuple[Family, ...]:
    """Read from the modules on each call, so a test can replace one module's FAMILY."""
    return tuple(module.FAMILY for module in _MODULES)


FAMILY_NAMES = tuple(f.name for f in families())


class UnknownVariantError(KeyError):
    def __init__(self, name: str, candidates: list[str]):
        self.name, self.candidates = name, candidates
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        super().__init__(f"unknown variant {name!r}{hint} (`convert-parity list` shows all {len(candidates)})")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def family(name: str) -> Family:
    return next(f for f in families() if f.name == name)


def all_variants() -> tuple[Variant, ...]:
    return tuple(v for f in families() for v in f.variants)


def representatives() -> tuple[Variant, ...]:
    """The first variant of each family and HF model class (Perceiver has six classes): what
    a plain `pytest -n auto` checks (the harness's quick profile); CI checks every variant."""
    seen, chosen = set(), []
    for v in all_variants():
        if (key := (v.family, family(v.family).model_class(v.config))) not in seen:
            seen.add(key)
            chosen.append(v)
    return tuple(chosen)


def known_divergence(variant: Variant) -> KnownDivergence | None:
    return family(variant.family).known_divergences.get(variant.name)


def hub_config_values(variant: Variant) -> dict[str, Any]:
    """The config values of the published hub model where the conversion writes the
    original's instead (`convert --hub-config` writes these): the family's hub_config."""
    return dict(family(variant.family).hub_config)


def get_variant(name: str) -> Variant:
    variants = all_variants()
    for v in variants:
        if name in (v.name, v.hub_id):
            return v
    raise UnknownVariantError(name, [v.name for v in variants])
