"""The variant registry: every checkpoint the project converts, as data.

Each family module declares its variants with `Variant(...)`; `all_variants()`
collects them in a fixed order (family order below, then declaration order), so
test ids and their order are the same on every xdist worker.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

FAMILY_MODULES = ("timesformer", "xclip", "vivit", "vit_msn", "perceiver")


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Source:
    """Where the real checkpoint lives and how its weights are stored in it."""

    url: str
    filename: str
    container: str  # "torch", "flax_msgpack" or "haiku_pickle"
    container_keys: tuple[str, ...] = ()  # tried in order, e.g. ("model_state",)
    prefix: str = ""  # stripped from every key, e.g. "model."
    sha256: str | None = None  # recorded when known; verified after download


@dataclass(frozen=True)
class InputRecipe:
    """How the original conversion built its reference input."""

    description: str
    files: tuple[str, ...] = ()  # hub files as "hf://datasets/<repo>/<file>" or URLs
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", _frozen(self.params))


@dataclass(frozen=True)
class PublishedValues:
    """Values the original conversion published for the real checkpoint."""

    output: str  # what is compared, e.g. "logits[0, :3]"
    values: tuple[float, ...] | None  # None: nothing was published
    atol: float
    note: str = ""  # placeholder, stale, copy-paste suspicion, where it came from


@dataclass(frozen=True)
class Variant:
    name: str  # the hub name without the organisation, used in test ids
    family: str
    hub_id: str
    config: Mapping[str, Any]  # the real published architecture numbers
    source: Source
    inputs: InputRecipe
    published: tuple[PublishedValues, ...] = ()
    notes: str = ""

    def __post_init__(self):
        object.__setattr__(self, "config", _frozen(self.config))

    @property
    def has_published_values(self) -> bool:
        return any(p.values is not None for p in self.published)


@dataclass(frozen=True)
class KnownDivergence:
    """A variant whose HF class computes something else than the original, whatever the
    config says: converted weights are right, outputs are not the original's. Declared
    per family as KNOWN_DIVERGENCES (variant name -> KnownDivergence); read by `list`,
    `convert` (a warning) and `matrix`, and as the reason of the matrix's strict xfail."""

    cause: str  # one line: what the HF class hard-codes, e.g. "HF decoder hard-codes the query residual"
    detail: str  # the two computations side by side, and where that was read
    tiny_max_abs: float  # the matrix's tiny model, as converted vs the original (checked by a test)
    full_size_max_abs: float  # full-size random weights, as converted vs the original
    measured_by: str  # the command or test the numbers come from

    def summary(self) -> str:
        return (f"{self.cause} (max abs logit difference {self.full_size_max_abs:.2g} at full size with "
                f"random weights, {self.tiny_max_abs:.3g} tiny)")

    def describe(self) -> str:
        return f"{self.summary()}; {self.detail}; measured by {self.measured_by}"


class UnknownVariantError(KeyError):
    def __init__(self, name: str, candidates: list[str]):
        self.name, self.candidates = name, candidates
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        super().__init__(f"unknown variant {name!r}{hint} (`convert-parity list` shows all {len(candidates)})")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def family_module(family: str):
    return importlib.import_module(f"converters.{family}")


def all_variants() -> tuple[Variant, ...]:
    return tuple(v for fam in FAMILY_MODULES for v in family_module(fam).VARIANTS)


def convertible_variants() -> tuple[Variant, ...]:
    """Variants whose family already has a converter (the rest are data only)."""
    return tuple(v for v in all_variants() if hasattr(family_module(v.family), "convert"))


def known_divergence(variant: Variant) -> KnownDivergence | None:
    return getattr(family_module(variant.family), "KNOWN_DIVERGENCES", {}).get(variant.name)


def hub_config_values(variant: Variant) -> dict[str, Any]:
    """The config values of the published hub model where the conversion writes the
    original's instead (`convert --hub-config` writes these): the family's HUB_CONFIG."""
    return dict(getattr(family_module(variant.family), "HUB_CONFIG", {}))


def get_variant(name: str) -> Variant:
    variants = all_variants()
    for v in variants:
        if name in (v.name, v.hub_id):
            return v
    raise UnknownVariantError(name, [v.name for v in variants])
