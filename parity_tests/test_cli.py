"""The console script: the variant table, conversion with progress, clear errors."""
from __future__ import annotations

import json

import pytest

import torch

from converters import cli
from converters.registry import all_variants
from fixtures import timesformer_original


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


def test_unknown_variant_suggests_closest(capsys):
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k700", "--checkpoint", "x", "--out", "y")
    assert code == 2
    assert "unknown variant 'timesformer-base-finetuned-k700'; closest: " in err
    closest = err.split("closest: ")[1].split(" (")[0].split(", ")
    assert {"timesformer-base-finetuned-k400", "timesformer-base-finetuned-k600"} <= set(closest[:3])


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


def test_non_empty_output_refused_before_work(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint",
                       str(tmp_path / "absent.pyth"), "--out", str(tmp_path / "out"))
    assert code == 1 and "--overwrite" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


@pytest.mark.xdist_group("full-size-timesformer")
def test_full_size_convert_and_verify(capsys, tmp_path, monkeypatch, full_size_timesformer_file):
    """The product path at full size: a random full-size original file -> CLI -> from_pretrained."""
    monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")  # label names: cache only
    path = full_size_timesformer_file
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint", str(path),
                       "--out", str(tmp_path / "hf"), "--verify")
    assert code == 0, err
    for step in ("[1/4] fetching", "[2/4] loading", "[3/4] converting", "[4/4] writing", "verified"):
        assert step in err
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_frames"], config["image_size"], len(config["id2label"])) == (8, 224, 400)
    # Converting again into the same directory needs --overwrite.
    code, _, err = run(capsys, "convert", "timesformer-base-finetuned-k400", "--checkpoint", str(path),
                       "--out", str(tmp_path / "hf"))
    assert code == 1 and "--overwrite" in err


def _tiny_timesformer_file(tmp_path, mutate):
    """A TimeSformer file in the original container whose weights `mutate` damages."""
    from converters.registry import get_variant
    from fixtures import harness

    c = harness.case("timesformer-base-finetuned-k400")
    payload = torch.load(c.checkpoint)
    mutate(payload["model_state"])
    path = tmp_path / "damaged.pyth"
    torch.save(payload, path)
    spec = c.spec
    return get_variant(c.variant.name), spec, path


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("model.blocks.1.temporal_fc.weight"),
     r"1 key\(s\) missing: \['timesformer.encoder.layer.1.temporal_dense.weight'\]"),
    (lambda sd: sd.__setitem__("model.head.weight", torch.zeros(7, 32)),
     r"classifier.weight: checkpoint \(7, 32\), model \(400, 32\)"),
    (lambda sd: sd.__setitem__("model.blocks.0.extra.weight", torch.zeros(1)),
     r"match no rename rule: \['blocks.0.extra.weight'\]"),
])
def test_damaged_checkpoint_is_refused_before_writing(tmp_path, damage, message):
    from converters import checkpoint_io, pipeline

    variant, spec, path = _tiny_timesformer_file(tmp_path, damage)
    with pytest.raises(checkpoint_io.CheckpointError, match=message):
        pipeline.convert_file(variant, str(path), tmp_path / "out", spec=spec, progress=lambda _: None)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["damaged.pyth"], "partial output left behind"
