"""The process environment every parity run needs: one compute thread, no network.

`one_compute_thread()` runs when the plugin is imported, before anything imports torch
or jax: the thread count changes the order of float reductions, and with it the last
bits of every output (measured: serial runs with 2 threads differed from -n auto runs
by up to 1e-6 on 138 outputs); on 2 cores, 2 workers x 2 threads also ran 1.7x slower.
"""
from __future__ import annotations

import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's OpenMP pool
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"  # XLA's Eigen pool


def one_compute_thread() -> None:
    for var in THREAD_VARIABLES:
        os.environ[var] = "1"
    os.environ["XLA_FLAGS"] = XLA_ONE_THREAD


def offline(allow_downloads: bool) -> None:
    """No test touches the network unless downloads are allowed: hub look-ups and our
    downloads use caches only (set before anything imports huggingface_hub, which reads
    HF_HUB_OFFLINE once)."""
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["CONVERT_PARITY_OFFLINE"] = "1"
