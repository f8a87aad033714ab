"""Recorded key lists: the missing and unexpected keys `from_pretrained` reports on a
converted output, per transformers line (`fixtures/expected_keys/<family>.json`).

A release that records nothing of its own is compared with the nearest recorded line:
the newest line at or below it (else the oldest above). A release that changes nothing
needs no new entry; one whose keys really changed still fails against its neighbour.
"""
from __future__ import annotations

from typing import Mapping


class NearestKeyLine(UserWarning):
    """No key lists recorded for the installed line: compared with the nearest recorded one.

    Defined in an importable module: xdist re-creates warning classes on the controller."""


def line_key(line: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in line.split("."))


def nearest_line(recorded: Mapping, line: str) -> str | None:
    """The recorded line to compare `line` ("5.24") with: itself if recorded, else the
    newest recorded line below it, else the oldest above; None if nothing is recorded."""
    lines = sorted((k for k in recorded if not k.startswith("_")), key=line_key)
    if line in lines:
        return line
    below = [k for k in lines if line_key(k) < line_key(line)]
    return below[-1] if below else (lines[0] if lines else None)
