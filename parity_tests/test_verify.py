"""`convert --verify` through the real CLI, on every variant's tiny case: the checkpoint's
own weights in the original reference against the converted model, the verdict, its exit
code and the evidence written beside the model (converters/verify.py, evidence.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import transformers

from converters import downloads, verify
from converters.registry import all_variants, known_divergence
from parity_fixtures import harness
from parity_harness.compare import compare_outputs
from parity_harness.tolerances import TOLERANCE

# Run by default: one variant per family and the two whose HF class is known to diverge;
# the other 32 with --run-slow (CI runs them).
QUICK = {"timesformer-base-finetuned-k400", "xclip-base-patch32", "vivit-b-16x2-kinetics400", "vit-msn-small",
         "vision-perceiver-fourier", "language-perceiver", "vision-perceiver-learned", "vision-perceiver-conv"}


def _param(v):
    marks = [pytest.mark.xdist_group(v.name), *([] if v.name in QUICK else [pytest.mark.slow])]
    return pytest.param(v, id=v.name, marks=marks)


def _convert(tiny_cli, capsys, name: str, out, *argv: str):
    c = harness.case(name)
    code, err, _ = tiny_cli(capsys, SimpleNamespace(variant=name), "--checkpoint", str(c.checkpoint),
                            "--out", str(out), "--verify", *argv)
    return c, code, err


@pytest.mark.parametrize("v", [_param(v) for v in all_variants()])
def test_verify_proves_the_tiny_conversion(v, tiny_cli, capsys, tmp_path):
    """The verdict's numbers are the matrix's own measurement of the same case (the same
    original on the same seeded input, harness.SEED + 1), reached through the CLI's other
    path: the loader's weights in a freshly loaded original, from_pretrained on the output."""
    out = tmp_path / "hf"
    c, code, err = _convert(tiny_cli, capsys, v.name, out, "--seed", str(harness.SEED + 1))
    known = known_divergence(v)
    assert code == (3 if known else 0), err
    record = json.loads((out / "parity.json").read_text())
    assert record["outcome"] == ("known-divergence" if known else "pass")
    expected = compare_outputs(c.reference, c.hf_outputs(), **TOLERANCE[v.family])
    assert [(o["output"], o["max_abs"], o["out_of_tolerance"]) for o in record["outputs"]] == [
        (d.key, d.max_abs, d.mismatched) for d in expected]
    description, seeded = c.original.input_description(c.spec, harness.SEED + 1)
    assert record["input"] == {"kind": "seeded" if seeded else "fixed", "description": description,
                               "seed": harness.SEED + 1 if seeded else None, "files": [],
                               "why_not_recipe": "--seed given"}
    assert (f"seed {harness.SEED + 1}" if seeded else "a fixed input") in err
    assert record["checkpoint"]["sha256"] == downloads.sha256_file(c.checkpoint)
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["tolerance"]["atol"] == TOLERANCE[v.family]["atol"]
    if known:  # named, measured, and the weights proven on their own
        assert [d["name"] for d in record["known_divergences"]] == [known.cause]
        assert known.cause in err and "known divergence" in err
        assert record["weights_check"] and all(o["within"] for o in record["weights_check"])
        assert any(not o["within"] for o in record["outputs"])
    else:
        assert "verify passed" in err and record["weights_check"] == []


def test_model_card_states_the_verdict(tiny_cli, capsys, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "hf"
    _, code, err = _convert(tiny_cli, capsys, "vit-msn-small", out)
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "parity-pass" in card.data.tags
    record = json.loads((out / "parity.json").read_text())
    assert record["checkpoint"]["sha256"] in card.text
    for o in record["outputs"]:
        assert f"| {o['output']} | {o['max_abs']:.3g} |" in card.text
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "parity.json",
                                                     "preprocessor_config.json"]


