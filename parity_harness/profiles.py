"""Hypothesis profiles and the seed that replays a randomized run.

dev for quick local runs, ci derandomized (same examples on every worker and every run),
nightly for many examples. Chosen by --hypothesis-profile (hypothesis' own option) or
CONVERT_PARITY_HYPOTHESIS; CI=true selects ci."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SEED_VARIABLE = "CONVERT_PARITY_HYPOTHESIS_SEED"


def register_and_load() -> None:
    settings.register_profile("dev", max_examples=25, deadline=None)
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("nightly", max_examples=500, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("CONVERT_PARITY_HYPOTHESIS") or ("ci" if os.environ.get("CI") else "dev"))


def share_seed(config) -> None:
    """Randomized profiles get one seed per run, chosen by the controller and handed to
    xdist workers through the environment (they re-parse the command line, not the
    controller's options), then printed, so that a failure replays with
    --hypothesis-seed. Derandomized profiles (ci) are the same on every run."""
    if not settings.default.derandomize and config.getoption("hypothesis_seed", None) is None:
        from hypothesis import core

        seed = int(os.environ.setdefault(SEED_VARIABLE, str(int.from_bytes(os.urandom(4), "little"))))
        config.option.hypothesis_seed = core.global_force_seed = seed


def replay_hint(config) -> str | None:
    seed = config.getoption("hypothesis_seed", None)
    if settings.default.derandomize:
        return f"hypothesis profile {settings.get_current_profile_name()!r} is derandomized: a rerun replays it"
    return f"hypothesis seed {seed}: replay a failure with --hypothesis-seed={seed}" if seed is not None else None
