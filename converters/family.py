"""The records a family module declares: its variants (`Variant` with its `Source`,
`InputRecipe` and `PublishedValues`), its known port differences, and the `Family` itself,
the one interface through which the registry, the pipeline, the CLI and the harness reach
a family (each family module exports one as FAMILY; converters/registry.py lists them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .rename import Rule, apply_rules


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


@dataclass(frozen=True)
class KnownDivergence:
    """A variant whose HF class computes something else than the original, whatever the
    config says: converted weights are right, outputs are not the original's. Declared
    per family in Family.known_divergences (variant name -> KnownDivergence); read by `list`,
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


def _no_warnings(variant: Variant) -> tuple[str, ...]:
    return ()


def _as_saved(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state_dict)


@dataclass(frozen=True)
class Family:
    """One family of original checkpoints and how they become HF models.

    `tables` holds one rule table per HF model class the family converts to (rename.Rule;
    an op on a rule changes the tensor's layout on the way). Converting is the spec's
    table applied once, so nothing else touches a key."""

    name: str
    variants: tuple[Variant, ...]
    tables: Mapping[str, tuple[Rule, ...]]  # HF model class name -> rule table
    hf_config: Callable  # (spec, id2label=None) -> the transformers config
    hf_processor: Callable  # (spec) -> what save_pretrained writes beside the model (or None)
    real_input: Callable  # (variant, files) -> the published values' input
    real_outputs: Callable  # (model, variant, files) -> {output name: tensor}
    # the converted (on-disk) names -> the installed transformers' names, for in-memory load_state_dict
    installed_schema: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = _as_saved
    user_warnings: Callable[[Variant], tuple[str, ...]] = _no_warnings  # port differences `convert` reports
    known_divergences: Mapping[str, KnownDivergence] = field(default_factory=dict)  # variant name -> cause, size
    hub_config: Mapping[str, Any] = field(default_factory=dict)  # what `convert --hub-config` writes instead

    def model_class(self, spec: Mapping) -> str:
        """The HF class a spec converts to: the family's one, or (Perceiver) the spec's `model_class`."""
        return next(iter(self.tables)) if len(self.tables) == 1 else spec["model_class"]

    def table(self, spec: Mapping | None = None) -> tuple[Rule, ...]:
        return self.tables[self.model_class(spec or {})]

    def convert(self, state_dict: Mapping[str, torch.Tensor], spec: Mapping | None = None) -> dict[str, torch.Tensor]:
        """The original state dict (flat, as the loader returns it) -> the HF state dict."""
        return apply_rules(state_dict, self.table(spec))
