"""The markers the harness gives meaning to, registered so `--strict-markers` passes."""
from __future__ import annotations

MARKERS = {
    "parity": "compares the converted HF model against the original-framework reference; "
              "its outcome and measured differences go to the results file",
    "real_checkpoint": "needs the real published checkpoint (downloaded or cached); skipped with the reason "
                       "when it is not available; recorded in the results file",
    "slow": "full-size end-to-end or subprocess checks of several seconds each; deselected unless --run-slow "
            "(CI and nightly pass it)",
}
RECORDED = ("parity", "real_checkpoint")  # the markers whose tests the results file lists


def register(config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def deselect_slow(config, items) -> None:
    """Tests marked slow are deselected unless --run-slow: `pytest -n auto` stays quick."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
