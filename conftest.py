"""Options, markers, hypothesis profiles and the variant parametrization."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Profiles: dev for quick local runs, ci derandomized (same examples on every
# worker and every run), nightly for many examples. Chosen by --hypothesis-profile
# (hypothesis' own option) or CONVERT_PARITY_HYPOTHESIS; CI=true selects ci.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("CONVERT_PARITY_HYPOTHESIS") or ("ci" if os.environ.get("CI") else "dev"))

# One compute thread per test process (torch's OpenMP pool, XLA's Eigen pool), serial or
# under xdist: the thread count changes the order of float reductions, and with it the
# last bits of every output (measured: serial runs with 2 threads differed from -n auto
# runs by up to 1e-6 on 138 outputs); on 2 cores, 2 workers x 2 threads also ran 1.7x
# slower. Set before anything imports torch or jax (conftest loads before test modules).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def pytest_addoption(parser):
    group = parser.getgroup("convert-parity")
    group.addoption("--update-golden", action="store_true",
                    help="rewrite fixtures/golden/*.json from the current HF outputs instead of comparing")
    group.addoption("--real-checkpoints", action="store_true",
                    help="allow the real-checkpoint tier to download checkpoints (default: use caches only)")
    group.addoption("--run-slow", action="store_true", default=os.environ.get("CONVERT_PARITY_RUN_SLOW") == "1",
                    help="also run the tests marked slow (full-size end to end, subprocess self-tests); "
                         "CI and the nightly run them (or set CONVERT_PARITY_RUN_SLOW=1)")
    group.addoption("--results", default=os.environ.get("CONVERT_PARITY_RESULTS", "results/parity-results.json"),
                    help="where the parity outcomes are written as JSON (default: %(default)s)")


def pytest_configure(config):
    """No test touches the network unless the real-checkpoint tier may download:
    hub look-ups and our downloads use caches only (set before anything imports
    huggingface_hub, which reads HF_HUB_OFFLINE once)."""
    if not config.getoption("--real-checkpoints"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["CONVERT_PARITY_OFFLINE"] = "1"
    # Randomized profiles get one seed per run, chosen by the controller and handed to
    # xdist workers through the environment (they re-parse the command line, not the
    # controller's options), then printed, so that a failure replays with
    # --hypothesis-seed. Derandomized profiles (ci) are the same on every run.
    if not settings.default.derandomize and config.getoption("hypothesis_seed", None) is None:
        from hypothesis import core

        seed = int(os.environ.setdefault("CONVERT_PARITY_HYPOTHESIS_SEED", str(int.from_bytes(os.urandom(4), "little"))))
        config.option.hypothesis_seed = core.global_force_seed = seed


def _replay_hint(config) -> str | None:
    seed = config.getoption("hypothesis_seed", None)
    if settings.default.derandomize:
        return f"hypothesis profile {settings.get_current_profile_name()!r} is derandomized: a rerun replays it"
    return f"hypothesis seed {seed}: replay a failure with --hypothesis-seed={seed}" if seed is not None else None


def pytest_report_header(config):
    return _replay_hint(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus != 0 and (hint := _replay_hint(config)):
        terminalreporter.write_line(hint)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache used offline; returns `put(hf_url, data)` that
    stores a file in it exactly where hf_hub_download looks (refs/main -> snapshot)."""
    import huggingface_hub.constants as hc

    from converters.downloads import parse_hub_url

    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(root))  # read once at import
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    revision = "0123456789abcdef0123456789abcdef01234567"

    def put(url: str, data: bytes) -> None:
        repo_type, repo_id, _, filename = parse_hub_url(url)
        repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / revision / filename).write_bytes(data)

    return put


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    """Run the CLI against tiny checkpoints: the variant's config is the tiny one, the
    download cache is a fresh directory, nothing is fetched."""
    import warnings

    from converters import cli, pipeline
    from fixtures import harness

    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")

    def run(capsys, row, *argv):  # row: a fixtures.catalogue.Container
        monkeypatch.setattr(pipeline, "spec_of", lambda variant: dict(harness.case(row.variant).spec))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            code = cli.main(["convert", row.variant, *argv])
        err = capsys.readouterr().err  # the CLI prints each warning as one `warning:` line
        return code, err, [line.removeprefix("warning: ") for line in err.splitlines() if line.startswith("warning: ")]

    return run