def test_default_input_is_seed_zero_without_cached_recipe_files(tiny_cli, capsys, tmp_path):
    _, code, err = _convert(tiny_cli, capsys, "timesformer-base-finetuned-k400", tmp_path / "hf")
    assert code == 0, err
    used = json.loads((tmp_path / "hf" / "parity.json").read_text())["input"]
    assert (used["kind"], used["seed"]) == ("seeded", verify.DEFAULT_SEED)
    assert used["why_not_recipe"] == "the published recipe's files are not cached"
    assert "seed 0" in err


def test_interrupted_verify_leaves_nothing(tiny_cli, capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify", interrupted)
    _, code, err = _convert(tiny_cli, capsys, "vit-msn-small", tmp_path / "hf")
    assert code == 130 and "nothing was written" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".hf", "hf"))]


def test_output_that_does_not_load_is_one_error_line(tiny_cli, capsys, tmp_path, monkeypatch):
    """from_pretrained reporting a missing key: no verdict can be reached, nothing is written."""
    cls = transformers.ViTMSNModel
    loads = cls.from_pretrained.__func__

    def leaky(klass, path, **kwargs):
        model, info = loads(klass, path, **kwargs)
        return model, {**info, "missing_keys": ["encoder.layer.0.attention.attention.query.weight"]}

    monkeypatch.setattr(cls, "from_pretrained", classmethod(leaky))
    _, code, err = _convert(tiny_cli, capsys, "vit-msn-small", tmp_path / "hf", "--seed", "0")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "does not load the output cleanly" in errors[0], err
    assert "query.weight" in errors[0]
    assert not (tmp_path / "hf").exists()


def test_weights_the_original_cannot_take_are_one_error_line(tiny_cli, capsys, tmp_path, monkeypatch):
    side = harness.original("timesformer")

    def refuses(spec, state_dict):
        raise RuntimeError("Error(s) in loading state_dict for TimeSformer:\n\tMissing key(s): \"model.head.weight\"")

    monkeypatch.setattr(side, "load", refuses)
    _, code, err = _convert(tiny_cli, capsys, "timesformer-base-finetuned-k400", tmp_path / "hf", "--seed", "0")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert "reference cannot take the checkpoint's weights" in errors[0] and "model.head.weight" in errors[0]
    assert not (tmp_path / "hf").exists()


# ---- a planted mapping bug: caught, and localised to its layer -------------------------------

ONE_PER_FAMILY = ("timesformer-base-finetuned-k400", "xclip-base-patch32", "vivit-b-16x2-kinetics400",
                  "vit-msn-small", "vision-perceiver-fourier")


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=pytest.mark.xdist_group(n)) for n in ONE_PER_FAMILY])
def test_planted_mapping_bug_is_caught_and_localised(name, tiny_cli, capsys, tmp_path, monkeypatch):
    """Two weights of the middle layer crossed, as a rule table with two targets swapped
    writes them (fixtures/planted.py): --verify exits 1 and names that layer, in its output
    and in parity.json; the output is kept with its evidence, and the card says FAILED."""
    import importlib

    from converters import localise
    from parity_fixtures import planted

    c = harness.case(name)
    layer = planted.middle_layer(c.variant, c.converted)
    swapped = planted.swapped_keys(c.variant, c.converted, layer)
    block = localise.block_of(localise.installed_names(c.variant, c.converted)[swapped[0]].rpartition(".")[0])
    monkeypatch.setattr(importlib.import_module(f"converters.{c.variant.family}"), "FAMILY",
                        planted.planted_family(c.variant, layer))
    out = tmp_path / "hf"
    _, code, err = _convert(tiny_cli, capsys, name, out, "--seed", "1")
    assert code == 1, err
    assert "verify FAILED" in err and "first divergence: original " in err and f"({block})" in err, err
    record = json.loads((out / "parity.json").read_text())
    first = record["localisation"]["first_divergence"]
    assert record["outcome"] == "fail" and first["layer"] == block
    assert first["max_abs"] > record["tolerance"]["atol"] and first["pairs_before_within_tolerance"] > 0
    assert any(not o["within"] for o in record["outputs"])
    assert "**FAILED**" in (out / "README.md").read_text() and "first divergence" in (out / "README.md").read_text()


