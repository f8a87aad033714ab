"""xdist workers skip the interpreter's finalization, and only that.

Measured on this machine (parity_tools-like script: torch, jax, flax, haiku and
transformers imported, a jit op and a small model run): the exit after the last line
cost 2.7-3.0 s CPU and 9 s wall under load (the module teardown and garbage collection
of torch, JAX and XLA), 0.2-0.3 s with an exit handler that calls os._exit. Every
worker pays it at the end of the run, while the controller waits.

What still runs: the worker's whole pytest teardown (every fixture's, reported before
the worker's last report; every pytest_unconfigure hook; pytest's cleanup stack) and
every exit handler registered after this one (temporary directories). The handler
leaves only when that teardown reached its end (`teardown_done`) and no exception is
propagating (`sys.last_value`, set when one ends the process): a teardown that fails
still ends the process the normal way, with its traceback and status."""
from __future__ import annotations

import atexit
import os
import sys

_state = {"teardown_done": False}


def _leave() -> None:
    if _state["teardown_done"] and not hasattr(sys, "last_value"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def install() -> None:
    """On an xdist worker, as early as the plugin is imported: exit handlers run last-in,
    first-out, so this one runs after all that are registered later."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        atexit.register(_leave)


def teardown_done() -> None:
    _state["teardown_done"] = True
