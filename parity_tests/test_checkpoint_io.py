"""Checkpoint I/O: nothing in a file runs, the state dict is found or the error says
what was there, downloads go through one verified cache, output is all-or-nothing."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from converters import checkpoint_io as io
from converters.checkpoint_io import CheckpointError, DownloadError, OutputExistsError


CONSTRUCTED: list[str] = []


class TrainingConfig(dict):
    """Like yacs' CfgNode (a dict subclass); records any construction on load."""

    def __setstate__(self, state):
        CONSTRUCTED.append("setstate")
        self.__dict__.update(state)

    def __reduce__(self):
        return (_make_config, (dict(self),))


def _make_config(items):
    CONSTRUCTED.append("called")
    return TrainingConfig(items)


def _weights():
    return {"model.w": torch.arange(6.0).reshape(2, 3), "model.b": torch.ones(2)}


def test_training_config_object_is_never_constructed(tmp_path):
    path = tmp_path / "ckpt.pth"
    CONSTRUCTED.clear()
    cfg = TrainingConfig(lr=0.1)
    torch.save({"model": _weights(), "config": cfg, "epoch": 3}, path)
    CONSTRUCTED.clear()
    with pytest.warns(UserWarning, match="config .*_make_config"):
        ckpt = io.load_torch_checkpoint(path)
    assert CONSTRUCTED == [], "the pickled config's code ran on load"
    assert isinstance(ckpt["config"], io.InertObject) and ckpt["epoch"] == 3
    assert set(io.find_state_dict(ckpt)) == {"w", "b"}


@pytest.mark.parametrize("container", ["model_state", "model", "module", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "model.", "module."])
def test_state_dict_found_by_container_and_prefix(container, prefix):
    weights = {f"{prefix}blocks.0.w": torch.zeros(1), f"{prefix}head.b": torch.zeros(1)}
    found = io.find_state_dict({container: weights, "epoch": 1, "optimizer_state": {"state": {}}})
    assert set(found) == {"blocks.0.w", "head.b"}


def test_flat_state_dict_and_partial_prefix_kept():
    weights = {"model.a": torch.zeros(1), "b": torch.zeros(1)}  # not every key is prefixed
    assert set(io.find_state_dict(weights)) == {"model.a", "b"}


def test_no_state_dict_lists_what_was_found():
    with pytest.raises(CheckpointError, match=r"found \{'epoch': int, 'weights': dict, 'cfg': str\}"):
        io.find_state_dict({"epoch": 1, "weights": {"a": 1}, "cfg": "x"})


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"\x80\x02}q\x00(X"])
def test_unreadable_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        io.load_torch_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _weights()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        io.load_torch_checkpoint(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        io.load_torch_checkpoint("/nonexistent/nowhere.pth")


def test_restricted_pickle_reads_numpy_containers(tmp_path):
    import numpy as np

    params = {"encoder/~/linear": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)}}
    path = tmp_path / "params.pickle"
    path.write_bytes(pickle.dumps(params))
    loaded = io.load_pickle_restricted(path)
    np.testing.assert_array_equal(loaded["encoder/~/linear"]["w"], params["encoder/~/linear"]["w"])


# ---- downloads ---------------------------------------------------------------------------

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
    path = io.fetch(url, progress=False)
    assert path.read_bytes() == payload and path.parent.parent == cache
    digest = hashlib.sha256(payload).hexdigest()
    assert path.with_name("model.pyth.sha256").read_text().split()[0] == digest
    assert not list(path.parent.glob("*.part")), "temporary download left behind"
    (served / "model.pyth").unlink()  # served copy gone: the cache answers
    assert io.fetch(url, progress=False) == path


def test_download_with_wrong_expected_hash_leaves_no_cache_entry(cache, http_server):
    served, base = http_server
    (served / "m.bin").write_bytes(b"abc")
    with pytest.raises(DownloadError, match="expected 0000"):
        io.fetch(f"{base}/m.bin", sha256="0" * 64, progress=False)
    assert not io.cache_path_for(f"{base}/m.bin").exists()
    assert not list(io.cache_path_for(f"{base}/m.bin").parent.glob("*.part"))


def test_failed_download_names_url_and_cache_path(cache, http_server):
    _, base = http_server
    url = f"{base}/absent.bin"
    with pytest.raises(DownloadError, match=f"download failed for {url} \\(cache path .*absent.bin\\)"):
        io.fetch(url, progress=False)
    assert not io.cache_path_for(url).exists()


