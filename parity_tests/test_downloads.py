"""Downloads go through one verified cache."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from converters import downloads
from converters.errors import DownloadError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(root))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CONVERT_PARITY_OFFLINE", raising=False)
    return root


@pytest.fixture
def http_server(tmp_path):
    """A file server on loopback only, stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_plain_url_download_is_hashed_and_cached(cache, http_server):
    served, base = http_server
    payload = os.urandom(3 << 20)
    (served / "model.pyth").write_bytes(payload)
    url = f"{base}/model.pyth"
    path = downloads.fetch(url, progress=False)
    assert path.read_bytes() == payload and path.parent.parent == cache
    digest = hashlib.sha256(payload).hexdigest()
    assert path.with_name("model.pyth.sha256").read_text().split()[0] == digest
    assert not list(path.parent.glob("*.part")), "temporary download left behind"
    (served / "model.pyth").unlink()  # served copy gone: the cache answers
    assert downloads.fetch(url, progress=False) == path


def test_download_with_wrong_expected_hash_leaves_no_cache_entry(cache, http_server):
    served, base = http_server
    (served / "m.bin").write_bytes(b"abc")
    with pytest.raises(DownloadError, match="expected 0000"):
        downloads.fetch(f"{base}/m.bin", sha256="0" * 64, progress=False)
    assert not downloads.cache_path_for(f"{base}/m.bin").exists()
    assert not list(downloads.cache_path_for(f"{base}/m.bin").parent.glob("*.part"))


def test_failed_download_names_url_and_cache_path(cache, http_server):
    _, base = http_server
    url = f"{base}/absent.bin"
    with pytest.raises(DownloadError, match=f"download failed for {url} \\(cache path .*absent.bin\\)"):
        downloads.fetch(url, progress=False)
    assert not downloads.cache_path_for(url).exists()


def test_offline_uses_cache_and_verifies_it(cache, monkeypatch):
    url = "https://www.dropbox.com/s/abc/TimeSformer_divST_8x32_224_K600.pyth?dl=1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = downloads.cache_path_for(url, "TimeSformer_divST_8x32_224_K600.pyth")
    with pytest.raises(DownloadError, match=f"offline and not cached: .*{dest}"):
        downloads.fetch(url, filename=dest.name)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"weights")
    assert downloads.fetch(url, filename=dest.name) == dest
    assert downloads.fetch(url, filename=dest.name, sha256=hashlib.sha256(b"weights").hexdigest()) == dest
    dest.with_name(dest.name + ".sha256").write_text("f" * 64 + "  x\n")
    with pytest.raises(DownloadError, match="has sha256 .* expected ffff"):
        downloads.fetch(url, filename=dest.name)


def test_google_drive_links_use_the_drive_downloader(cache, monkeypatch):
    url = "https://drive.google.com/u/1/uc?id=17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l&export=download"
    assert downloads.parse_drive_id(url) == "17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l"
    calls = []

    def fake_gdown(id, output, quiet, progress, timeout, cancel):  # gdown's keywords; no network here
        calls.append((id, timeout, cancel.is_set()))
        output.write(b"drive bytes")
        progress(len(b"drive bytes"), None)
        return output

    import gdown

    monkeypatch.setattr(gdown, "download", fake_gdown)
    path = downloads.fetch(url, filename="k400.pyth", progress=False)
    assert calls == [("17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l", downloads.READ_TIMEOUT, False)]
    assert path.read_bytes() == b"drive bytes"


def test_hub_file_from_prepopulated_cache_offline(offline_hub_cache):
    """hf:// URLs go through hf_hub_download; offline, a cached snapshot is used."""
    offline_hub_cache("hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy", b"video")
    path = downloads.fetch("hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy")
    assert path.read_bytes() == b"video"
    with pytest.raises(DownloadError, match=r"could not get hf://datasets/hf-internal-testing/spaghetti-video/other.npy: "
                                            r"offline \((HF_HUB|CONVERT_PARITY)_OFFLINE=1\), and it is not in the hub cache"):
        downloads.fetch("hf://datasets/hf-internal-testing/spaghetti-video/other.npy")