@pytest.fixture
def stand_in_suite(tmp_path):
    """Run a small test file in a fresh pytest with this conftest as its plugin:
    `run(source, *pytest_args, env=None)` -> CompletedProcess (text output); an env
    value of None removes the variable."""
    import subprocess
    import sys
    from pathlib import Path

    def run(source: str, *args: str, env: dict | None = None):
        suite = tmp_path / "stand_in" / "test_stand_in.py"
        suite.parent.mkdir(exist_ok=True)
        suite.write_text(source)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "-p", "no:benchmark",
               str(suite), *args]
        return subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
                              check=False)

    return run


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are deselected unless --run-slow: `pytest -n auto` stays quick."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def allow_downloads(request) -> bool:
    return request.config.getoption("--real-checkpoints")


def pytest_generate_tests(metafunc):
    """Parametrize by variant, with the variant name as the id, so `-k k600` or
    `-k hr` select what a user expects; every check of one variant shares an xdist
    group. Fixtures: `variant` (every variant with a converter), `any_variant` (all
    39), `<family>_variant` (one family's), `variant_container` (each further
    container layout the family's original is seen in)."""
    from converters.registry import FAMILY_MODULES, all_variants, convertible_variants

    def param(v, *extra, id=None):
        return pytest.param(v, *extra, id=id or v.name, marks=pytest.mark.xdist_group(v.name))

    names = set(metafunc.fixturenames)
    if "variant" in names:
        metafunc.parametrize("variant", [param(v) for v in convertible_variants()])
    if "any_variant" in names:
        metafunc.parametrize("any_variant", [param(v) for v in all_variants()])
    for family in FAMILY_MODULES:
        if f"{family}_variant" in names:
            metafunc.parametrize(f"{family}_variant",
                                 [param(v) for v in convertible_variants() if v.family == family])
    if "variant_container" in names:
        from fixtures.harness import adapter

        metafunc.parametrize("variant_container", [
            pytest.param((v, c), id=f"{v.name}-{c}", marks=pytest.mark.xdist_group(v.name))
            for v in convertible_variants() for c in adapter(v.family).containers[1:]])


# ---- results file -------------------------------------------------------------------
# Parity checks attach their measured differences to the test's user_properties
# (record_diffs); xdist ships those to the controller, which alone collects every
# report and writes one results file at the end, so workers never race on it.

_RESULTS: list[dict] = []


@pytest.fixture
def record_diffs(request):
    """Call with a list of parity_harness.compare.Diff to put them in the results file."""
    def record(diffs):
        for d in diffs:
            finite = d.nonfinite == 0  # JSON has no inf: a non-finite output is recorded as None and counted
            request.node.user_properties.append(("parity", {
                "output": d.key, "max_abs": d.max_abs if finite else None, "max_rel": d.max_rel if finite else None,
                "index": list(d.index), "atol": d.atol, "rtol": d.rtol, "mismatched": d.mismatched,
                "total": d.total, "nonfinite": d.nonfinite}))
    return record


@pytest.fixture
def record_keys(request):
    """Call with from_pretrained's loading info and the recorded line it was compared with,
    to put the key lists in the results file (upgrade-check reports changed key lists)."""
    def record(info, compared_with: str):
        request.node.user_properties.append(("keys", {
            "missing": sorted(info.get("missing_keys", [])), "unexpected": sorted(info.get("unexpected_keys", [])),
            "mismatched": sorted(str(k) for k in info.get("mismatched_keys", [])), "compared_with": compared_with}))
    return record


def _failure_message(report) -> str | None:
    """The first line of a failure's message (an exception from from_pretrained reads
    differently from a failed assertion), for the results file."""
    if not report.failed:
        return None
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)  # a strict XPASS is a plain string
    return (text.splitlines() or [""])[0][:300]


def _status(report) -> str:
    if report.when == "setup" and report.failed:
        return "error"
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    return report.outcome


def pytest_runtest_logreport(report):
    if "parity" not in report.keywords and "real_checkpoint" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):  # skipped, or an error
        name = report.nodeid.split("::")[-1].split("@")[0]
        check, _, variant = name.partition("[")
        row = {"variant": variant.rstrip("]"), "check": check, "status": _status(report),
               "duration": round(report.duration, 4),
               "outputs": [v for k, v in report.user_properties if k == "parity"]}
        keys = [v for k, v in report.user_properties if k == "keys"]
        if keys:
            row["keys"] = keys[-1]
        if message := _failure_message(report):
            row["message"] = message
        _RESULTS.append(row)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput") or not _RESULTS:
        return  # xdist workers report to the controller; nothing ran, nothing to write
    from parity_harness.report import write_results

    write_results(session.config.getoption("--results"), _RESULTS)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """An xdist worker has sent its last report (workerfinished) by now; what is left is
    the interpreter's teardown of torch, JAX and XLA, 1.5-3 s per worker that the
    controller waits for. Run the exit handlers (temporary directories) and leave."""
    if hasattr(config, "workerinput"):
        import atexit
        import sys

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
