"""Torch checkpoints: nothing in a file runs, the state dict is found or the error says what was there."""
from __future__ import annotations


from collections import OrderedDict

import pytest
import torch

from converters import state_dicts, torch_files
from converters.errors import CheckpointError


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
        ckpt = torch_files.load_torch_checkpoint(path)
    assert CONSTRUCTED == [], "the pickled config's code ran on load"
    assert type(ckpt["config"]) is OrderedDict and ckpt["config"].pickled_args == ({"lr": 0.1},)
    assert ckpt["epoch"] == 3
    assert set(state_dicts.find_state_dict(ckpt)) == {"w", "b"}


@pytest.mark.parametrize("container", ["model_state", "model", "module", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "model.", "module."])
def test_state_dict_found_by_container_and_prefix(container, prefix):
    weights = {f"{prefix}blocks.0.w": torch.zeros(1), f"{prefix}head.b": torch.zeros(1)}
    found = state_dicts.find_state_dict({container: weights, "epoch": 1, "optimizer_state": {"state": {}}})
    assert set(found) == {"blocks.0.w", "head.b"}


def test_flat_state_dict_and_partial_prefix_kept():
    weights = {"model.a": torch.zeros(1), "b": torch.zeros(1)}  # not every key is prefixed
    assert set(state_dicts.find_state_dict(weights)) == {"model.a", "b"}


def test_no_state_dict_lists_what_was_found():
    with pytest.raises(CheckpointError, match=r"found \{'epoch': int, 'weights': dict, 'cfg': str\}"):
        state_dicts.find_state_dict({"epoch": 1, "weights": {"a": 1}, "cfg": "x"})


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"\x80\x02}q\x00(X"])
def test_unreadable_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        torch_files.load_torch_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _weights()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        torch_files.load_torch_checkpoint(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        torch_files.load_torch_checkpoint("/nonexistent/nowhere.pth")