def test_hub_url_forms():
    assert downloads.parse_hub_url("hf://datasets/org/repo/dir/f.npy") == ("dataset", "org/repo", "main", "dir/f.npy")
    assert downloads.parse_hub_url("https://huggingface.co/org/m/resolve/v1/w.bin") == ("model", "org/m", "v1", "w.bin")
    assert downloads.parse_hub_url("https://example.com/w.bin") is None


# ---- bounded downloads: a hostile server on loopback ----------------------------------------

def _container_bytes() -> dict[str, bytes]:
    """A small file of each container, written the way the originals write them."""
    import io
    import pickle

    import flax.serialization
    import numpy as np
    import torch

    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"model_state": {"w": torch.ones(2)}}, zipped)
    torch.save({"model_state": {"w": torch.ones(2)}}, legacy, _use_new_zipfile_serialization=False)
    return {"torch": zipped.getvalue(), "torch-legacy": legacy.getvalue(),
            "flax_msgpack": flax.serialization.msgpack_serialize({"params": {"w": np.ones(2, np.float32)}}),
            "haiku_pickle": pickle.dumps({"linear": {"w": np.ones(2, np.float32)}})}


TIGHT = {"CONVERT_PARITY_DOWNLOAD_MAX_BYTES": str(1 << 20), "CONVERT_PARITY_DOWNLOAD_TIMEOUT": "10",
         "CONVERT_PARITY_DOWNLOAD_READ_TIMEOUT": "10"}
# attack -> (limits beside TIGHT, the error it must end in). The deadline and the read timeout
# are kept far apart so that which one fires never depends on the machine's load.
ATTACK_ERRORS = {
    "endless": ({}, r"exceeds the size limit of 1\.0 MiB \(CONVERT_PARITY_DOWNLOAD_MAX_BYTES\)"),
    "drip": ({"CONVERT_PARITY_DOWNLOAD_TIMEOUT": "0.5"}, r"did not finish within 0\.5 s \(CONVERT_PARITY_DOWNLOAD_TIMEOUT\)"),
    "drip_headers": ({"CONVERT_PARITY_DOWNLOAD_TIMEOUT": "0.5"}, r"did not finish within 0\.5 s"),
    "stall": ({"CONVERT_PARITY_DOWNLOAD_READ_TIMEOUT": "0.3"},
              r"stalled: no data for 0\.3 s \(CONVERT_PARITY_DOWNLOAD_READ_TIMEOUT\)"),
    "html": ({}, r": the server sent an HTML page, not a checkpoint \(a login or error page\?\)"),
    "html_as_file": ({}, r"is not a torch checkpoint \(a zip archive or a pickle\): it starts with "
                         r"b'<!DOCTYPE html>.*' \(an HTML page: a login or error page\?\)"),
    "short": ({}, r"ended after 4004 of the 100000 bytes the server declared"),
    "long": ({}, r"sent more than the 1000 bytes the server declared"),
    "too_large_declared": ({}, r"declares 10737418240 bytes, above the size limit of 1\.0 MiB"),
    "wrong_magic": ({}, r"is not a torch checkpoint \(a zip archive or a pickle\): it starts with b'this is not"),
}


@pytest.fixture
def limits(monkeypatch):
    def set_limits(**extra):
        for name, value in {**TIGHT, **extra}.items():
            monkeypatch.setenv(name, value)

    return set_limits


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("attack", ATTACK_ERRORS)
def test_hostile_download_is_refused_and_never_cached(attack, cache, limits):
    from parity_tests.loopback import hostile_server

    extra, pattern = ATTACK_ERRORS[attack]
    limits(**extra)
    with hostile_server() as (base, _):
        url = f"{base}/{attack}"
        with pytest.raises(DownloadError, match=rf"^download of {re.escape(url)}\b.*{pattern}.*; nothing was cached$"):
            downloads.fetch(url, filename="model.pyth", progress=False, container="torch")
    assert _cache_files(cache) == [], "a refused download left files in the cache"


