"""Comparing outputs: element-wise tolerance, the largest difference and where, and
non-finite values counted as mismatches. Every parity, golden, round-trip and report
check, and `convert --verify`, measures through here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class Diff:
    key: str
    max_abs: float  # over the values finite on both sides; inf when any value is not
    max_rel: float
    index: tuple[int, ...]  # where the absolute difference is largest (the first non-finite value, if any)
    mismatched: int  # out of tolerance, non-finite values included
    total: int
    atol: float
    rtol: float
    nonfinite: int = 0  # elements where either side is NaN or +-inf: always a mismatch
    nonfinite_what: str = ""  # e.g. "NaN in actual", for the first of them
    scale_rtol: float = 0.0  # relative to the expected tensor's largest magnitude (tolerances.py)

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def describe(self) -> str:
        scale = f", scale_rtol={self.scale_rtol:g}" if self.scale_rtol else ""
        head = (f"{self.key}: {self.mismatched}/{self.total} elements out of tolerance "
                f"(atol={self.atol:g}, rtol={self.rtol:g}{scale}); ")
        if self.nonfinite:
            return head + f"{self.nonfinite} non-finite values ({self.nonfinite_what} at index {self.index})"
        return head + f"max abs diff {self.max_abs:.3g} at index {self.index}, max rel diff {self.max_rel:.3g}"


def _nonfinite_kind(expected: torch.Tensor, actual: torch.Tensor, flat: int) -> str:
    for side, t in (("expected", expected), ("actual", actual)):
        v = float(t.reshape(-1)[flat])
        if v != v:
            return f"NaN in {side}"
        if v in (float("inf"), float("-inf")):
            return f"{'+' if v > 0 else '-'}inf in {side}"
    return ""


def compare(key: str, expected, actual, atol: float, rtol: float, scale_rtol: float = 0.0) -> Diff:
    """Element-wise `|a - e| <= atol + rtol * |e| + scale_rtol * max|e|`. A NaN or infinite
    value on either side is a mismatch (NaN fails every comparison, so `err > tol` alone
    would pass it), and the message counts them and names the first."""
    e = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    a = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    if e.shape != a.shape:
        raise AssertionError(f"{key}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nonfinite = ~(torch.isfinite(e) & torch.isfinite(a))
    err = torch.where(nonfinite, 0.0, (a - e).abs())
    rel = err / e.abs().clamp_min(1e-12)
    finite_e = torch.where(nonfinite, 0.0, e.abs())
    scale = float(finite_e.max()) if scale_rtol and e.numel() else 0.0
    bad = nonfinite | (err > atol + rtol * e.abs() + scale_rtol * scale)
    n_nonfinite = int(nonfinite.sum())
    flat = int(nonfinite.reshape(-1).nonzero()[0]) if n_nonfinite else int(err.argmax()) if err.numel() else 0
    index = tuple(int(i) for i in np.unravel_index(flat, tuple(e.shape))) if e.dim() else ()
    max_abs = float("inf") if n_nonfinite else float(err.max()) if err.numel() else 0.0
    max_rel = float("inf") if n_nonfinite else float(rel.max()) if rel.numel() else 0.0
    return Diff(key, max_abs, max_rel, index, int(bad.sum()), e.numel(), atol, rtol,
                n_nonfinite, _nonfinite_kind(e, a, flat) if n_nonfinite else "", scale_rtol)


def compare_outputs(expected: Mapping, actual: Mapping, atol: float, rtol: float,
                    scale_rtol: float = 0.0) -> list[Diff]:
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise AssertionError(f"outputs missing on the HF side: {missing}")
    return [compare(k, expected[k], actual[k], atol, rtol, scale_rtol) for k in expected]


def assert_parity(diffs: list[Diff], context: str = "") -> None:
    failed = [d for d in diffs if not d.ok]
    if failed:
        head = f"{context}: " if context else ""
        raise AssertionError(head + "; ".join(d.describe() for d in failed))


class MeasuredChanged(Exception):
    """A number quoted in an xfail's reason no longer holds. Not an AssertionError: a
    strict `xfail(raises=AssertionError)` then fails instead of counting it as expected."""


def _significant_digits(quoted: str) -> int:
    mantissa = quoted.lower().split("e")[0].lstrip("+-").replace(".", "").lstrip("0")
    return max(len(mantissa), 1)


def assert_measured(what: str, value, quoted) -> None:
    """`value` is the `quoted` number at the precision it is quoted with ("0.896": three
    significant digits, "4.0": two), or equal to a quoted count or shape, so the numbers
    an xfail's reason quotes are measured on every run."""
    same = (float(f"{value:.{_significant_digits(quoted)}g}") == float(quoted) if isinstance(quoted, str)
            else value == quoted)
    if not same:
        shown = f"{value:.4g}" if isinstance(quoted, str) else repr(value)
        raise MeasuredChanged(f"{what}: measured {shown}, the reason quotes {quoted}; update the reason")