@pytest.mark.slow
def test_full_size_verify_runs_the_cached_recipe_input(tmp_path, monkeypatch, offline_hub_cache, capsys):
    """At full size, with the recipe's file in the cache (a stand-in image), --verify runs the
    published recipe's input, records its file and digest, and still downloads nothing."""
    import hashlib

    from converters import cli
    from converters.registry import get_variant
    from parity_tests.test_real_checkpoints import _put_in_cache
    from parity_tests.test_recipe_inputs import _stand_in_bytes

    v = get_variant("vit-msn-small")
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")
    digests = {}
    for url in v.inputs.files:
        data = _stand_in_bytes(url)
        offline_hub_cache(url, data) if downloads.parse_hub_url(url) else _put_in_cache(url, data)
        digests[url] = hashlib.sha256(data).hexdigest()
    side, spec = harness.original(v.family), dict(v.config)
    path = tmp_path / v.source.filename
    side.save(side.build(spec, 0), path, side.containers[0], spec)
    out = tmp_path / "hf"
    code = cli.main(["convert", v.name, "--checkpoint", str(path), "--out", str(out), "--verify"])
    err = capsys.readouterr().err
    assert code == 0, err
    record = json.loads((out / "parity.json").read_text())
    assert record["input"]["kind"] == "recipe" and record["input"]["seed"] is None
    assert {f["url"]: f["sha256"] for f in record["input"]["files"]} == digests
    assert "the published recipe's input" in err and record["outcome"] == "pass"
    # one image (the recipe's), its cls token and the 16 sampled patch tokens (parity_vit_msn.SAMPLED_TOKENS)
    assert [o["elements"] for o in record["outputs"]] == [spec["hidden_size"], 16 * spec["hidden_size"]]


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=pytest.mark.xdist_group(n))
                                  for n in ("language-perceiver", "vision-perceiver-learned")])
def test_hub_config_gelu_is_a_named_known_divergence(name, tiny_cli, capsys, tmp_path):
    """--hub-config writes exact GELU where the original runs tanh GELU: the verdict names it
    (beside the HF class's own divergence, if any), measures it, and proves the weights
    against the original run with the hub config's numerics."""
    out = tmp_path / "hf"
    _, code, err = _convert(tiny_cli, capsys, name, out, "--hub-config", "--seed", "0")
    assert code == 3, err
    record = json.loads((out / "parity.json").read_text())
    names = [d["name"] for d in record["known_divergences"]]
    assert "the hub config's hidden_act='gelu'" in names and "hub config" in err
    assert (known_divergence(harness.case(name).variant) is not None) == (len(names) == 2)
    assert all(o["within"] for o in record["weights_check"])
    assert max(o["max_abs"] for o in record["outputs"]) > TOLERANCE["perceiver"]["atol"]
    assert record["config"]["hub_config"] is True and record["config"]["spec"]["hidden_act"] == "gelu"


def test_a_localisation_that_breaks_does_not_hide_the_verdict(tiny_cli, capsys, tmp_path, monkeypatch):
    import importlib

    from converters import localise
    from parity_fixtures import planted

    c = harness.case("vit-msn-small")
    monkeypatch.setattr(importlib.import_module("converters.vit_msn"), "FAMILY", planted.planted_family(c.variant))

    def broken(*args, **kwargs):
        raise RuntimeError("hook\nfailed")

    monkeypatch.setattr(localise, "localise", broken)
    out = tmp_path / "hf"
    _, code, err = _convert(tiny_cli, capsys, "vit-msn-small", out, "--seed", "0")
    assert code == 1 and "verify FAILED" in err and "localisation unavailable: RuntimeError: hook failed" in err, err
    record = json.loads((out / "parity.json").read_text())
    assert record["outcome"] == "fail" and record["localisation"] is None
    assert record["localisation_error"] == "RuntimeError: hook failed"