# gdown (Google Drive) under the same limits, where gdown lets them be set. Its own
# short-body check words the error; it cannot see an HTML content type or a long body.
DRIVE_ATTACKS = {"endless": ATTACK_ERRORS["endless"], "drip": ATTACK_ERRORS["drip"],
                 "drip_headers": ATTACK_ERRORS["drip_headers"],
                 "stall": ({"CONVERT_PARITY_DOWNLOAD_TIMEOUT": "0.5"}, ATTACK_ERRORS["drip"][1]),
                 "short": ({}, r"Download is incomplete: received \d+ bytes but the server announced 100000 bytes"),
                 "html_as_file": ATTACK_ERRORS["html_as_file"], "wrong_magic": ATTACK_ERRORS["wrong_magic"]}


@pytest.mark.parametrize("attack", DRIVE_ATTACKS)
def test_drive_download_is_bounded_too(attack, cache, limits, monkeypatch):
    """The real gdown, sent to the loopback server instead of Google Drive."""
    import gdown

    from parity_tests.loopback import hostile_server

    extra, pattern = DRIVE_ATTACKS[attack]
    limits(**extra)
    real_download = gdown.download
    url = "https://drive.google.com/file/d/1abcDEF/view"
    with hostile_server() as (base, _):
        monkeypatch.setattr(gdown, "download", lambda id, **kw: real_download(url=f"{base}/{attack}", **kw))
        with pytest.raises(DownloadError, match=pattern):
            downloads.fetch(url, filename="model.pyth", progress=False, container="torch")
    assert _cache_files(cache) == []


def test_good_download_of_each_container_is_checked_and_cached(cache, limits):
    from parity_tests.loopback import hostile_server, serve_bytes

    limits()
    files = _container_bytes()
    with hostile_server(**{name: serve_bytes(data) for name, data in files.items()}) as (base, routes):
        for name, data in files.items():
            container = "torch" if name.startswith("torch") else name
            path = downloads.fetch(f"{base}/{name}", filename=name, progress=False, container=container)
            assert path.read_bytes() == data and path.parent.parent == cache
            assert path.with_name(name + ".sha256").read_text().split()[0] == hashlib.sha256(data).hexdigest()
            del routes[name]  # the server forgets it: the cache answers
            assert downloads.fetch(f"{base}/{name}", filename=name, progress=False, container=container) == path
    assert not list(cache.rglob("*.part"))


def test_each_container_refuses_the_others_magic(tmp_path):
    files = _container_bytes()
    accepted = {"torch": {"torch", "torch-legacy", "haiku_pickle"},  # a pickle may be a legacy torch file
                "flax_msgpack": {"flax_msgpack"}, "haiku_pickle": {"haiku_pickle", "torch-legacy"}}
    for container, ok in accepted.items():
        for name, data in [*files.items(), ("html", b"<html>"), ("empty", b"")]:
            fh = tmp_path / "f"
            fh.write_bytes(data)
            problem = downloads.container_problem(fh, container)
            assert (problem is None) == (name in ok), (container, name, problem)
    assert downloads.container_problem(fh, None) is None  # no container expected: not judged


def test_cached_entry_that_is_not_its_container_is_removed_and_downloaded_again(cache, limits):
    """What an older version cached: an HTML page with its sha256 recorded beside it."""
    from parity_tests.loopback import hostile_server, serve_bytes

    limits()
    good = _container_bytes()["torch"]
    with hostile_server(model=serve_bytes(good)) as (base, _):
        url = f"{base}/model"
        entry = downloads.cache_path_for(url, "model.pyth")
        entry.parent.mkdir(parents=True)
        entry.write_bytes(b"<!DOCTYPE html><html>login</html>")
        entry.with_name("model.pyth.sha256").write_text(f"{downloads.sha256_file(entry)}  model.pyth\n")
        with pytest.raises(DownloadError, match=rf"^cached file {re.escape(str(entry))} for {re.escape(url)} is not a "
                                                rf"torch checkpoint.*; removed the cached copy, it will be downloaded again$"):
            downloads.fetch(url, filename="model.pyth", progress=False, container="torch")
        assert _cache_files(cache) == [entry.parent], "the poisoned entry or its sha256 was kept"
        assert downloads.fetch(url, filename="model.pyth", progress=False, container="torch").read_bytes() == good


