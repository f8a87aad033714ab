"""The reliability catalogue's download rows: a checkpoint URL served by a hostile
server on 127.0.0.1, and a poisoned cache entry, through the real command line.

Each must end in one error line, exit code 1, no cache entry a later run would trust
and no output directory. The hub is a refused loopback port, so that label names go
through the real probe and offline fallback without leaving the machine.
"""
from __future__ import annotations

import json
import re

import pytest

from converters import downloads
from converters.registry import get_variant
from parity_fixtures import harness
from parity_tests.loopback import hostile_server, serve_bytes
from parity_tests.test_downloads import ATTACK_ERRORS, TIGHT
from parity_fixtures.catalogue import CONTAINERS, UNREADABLE


@pytest.fixture
def online(tiny_cli, monkeypatch, tmp_path, refused_hub):  # noqa: F811 -- the fixture imported above
    """tiny_cli with downloads allowed (no offline variable) and tight limits."""
    for var in ("CONVERT_PARITY_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for name, value in TIGHT.items():
        monkeypatch.setenv(name, value)
    return tiny_cli


@pytest.fixture
def refused_hub(monkeypatch, tmp_path):
    """The hub endpoint is a closed loopback port with an empty hub cache; the probe's
    calls are recorded and the process's offline state is restored afterwards."""
    import socket

    import huggingface_hub.constants as hc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hc, "ENDPOINT", endpoint)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub sends its own requests to the host it read at import (its URL template),
    # not to the ENDPOINT patched here: it stays offline, so that no code path that does not
    # ask the probe (the X-CLIP tokenizer, for now) sends a request off this machine.
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(downloads, "_PROBES", {})
    calls, real_probe = [], downloads.probe
    monkeypatch.setattr(downloads, "probe", lambda url, timeout: calls.append((url, timeout)) or real_probe(url, timeout))
    return endpoint, calls


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _cache_entries(tmp_path) -> list:
    return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())


@pytest.mark.parametrize("attack", ATTACK_ERRORS)
def test_hostile_download_through_the_cli(attack, online, tmp_path, capsys, monkeypatch):
    row = CONTAINERS["torch-pyth"]
    extra, pattern = ATTACK_ERRORS[attack]
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    with hostile_server() as (base, _):
        code, err, _ = online(capsys, row, "--checkpoint", f"{base}/{attack}", "--out", str(tmp_path / "work" / "hf"))
    assert code == 1, err
    assert re.search(pattern, _one_error(err)), err
    assert _cache_entries(tmp_path) == [], "a refused download left a cache entry"
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("container", CONTAINERS)
def test_download_of_another_container_is_refused(container, online, tmp_path, capsys):
    """Another original's valid file, served for this variant: refused by its first bytes,
    before it is cached or loaded."""
    row = CONTAINERS[container]
    other = CONTAINERS["flax-msgpack" if row.format != "flax" else "torch-pyth"]
    data = harness.case(other.variant).checkpoint.read_bytes()
    with hostile_server(model=serve_bytes(data)) as (base, _):
        code, err, _ = online(capsys, row, "--checkpoint", f"{base}/model", "--out", str(tmp_path / "hf"))
    assert code == 1, err
    expected = downloads.CONTAINER_MAGIC[get_variant(row.variant).source.container][0]
    assert f"is not {expected}: it starts with" in _one_error(err) and "nothing was cached" in err, err
    assert _cache_entries(tmp_path) == [] and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("container", CONTAINERS)
def test_poisoned_cache_entry_is_removed_and_not_reused(container, online, tmp_path, capsys, monkeypatch):
    """A cache entry with the right first bytes and its sha256 recorded, that does not load
    (a truncated file): the run fails in one line naming the removed copy; the next run
    downloads again, and converts."""
    row = CONTAINERS[container]
    good = harness.case(row.variant).checkpoint
    monkeypatch.setenv("CONVERT_PARITY_DOWNLOAD_MAX_BYTES", str(2 * good.stat().st_size))  # X-CLIP's is 25 MB
    with hostile_server(model=serve_bytes(good.read_bytes())) as (base, _):
        url = f"{base}/model"
        entry = downloads.cache_path_for(url, get_variant(row.variant).source.filename or None)
        entry.parent.mkdir(parents=True)
        entry.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        entry.with_name(entry.name + ".sha256").write_text(f"{downloads.sha256_file(entry)}  {entry.name}\n")
        code, err, _ = online(capsys, row, "--checkpoint", url, "--out", str(tmp_path / "hf"))
        assert code == 1, err
        line = _one_error(err)
        assert UNREADABLE[row.format] in line, err
        assert line.endswith(f"; removed the cached copy {entry}, it will be downloaded again"), err
        assert _cache_entries(tmp_path) == [] and not (tmp_path / "hf").exists()
        code, err, _ = online(capsys, row, "--checkpoint", url, "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert entry.read_bytes() == good.read_bytes()


def test_label_names_with_the_hub_unreachable(online, refused_hub, tmp_path, capsys, caplog):
    """No offline variable, hub unreachable: one short probe, one warning line naming what
    was skipped, LABEL_i in the config and the summary saying so."""
    row = CONTAINERS["torch-pyth"]
    endpoint, calls = refused_hub
    code, err, _ = online(capsys, row, "--checkpoint", str(harness.case(row.variant).checkpoint),
                          "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert calls == [(endpoint, downloads.HUB_PROBE_TIMEOUT)] and downloads.HUB_PROBE_TIMEOUT <= 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # stderr in a real run
    assert len(warnings) == 1 and f"hub unreachable (probe of {endpoint}: ConnectionRefusedError" in warnings[0], err
    assert "label names not available" in warnings[0] and "kinetics400-id2label.json" in warnings[0], err
    assert "label names not available, the config has LABEL_i" in err.splitlines()[-1], err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert set(config["id2label"].values()) == {f"LABEL_{i}" for i in range(len(config["id2label"]))}


def test_offline_flag_skips_the_probe(online, refused_hub, tmp_path, capsys, caplog):
    row = CONTAINERS["torch-pyth"]
    _, calls = refused_hub
    code, err, _ = online(capsys, row, "--checkpoint", str(harness.case(row.variant).checkpoint),
                          "--out", str(tmp_path / "hf"), "--offline")
    assert code == 0, err
    assert calls == [], "--offline probed the hub"
    assert "offline (--offline)" in caplog.text and not downloads.is_offline()  # the flag ends with the call


def test_offline_flag_refuses_an_uncached_download(online, tmp_path, capsys):
    row = CONTAINERS["torch-pyth"]
    code, err, _ = online(capsys, row, "--checkpoint", "http://127.0.0.1:9/model.pyth", "--out", str(tmp_path / "hf"),
                          "--offline")
    assert code == 1 and "offline and not cached: http://127.0.0.1:9/model.pyth" in _one_error(err), err
    assert _cache_entries(tmp_path) == [] and not (tmp_path / "hf").exists()


def test_a_local_path_is_never_removed(online, tmp_path, capsys):
    """The same unloadable bytes given as a local path (even one inside the cache): the error
    is the loader's alone and the file stays where the user put it."""
    row = CONTAINERS["torch-pyth"]
    good = harness.case(row.variant).checkpoint
    local = downloads.cache_path_for("http://127.0.0.1:9/model", good.name)
    local.parent.mkdir(parents=True)
    local.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, err, _ = online(capsys, row, "--checkpoint", str(local), "--out", str(tmp_path / "hf"))
    assert code == 1 and UNREADABLE["torch"] in _one_error(err) and "removed" not in err, err
    assert local.exists()