def test_offline_uses_cache_and_verifies_it(cache, monkeypatch):
    url = "https://www.dropbox.com/s/abc/TimeSformer_divST_8x32_224_K600.pyth?dl=1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = io.cache_path_for(url, "TimeSformer_divST_8x32_224_K600.pyth")
    with pytest.raises(DownloadError, match=f"offline and not cached: .*{dest}"):
        io.fetch(url, filename=dest.name)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"weights")
    assert io.fetch(url, filename=dest.name) == dest
    assert io.fetch(url, filename=dest.name, sha256=hashlib.sha256(b"weights").hexdigest()) == dest
    dest.with_name(dest.name + ".sha256").write_text("f" * 64 + "  x\n")
    with pytest.raises(DownloadError, match="has sha256 .* expected ffff"):
        io.fetch(url, filename=dest.name)


def test_google_drive_links_use_the_drive_downloader(cache, monkeypatch):
    url = "https://drive.google.com/u/1/uc?id=17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l&export=download"
    assert io.parse_drive_id(url) == "17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l"
    calls = []

    def fake_gdown(id, output, quiet):  # gdown's signature; no network here
        calls.append(id)
        Path(output).write_bytes(b"drive bytes")
        return output

    import gdown

    monkeypatch.setattr(gdown, "download", fake_gdown)
    path = io.fetch(url, filename="k400.pyth", progress=False)
    assert calls == ["17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l"] and path.read_bytes() == b"drive bytes"


def test_hub_file_from_prepopulated_cache_offline(offline_hub_cache):
    """hf:// URLs go through hf_hub_download; offline, a cached snapshot is used."""
    offline_hub_cache("hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy", b"video")
    path = io.fetch("hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy")
    assert path.read_bytes() == b"video"
    with pytest.raises(DownloadError, match=r"could not get hf://datasets/hf-internal-testing/spaghetti-video/other.npy "
                                            r"\(offline, hub cache"):
        io.fetch("hf://datasets/hf-internal-testing/spaghetti-video/other.npy")


def test_hub_url_forms():
    assert io.parse_hub_url("hf://datasets/org/repo/dir/f.npy") == ("dataset", "org/repo", "main", "dir/f.npy")
    assert io.parse_hub_url("https://huggingface.co/org/m/resolve/v1/w.bin") == ("model", "org/m", "v1", "w.bin")
    assert io.parse_hub_url("https://example.com/w.bin") is None


# ---- output ---------------------------------------------------------------------------------

def test_output_refuses_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with io.atomic_output_dir(out):
            pass
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    with io.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---- Flax msgpack and Haiku pickles ------------------------------------------------------------

def test_flax_msgpack_params_found_and_flattened(tmp_path):
    import flax.serialization
    import numpy as np

    params = {"cls": np.ones((1, 1, 4), np.float32), "Transformer": {"encoder_norm": {"scale": np.arange(4.0)}}}
    legacy = tmp_path / "legacy"
    legacy.write_bytes(flax.serialization.msgpack_serialize({"optimizer": {"target": params, "state": {"step": 3}}}))
    newer = tmp_path / "newer"
    newer.write_bytes(flax.serialization.msgpack_serialize({"params": params, "global_step": 3}))
    for path in (legacy, newer):
        flat = io.load_flax_msgpack(path, ("optimizer/target", "params"))
        assert sorted(flat) == ["Transformer/encoder_norm/scale", "cls"]
        assert torch.equal(flat["Transformer/encoder_norm/scale"], torch.arange(4.0, dtype=torch.float64))
    with pytest.raises(CheckpointError, match=r"no parameter tree under opt/target; found \{'global_step': int, 'params': dict\}"):
        io.load_flax_msgpack(newer, ("opt/target",))
    newer.write_bytes(newer.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="not a readable Flax msgpack"):
        io.load_flax_msgpack(newer, ("params",))


def test_haiku_pickle_params_and_state_flattened(tmp_path):
    import numpy as np

    params = {"encoder/~/linear": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}}
    state = {"encoder/~/batchnorm/~/mean_ema": {"average": np.ones(3, np.float32)}}
    path = tmp_path / "imagenet.pystate"
    path.write_bytes(pickle.dumps({"params": params, "state": state}))
    flat = io.load_haiku_pickle(path)
    assert sorted(flat) == ["encoder/~/linear/b", "encoder/~/linear/w", "state/encoder/~/batchnorm/~/mean_ema/average"]
    path.write_bytes(pickle.dumps(params))  # pickled directly (MLM, flow, multimodal)
    assert sorted(io.load_haiku_pickle(path)) == ["encoder/~/linear/b", "encoder/~/linear/w"]
    path.write_bytes(pickle.dumps({"encoder": {"w": "not an array"}}))
    with pytest.raises(CheckpointError, match="expected only arrays"):
        io.load_haiku_pickle(path)


def test_streamed_safetensors_read_back_exactly(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a.weight": torch.randn(3, 5),
        "t.weight": torch.randn(4, 6).T,  # strided: written as its contiguous copy
        "half": torch.randn(7).half(), "bf": torch.randn(2, 2).bfloat16(), "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }
    io.write_safetensors(tensors, tmp_path / "m.safetensors", {"format": "pt"})
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