def test_hub_file_that_is_not_its_container_is_removed(offline_hub_cache, tmp_path):
    url = "hf://org/model/checkpoint.pth"
    offline_hub_cache(url, b"<html>error</html>")
    snapshot = next((tmp_path / "hub").rglob("checkpoint.pth"))
    with pytest.raises(DownloadError, match=rf"^hub file {url} \({re.escape(str(snapshot))}\) is not a torch checkpoint"
                                            rf".*; removed the cached copy, it will be downloaded again$"):
        downloads.fetch(url, container="torch")
    assert not snapshot.exists()
    # A file no container is expected of (a label list, a video) is not judged by its bytes.
    offline_hub_cache("hf://org/model/labels.json", b"<html>not judged</html>")
    assert downloads.fetch("hf://org/model/labels.json").read_bytes() == b"<html>not judged</html>"


def test_default_limits_are_finite_and_grow_with_the_size(monkeypatch):
    for name in TIGHT:
        monkeypatch.delenv(name, raising=False)
    limits = downloads.Limits.from_env()
    assert limits.max_bytes == 8 * downloads.GiB and limits.read_timeout == 60
    two_gib = limits.seconds_for(2 * downloads.GiB)
    assert two_gib == 300 + 2 * downloads.GiB / (512 * 1024)  # 512 KiB/s on average, plus 5 minutes
    assert limits.seconds_for(None) == limits.seconds_for(limits.max_bytes) > two_gib
    monkeypatch.setenv("CONVERT_PARITY_DOWNLOAD_TIMEOUT", "7")
    assert downloads.Limits.from_env().seconds_for(2 * downloads.GiB) == 7


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_limit_setting_is_one_clear_error(value, monkeypatch):
    monkeypatch.setenv("CONVERT_PARITY_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(DownloadError, match=rf"^CONVERT_PARITY_DOWNLOAD_TIMEOUT must be a positive number, got '{value}'$"):
        downloads.Limits.from_env()


# ---- the hub probe -------------------------------------------------------------------------------

@pytest.fixture
def silent_port():
    """A loopback port that accepts connections (the kernel does) and never answers."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def refused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port  # closed: connecting is refused


def test_probe_of_a_silent_host_gives_up_at_its_timeout(silent_port):
    assert downloads.probe(f"http://127.0.0.1:{silent_port}", 0.3) == "timed out after 0.3 s"


def test_probe_of_a_refusing_host_fails_at_once(refused_port):
    assert "ConnectionRefusedError" in downloads.probe(f"http://127.0.0.1:{refused_port}", 0.3)


def test_probe_of_an_answering_host_succeeds():
    from parity_tests.loopback import hostile_server

    with hostile_server() as (base, _):
        assert downloads.probe(base, 1.5) is None
        assert downloads.probe(f"{base}/absent", 1.5) is None  # a 404 is an answer


@pytest.fixture
def hub_at(monkeypatch):
    """hub_available() against a loopback endpoint, with no offline variable set; the probe
    calls are recorded, huggingface_hub's offline switch is restored afterwards."""
    import huggingface_hub.constants as hc

    for var in ("HF_HUB_OFFLINE", "CONVERT_PARITY_OFFLINE", "CONVERT_PARITY_HUB_PROBE_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(downloads, "_PROBES", {})
    calls, real_probe = [], downloads.probe

    def recorded(url, timeout):
        calls.append((url, timeout))
        return real_probe(url, timeout)

    monkeypatch.setattr(downloads, "probe", recorded)

    def point(endpoint: str):
        monkeypatch.setattr(hc, "ENDPOINT", endpoint)
        return calls

    return point


def test_unreachable_hub_is_probed_once_briefly_then_offline(hub_at, refused_port):
    import huggingface_hub.constants as hc

    endpoint = f"http://127.0.0.1:{refused_port}"
    calls = hub_at(endpoint)
    assert downloads.hub_available() is False and downloads.hub_available() is False
    assert calls == [(endpoint, 1.5)], "one probe per process, with the short timeout"
    assert hc.HF_HUB_OFFLINE is True, "huggingface_hub (and transformers) were not switched offline"
    assert downloads.offline_reason().startswith(f"hub unreachable (probe of {endpoint}: ConnectionRefusedError")


def test_silent_hub_probe_timeout_is_settable(hub_at, silent_port, monkeypatch):
    monkeypatch.setenv("CONVERT_PARITY_HUB_PROBE_TIMEOUT", "0.2")
    calls = hub_at(f"http://127.0.0.1:{silent_port}")
    assert downloads.hub_available() is False and calls == [(f"http://127.0.0.1:{silent_port}", 0.2)]
    assert downloads.offline_reason().endswith("timed out after 0.2 s)")


def test_reachable_hub_stays_online(hub_at):
    import huggingface_hub.constants as hc

    from parity_tests.loopback import hostile_server

    with hostile_server() as (base, _):
        calls = hub_at(base)
        assert downloads.hub_available() is True and downloads.hub_available() is True
    assert len(calls) == 1 and hc.HF_HUB_OFFLINE is False and downloads.offline_reason() is None


def test_forced_offline_never_probes_and_is_restored(hub_at, refused_port):
    import huggingface_hub.constants as hc

    calls = hub_at(f"http://127.0.0.1:{refused_port}")
    with downloads.forced_offline("--offline"):
        assert downloads.hub_available() is False and hc.HF_HUB_OFFLINE is True
        assert downloads.offline_reason() == "offline (--offline)"
    assert calls == [] and hc.HF_HUB_OFFLINE is False and not downloads.is_offline()


# ---- cached_only: an input recipe's files from the caches, never the network ----------------------

def test_cached_only_gives_cached_copies_and_never_downloads(cache, offline_hub_cache, hub_at, silent_port,
                                                             http_server):
    """Online settings, a hub endpoint that never answers (a probe would hang 1.5 s) and a server
    that has the plain file: cached_only probes nothing and downloads nothing. None while any
    file is missing; then the cached paths, in order; huggingface_hub's offline switch restored."""
    import huggingface_hub.constants as hc

    probes = hub_at(f"http://127.0.0.1:{silent_port}")
    served, base = http_server
    (served / "frame.png").write_bytes(b"png bytes")
    hub_url, plain_url = "hf://datasets/org/videos/clip.npy", f"{base}/frame.png"
    offline_hub_cache(hub_url, b"npy bytes")
    assert downloads.cached_only([hub_url, plain_url]) is None
    assert not downloads.cache_path_for(plain_url).exists(), "cached_only downloaded a missing file"
    assert downloads.cached_only([plain_url, "hf://datasets/org/videos/other.npy"]) is None
    entry = downloads.cache_path_for(plain_url)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"png bytes")
    paths = downloads.cached_only([hub_url, plain_url])
    assert [p.read_bytes() for p in paths] == [b"npy bytes", b"png bytes"] and paths[1] == entry
    assert downloads.cached_only([]) == []
    assert probes == [] and hc.HF_HUB_OFFLINE is False and not downloads.is_offline()


def test_cached_only_refuses_a_damaged_cache_entry(cache):
    """A cached copy whose recorded sha256 no longer matches is an error, not a missing file."""
    url = "https://storage.googleapis.com/perceiver_io/sintel_frame1.png"
    entry = downloads.cache_path_for(url)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"changed")
    entry.with_name(entry.name + ".sha256").write_text("0" * 64 + "  sintel_frame1.png\n")
    with pytest.raises(DownloadError, match="has sha256 .* expected 0000"):
        downloads.cached_only([url])
