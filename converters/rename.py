"""Declarative key renaming.

A rule maps a source pattern to a target pattern. `{name}` in a pattern stands
for one dotted component (`[^.]+`); the same names are substituted into the
target. A target of `None` drops the key on purpose. Every source key must match
exactly one rule, and no two keys may land on the same target, so a rename table
can neither silently skip a weight nor overwrite one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    source: str
    target: str | None

    @cached_property
    def regex(self) -> re.Pattern:
        parts, pos = [], 0
        for m in _PLACEHOLDER.finditer(self.source):
            parts.append(re.escape(self.source[pos : m.start()]))
            parts.append(f"(?P<{m.group(1)}>[^.]+)")
            pos = m.end()
        parts.append(re.escape(self.source[pos:]))
        return re.compile("".join(parts))

    def apply(self, key: str) -> tuple[bool, str | None]:
        m = self.regex.fullmatch(key)
        if m is None:
            return False, None
        if self.target is None:
            return True, None
        return True, self.target.format(**m.groupdict())


class RenameError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def rules(*pairs: tuple[str, str | None]) -> tuple[Rule, ...]:
    return tuple(Rule(s, t) for s, t in pairs)


def prefixed(prefix_from: str, prefix_to: str, pairs: Iterable[tuple[str, str | None]]):
    """Pairs with a common prefix on both sides, e.g. a transformer block."""
    return tuple((prefix_from + s, None if t is None else prefix_to + t) for s, t in pairs)


def rename_keys(keys: Iterable[str], table: Iterable[Rule]) -> dict[str, str | None]:
    """Map every key to its new name (None: dropped). Raises on gaps and collisions."""
    table = tuple(table)
    mapping: dict[str, str | None] = {}
    unmatched, ambiguous = [], []
    for key in keys:
        hits = [(r, new) for r in table for ok, new in [r.apply(key)] if ok]
        if not hits:
            unmatched.append(key)
        elif len(hits) > 1:
            ambiguous.append(f"{key} <- {[r.source for r, _ in hits]}")
        else:
            mapping[key] = hits[0][1]
    if unmatched or ambiguous:
        msg = []
        if unmatched:
            msg.append(f"{len(unmatched)} key(s) match no rename rule: {sorted(unmatched)[:20]}")
        if ambiguous:
            msg.append(f"{len(ambiguous)} key(s) match several rules: {ambiguous[:10]}")
        raise RenameError("; ".join(msg))
    seen: dict[str, str] = {}
    for key, new in mapping.items():
        if new is None:
            continue
        if new in seen:
            raise RenameError(f"rename is not injective: {seen[new]!r} and {key!r} both map to {new!r}")
        seen[new] = key
    return mapping


def apply_renames(state_dict: Mapping[str, object], table: Iterable[Rule]) -> dict[str, object]:
    mapping = rename_keys(state_dict.keys(), table)
    return {new: state_dict[old] for old, new in mapping.items() if new is not None}
