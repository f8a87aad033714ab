"""The parity harness as a pytest plugin (entry point `pytest11: convert_parity`).

Each concern in its own module: options.py (command line and ini), markers.py (registered
for --strict-markers; `slow` deselected unless --run-slow), profiles.py (hypothesis
profiles and the shared seed), environment.py (one compute thread, offline), workers.py (xdist workers skip the
interpreter's finalization), variants.py
(the variant parametrization), quick.py (the quick profile's representatives), results.py (the results file, JSON and JUnit XML) and
golden.py (the `golden` fixture). A project configures it in its ini:

    [tool.pytest.ini_options]
    parity_variants = "mypackage.registry:variants"   # objects with .name and .family
    parity_golden_dir = "tests/golden"
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from . import environment, markers, options, profiles, quick, results, variants, workers

# Before any test module (or conftest) imports torch or jax: their thread pools read it once.
environment.one_compute_thread()
profiles.register_and_load()


def pytest_addoption(parser):
    options.add(parser)


def pytest_configure(config):
    markers.register(config)
    environment.offline(config.getoption("--real-checkpoints"))
    profiles.share_seed(config)
    if hasattr(config, "workerinput"):
        workers.install()
    else:  # the controller alone writes the results: the workers report to it
        config.pluginmanager.register(
            results.Writer(config.getoption("--results"), config.getoption("--results-junit")), "parity-results")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    workers.teardown_done()  # the last unconfigure hook: only pytest's cleanup stack is left


def pytest_report_header(config):
    return [line for line in (profiles.replay_hint(config), quick.header(config)) if line]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus != 0 and (hint := profiles.replay_hint(config)):
        terminalreporter.write_line(hint)
    if line := quick.header(config):
        terminalreporter.write_line(line)


def pytest_generate_tests(metafunc):
    variants.parametrize(metafunc)


def pytest_collection_modifyitems(config, items):
    markers.deselect_slow(config, items)
    quick.deselect(config, items)
    results.label(items)


@pytest.fixture(scope="session")
def allow_downloads(request) -> bool:
    return request.config.getoption("--real-checkpoints")


@pytest.fixture
def record_diffs(request):
    """Call with a list of parity_harness.compare.Diff to put them in the results file."""
    return results.recorder(request.node)


@pytest.fixture
def record_keys(request):
    """Call with from_pretrained's loading info and the key-list line it was compared with."""
    return results.keys_recorder(request.node)


def _command(config) -> str:
    """The command line that ran this session (on an xdist worker, the controller's)."""
    argv = config.workerinput["mainargv"][1:] if hasattr(config, "workerinput") else config.invocation_params.args
    return shlex.join(["pytest", *argv])


@pytest.fixture
def golden(request, record_diffs):
    """`golden.check(name, outputs, spec=, seed=, tolerance=)`: the outputs against the
    stored golden (see parity_harness.golden.Golden)."""
    from .golden import Golden

    config = request.config
    return Golden(Path(config.rootpath, config.getini("parity_golden_dir")), config.getoption("--update-golden"),
                  _command(config), record_diffs)
