"""Fuzzing the torch loader: mutations of a good tiny file of each torch container
(bytes flipped, cut, repeated) must each end in a loaded state dict or one
CheckpointError, never another exception, within a memory and time bound.

The peak is measured per example: Linux resets a process's peak RSS (VmHWM) when 5 is
written to /proc/self/clear_refs.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from converters import pipeline
from converters.errors import CheckpointError
from converters.registry import get_variant
from parity_fixtures import harness

TORCH_VARIANTS = ["timesformer-base-finetuned-k400", "vit-msn-small"]  # the model_state and target_encoder files
MEMORY_SLACK = 64 << 20  # interpreter noise and torch's allocator caches
TIME_BOUND_S = 30  # far above a tiny file's load; catches only unbounded work


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("repeat"), st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 4096))),
)


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "flip":
        out = bytearray(data)
        for where, mask in arg:
            out[int(where * len(out))] ^= mask
        return bytes(out)
    if kind == "cut":
        return data[: int(arg * len(data))]
    where, length = arg
    at = int(where * len(data))
    return data[:at] + data[at:at + length] + data[at:]


@pytest.mark.parametrize("variant_name", TORCH_VARIANTS)
def test_mutated_torch_file_loads_or_fails_with_one_error(variant_name, tmp_path):
    variant = get_variant(variant_name)
    good = harness.case(variant_name).checkpoint.read_bytes()
    path = tmp_path / "mutated.pth"
    can_measure = _peak_reset()

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
    @given(mutation=mutations)
    def check(mutation):
        data = mutate(good, mutation)
        path.write_bytes(data)
        before = _status_kib("VmRSS") if can_measure else 0
        _peak_reset()
        t0 = time.monotonic()
        try:
            pipeline.load_original_state_dict(path, variant)
        except (CheckpointError, FileNotFoundError):
            pass
        elapsed = time.monotonic() - t0
        if can_measure:
            grown = (_status_kib("VmHWM") - before) << 10
            assert grown <= MEMORY_SLACK + 10 * len(data), f"{mutation}: peak grew by {grown} bytes"
        assert elapsed < TIME_BOUND_S, f"{mutation}: {elapsed:.1f} s"

    check()
