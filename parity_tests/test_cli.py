"""The console script: the variant table, conversion with progress, clear errors."""
from __future__ import annotations

import pytest

import json

import torch

from converters import cli
from converters.registry import all_variants
from parity_fixtures import timesformer_original


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_variant(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for v in all_variants():
        assert v.name in out
    assert f"{len(all_variants())} variants" in out
    assert "-0.3016" in out and "placeholder zeros" in out


def test_missing_checkpoint_file(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint",
                       str(tmp_path / "absent.pyth"), "--out", str(tmp_path / "out"))
    assert code == 1 and "checkpoint not found" in err and "absent.pyth" in err
    assert not (tmp_path / "out").exists()


def test_wrong_container_lists_keys(capsys, tmp_path):
    path = tmp_path / "ckpt.pyth"
    torch.save({"weights": {"a": 1}, "epoch": 3}, path)
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint", str(path),
                       "--out", str(tmp_path / "out"))
    assert code == 1 and "no state dict found" in err and "'weights': dict" in err and "'epoch': int" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_size_convert_and_verify(capsys, tmp_path, monkeypatch):
    """The product path at full size: a random full-size original file -> CLI -> from_pretrained,
    proven against the full-size original carrying the file's weights."""
    monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")  # label names: cache only
    from converters.registry import get_variant

    spec = dict(get_variant("timesformer-base-finetuned-k400").config)
    model = timesformer_original.TimeSformer(**timesformer_original.constructor_args(spec))
    path = tmp_path / "TimeSformer_divST_8x32_224_K400.pyth"
    timesformer_original.save_checkpoint(model, path, spec=spec, training_state=False)
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint", str(path),
                       "--out", str(tmp_path / "hf"), "--verify", "--seed", "0")
    assert code == 0, err
    for step in ("[1/5] fetching", "[2/5] loading", "[3/5] converting", "[4/5] writing", "[5/5] verifying",
                 "verify passed", "seed 0"):
        assert step in err
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "parity.json", "preprocessor_config.json"]
    record = json.loads((tmp_path / "hf" / "parity.json").read_text())
    assert record["config"]["spec"]["num_hidden_layers"] == 12 and record["outcome"] == "pass"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_frames"], config["image_size"], len(config["id2label"])) == (8, 224, 400)
    # Converting again into the same directory needs --overwrite.
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint", str(path),
                       "--out", str(tmp_path / "hf"))
    assert code == 1 and "--overwrite" in err
