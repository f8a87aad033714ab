"""convert-parity's own fixtures (the harness's are in parity_harness.plugin) and the
parametrization by the original's further containers."""
from __future__ import annotations

import os

import pytest


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
    """Run a small test file in a fresh pytest with the harness plugin (through the root
    conftest.py, which loads it unless its entry point does):
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
        return subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
                              check=False)

    return run


def pytest_generate_tests(metafunc):
    """`variant_container`: each further container layout the family's original is seen in."""
    if "variant_container" in metafunc.fixturenames:
        from converters.registry import all_variants
        from fixtures.harness import original
        from parity_harness.variants import param

        metafunc.parametrize("variant_container", [
            param((v, c), id=f"{v.name}-{c}")
            for v in all_variants() for c in original(v.family).containers[1:]])
