"""Downloads go through one verified cache."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
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

    def fake_gdown(id, output, quiet):  # gdown's signature; no network here
        calls.append(id)
        Path(output).write_bytes(b"drive bytes")
        return output

    import gdown

    monkeypatch.setattr(gdown, "download", fake_gdown)
    path = downloads.fetch(url, filename="k400.pyth", progress=False)
    assert calls == ["17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l"] and path.read_bytes() == b"drive bytes"


def test_hub_file_from_prepopulated_cache_offline(offline_hub_cache):
    """hf:// URLs go through hf_hub_download; offline, a cached snapshot is used."""
    offline_hub_cache("hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy", b"video")
    path = downloads.fetch("hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy")
    assert path.read_bytes() == b"video"
    with pytest.raises(DownloadError, match=r"could not get hf://datasets/hf-internal-testing/spaghetti-video/other.npy "
                                            r"\(offline, hub cache"):
        downloads.fetch("hf://datasets/hf-internal-testing/spaghetti-video/other.npy")


def test_hub_url_forms():
    assert downloads.parse_hub_url("hf://datasets/org/repo/dir/f.npy") == ("dataset", "org/repo", "main", "dir/f.npy")
    assert downloads.parse_hub_url("https://huggingface.co/org/m/resolve/v1/w.bin") == ("model", "org/m", "v1", "w.bin")
    assert downloads.parse_hub_url("https://example.com/w.bin") is None
