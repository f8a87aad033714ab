"""Conversions as data: a table of rules, applied once.

A rule maps a source pattern to a target pattern, and may name the layout op
(converters/reshape.py `Op`) its tensor goes through. `{name}` in a pattern stands
for one dotted component (`[^.]+`); the same names are substituted into the
target. A target of `None` drops the key on purpose; a tuple of targets takes the
op's several outputs (a fused q/k/v split into three). Every source key must match
exactly one rule, and no two keys may land on the same target, so a table can
neither silently skip a weight nor overwrite one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping

from .reshape import Op

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    source: str
    target: str | tuple[str, ...] | None
    op: Op | None = None

    def __post_init__(self):
        if self.target is None and self.op is not None:
            raise ValueError(f"rule {self.source!r} drops its key: no op to apply")
        if self.target is not None and len(self.targets) != (1 if self.op is None else self.op.outputs):
            raise ValueError(f"rule {self.source!r}: {len(self.targets)} target(s) for op {self.op!r}")

    @property
    def targets(self) -> tuple[str, ...]:
        return () if self.target is None else (self.target,) if isinstance(self.target, str) else self.target

    @cached_property
    def regex(self) -> re.Pattern:
        parts, pos = [], 0
        for m in _PLACEHOLDER.finditer(self.source):
            parts.append(re.escape(self.source[pos : m.start()]))
            parts.append(f"(?P<{m.group(1)}>[^.]+)")
            pos = m.end()
        parts.append(re.escape(self.source[pos:]))
        return re.compile("".join(parts))

    def apply(self, key: str) -> tuple[bool, tuple[str, ...]]:
        """(whether the rule matches the key, its target names; none when dropped)."""
        m = self.regex.fullmatch(key)
        if m is None:
            return False, ()
        return True, tuple(t.format(**m.groupdict()) for t in self.targets)


class RenameError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def rules(*entries: tuple) -> tuple[Rule, ...]:
    """Rules from (source, target) or (source, target(s), op) tuples."""
    return tuple(Rule(*entry) for entry in entries)


def prefixed(prefix_from: str, prefix_to: str, entries: Iterable[tuple]):
    """Entries with a common prefix on both sides, e.g. a transformer block."""
    def target(t):
        return None if t is None else prefix_to + t if isinstance(t, str) else tuple(prefix_to + x for x in t)
    return tuple((prefix_from + s, target(t), *rest) for s, t, *rest in entries)


def match_rules(keys: Iterable[str], table: Iterable[Rule]) -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """Every key's one rule and target names. Raises on gaps, ambiguity and collisions."""
    table = tuple(table)
    matched: dict[str, tuple[Rule, tuple[str, ...]]] = {}
    unmatched, ambiguous = [], []
    for key in keys:
        hits = [(r, new) for r in table for ok, new in [r.apply(key)] if ok]
        if not hits:
            unmatched.append(key)
        elif len(hits) > 1:
            ambiguous.append(f"{key} <- {[r.source for r, _ in hits]}")
        else:
            matched[key] = hits[0]
    if unmatched or ambiguous:
        msg = []
        if unmatched:
            msg.append(f"{len(unmatched)} key(s) match no rename rule: {sorted(unmatched)[:20]}")
        if ambiguous:
            msg.append(f"{len(ambiguous)} key(s) match several rules: {ambiguous[:10]}")
        raise RenameError("; ".join(msg))
    seen: dict[str, str] = {}
    for key, (_, targets) in matched.items():
        for new in targets:
            if new in seen:
                raise RenameError(f"rename is not injective: {seen[new]!r} and {key!r} both map to {new!r}")
            seen[new] = key
    return matched


def rename_keys(keys: Iterable[str], table: Iterable[Rule]) -> dict[str, tuple[str, ...]]:
    """Map every key to its new name(s) (none: dropped). Raises on gaps and collisions."""
    return {key: targets for key, (_, targets) in match_rules(keys, table).items()}


def apply_rules(state_dict: Mapping[str, object], table: Iterable[Rule]) -> dict[str, object]:
    """The table applied once: each kept tensor renamed and, where its rule names an op, re-laid out."""
    out: dict[str, object] = {}
    for key, (rule, targets) in match_rules(state_dict.keys(), table).items():
        if not targets:
            continue
        value = state_dict[key] if rule.op is None else rule.op(state_dict[key])
        out.update(zip(targets, (value,) if rule.op is None or rule.op.outputs == 1 else value))
    return out


def invert_rules(converted: Mapping[str, object], table: Iterable[Rule], like: Mapping[str, object]) -> dict[str, object]:
    """The original state dict back from `apply_rules`' output, given the original's keys,
    shapes and dtypes (`like`, meta tensors will do); dropped keys stay dropped. Each op's
    inverse undoes it, so this is the identity on what the table keeps."""
    out: dict[str, object] = {}
    for key, (rule, targets) in match_rules(like.keys(), table).items():
        if not targets:
            continue
        values = tuple(converted[t] for t in targets)
        if rule.op is None:
            out[key] = values[0]
        else:
            out[key] = rule.op.inverse(values[0] if rule.op.outputs == 1 else values, like[key])
    return out
