"""The variant parametrization: `variant` (every variant the project tests),
`<family>_variant` (one family's) and `any_variant` (also those without a converter),
each with the variant name as its id, so `-k k600` selects what a user expects.

The project names its variants in the ini (`parity_variants = module:callable`). Every
check of one variant shares an xdist group (`--dist=loadgroup`): the tiny reference, its
checkpoint and the converted model are built once per variant, on one worker."""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import pytest


def load(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise pytest.UsageError(f"expected module:callable, got {spec!r}")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _listed(spec: str) -> tuple:
    return tuple(load(spec)()) if spec else ()


def variants(config, key: str = "parity_variants") -> tuple:
    return _listed(config.getini(key) or config.getini("parity_variants"))


def param(value, id: str | None = None):
    """A variant, or a tuple that starts with one, as a parameter in the variant's xdist group."""
    v = value[0] if isinstance(value, tuple) else value
    return pytest.param(value, id=id or v.name, marks=pytest.mark.xdist_group(v.name))


def parametrize(metafunc) -> None:
    names = set(metafunc.fixturenames)
    wanted = {"variant", "any_variant"} | {n for n in names if n.endswith("_variant")}
    if not names & wanted:
        return
    tested = variants(metafunc.config)
    if "variant" in names:
        metafunc.parametrize("variant", [param(v) for v in tested])
    if "any_variant" in names:
        metafunc.parametrize("any_variant", [param(v) for v in variants(metafunc.config, "parity_all_variants")])
    for family in sorted({v.family for v in tested}):
        if f"{family}_variant" in names:
            metafunc.parametrize(f"{family}_variant", [param(v) for v in tested if v.family == family])


def is_variant(value) -> bool:
    return isinstance(getattr(value, "name", None), str) and isinstance(getattr(value, "family", None), str)
