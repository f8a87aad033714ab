"""Output is all-or-nothing; safetensors are streamed and read back exactly."""
from __future__ import annotations


import pytest
import torch

from converters import output_dir
from converters.errors import OutputExistsError


def test_output_refuses_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with output_dir.atomic_output_dir(out):
            pass
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_dir.atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")  # a previous output
    with output_dir.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_streamed_safetensors_read_back_exactly(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a.weight": torch.randn(3, 5),
        "t.weight": torch.randn(4, 6).T,  # strided: written as its contiguous copy
        "half": torch.randn(7).half(), "bf": torch.randn(2, 2).bfloat16(), "ids": torch.arange(5),
        "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }
    output_dir.write_safetensors(tensors, tmp_path / "m.safetensors", {"format": "pt"})
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
