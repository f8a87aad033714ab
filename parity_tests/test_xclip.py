"""X-CLIP beyond the generic matrix: the processor offline, the pickled training
config, the standalone models, the derived config and the q/k/v split."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, strategies as st
from packaging.version import Version

from converters import pipeline, reshape, xclip
from parity_fixtures import harness, parity_xclip, xclip_original
from parity_harness.compare import assert_measured, assert_parity, compare_outputs
from parity_tests.test_matrix import _converted_dir
from parity_harness.tolerances import TOLERANCE

pytestmark = pytest.mark.parity


def test_processor_offline_parity(xclip_variant, tmp_path):
    """The XCLIPProcessor the converter writes (PIL video processor, CLIP tokenizer built
    offline) round-trips through save_pretrained; its video tensors feed the converted
    model and the original alike. The tiny models have 512 token ids, so their text input
    comes from a stand-in CLIP-style tokenizer of that size; the real tokenizer against
    openai/CLIP's, and into full-vocabulary models, is test_clip_tokenizer.py."""
    c = harness.case(xclip_variant.name)
    processor = xclip.hf_processor(c.spec)
    assert isinstance(processor, transformers.XCLIPProcessor) and len(processor.tokenizer) == 49408
    processor.save_pretrained(tmp_path / "proc")
    reloaded = transformers.XCLIPProcessor.from_pretrained(tmp_path / "proc")
    frames = list(np.random.default_rng(0).integers(0, 256, (c.spec["num_frames"], 40, 52, 3), dtype=np.uint8))
    texts = ["playing sports", "eating spaghetti", "go shopping"]
    inputs = xclip.process(processor, texts, frames)
    again = xclip.process(reloaded, texts, frames)
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    size = c.spec["image_size"]
    assert tuple(inputs["pixel_values"].shape) == (1, c.spec["num_frames"], 3, size, size)
    stand_in = parity_xclip.write_tiny_clip_tokenizer(tmp_path / "tok", c.spec["vocab_size"])
    ids = stand_in(texts, padding=True, return_tensors="pt")["input_ids"]
    # The end token is the largest id, so the original's argmax pooling finds it.
    assert (ids.argmax(-1) == (ids == stand_in.eos_token_id).int().argmax(-1)).all()
    with torch.no_grad():
        hf = c.hf_model()(input_ids=ids, pixel_values=inputs["pixel_values"])
    # The original's tokenizer zero-pads to the full context; causal attention keeps the
    # padding from reaching the end token, where both sides pool.
    original_ids = F.pad(ids, (0, c.spec["max_position_embeddings"] - ids.shape[1]))
    reference = xclip_original.forward_outputs(c.original.build(c.spec, harness.SEED), inputs["pixel_values"],
                                               original_ids)
    assert_parity(compare_outputs({"logits_per_video": reference["logits_per_video"]},
                                                  {"logits_per_video": hf.logits_per_video}, **TOLERANCE["xclip"]))


def test_training_config_object_is_never_constructed(tmp_path):
    """Real files pickle a yacs CfgNode under 'config'; the loader returns the weights
    without importing or calling that object's class."""
    c = harness.case("xclip-base-patch32")
    path = tmp_path / "k400_32_8.pth"
    model = c.original.build(c.spec, harness.SEED)
    xclip_original.save_checkpoint(model, path, config=xclip_original.ConstructionProbe("loader"))
    xclip_original.PROBE_LOG.clear()
    with pytest.warns(UserWarning, match=r"config \(parity_fixtures\.xclip_original\.(ConstructionProbe|_probe_constructed)\)"):
        weights = pipeline.load_original_state_dict(path, c.variant)
    assert xclip_original.PROBE_LOG == [], "the pickled config object was constructed on load"
    assert weights.keys() == model.state_dict().keys()


# transformers 5.10.2 keyed its checkpoint conversion rules by class name instead of model type
# (conversion_mapping.py: "xclip_vision_model" -> "clip_vision_model" became "xCLIPVisionModel" ->
# "CLIPVisionModel", lowercase x, and the PrefixChange(prefix_to_remove="vision_model") rule moved to
# "CLIPVisionModel"), so no rule matches XCLIPVisionModel / XCLIPTextModel any more and the
# `vision_model.` / `text_model.` prefixes of XCLIPModel's weights are never stripped. Found with
# `upgrade-check --bisect` (README): 5.10.1 loads every key, 5.10.2 none; 5.10.1 had no xfail here
# before (it was `transformers >= 5`), and failed as a strict XPASS.
STANDALONE_BROKEN = Version(transformers.__version__) >= Version("5.10.2")
STANDALONE_KEYS = {"XCLIPVisionModel": 63, "XCLIPTextModel": 36}  # of the tiny 2-layer configs
STANDALONE_LOADS_NOTHING = pytest.mark.xfail(STANDALONE_BROKEN, strict=True, raises=AssertionError, reason=(
    "transformers >= 5.10.2: the conversion rule for the standalone models is spelled xCLIPVisionModel / "
    "xCLIPTextModel, so weights saved from XCLIPModel load nothing into XCLIPVisionModel / XCLIPTextModel "
    f"(measured on the tiny 2-layer configs: {STANDALONE_KEYS['XCLIPVisionModel']} of "
    f"{STANDALONE_KEYS['XCLIPVisionModel']} vision and {STANDALONE_KEYS['XCLIPTextModel']} of "
    f"{STANDALONE_KEYS['XCLIPTextModel']} text keys missing)."))


# Bisected with upgrade-check (README): 5.6.2 still drops the video (returns only input_ids and
# attention_mask), 5.7.0 keeps it; as `transformers < 5` this xfail let 5.0-5.6.2 fail.
@pytest.mark.xfail(Version(transformers.__version__) < Version("5.7.0"), strict=True, reason=(
    "transformers < 5.7.0: XCLIPProcessor(text=..., videos=...) silently returns no pixel_values (the video "
    "is dropped; images= works); from 5.7.0 videos go to the video processor."))
def test_processor_call_keeps_the_video(tmp_path):
    processor = xclip.hf_processor({"image_size": 14})
    frames = list(np.random.default_rng(0).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8))
    inputs = processor(text=["go shopping"], videos=frames, return_tensors="pt", padding=True)
    assert "pixel_values" in inputs, sorted(inputs)
    assert torch.equal(inputs["pixel_values"], xclip.process(processor, ["go shopping"], frames)["pixel_values"])


@STANDALONE_LOADS_NOTHING
def test_standalone_models_load_converted_weights(xclip_variant):
    c = harness.case(xclip_variant.name)
    missing = {}
    for cls in (transformers.XCLIPVisionModel, transformers.XCLIPTextModel):
        model, info = cls.from_pretrained(_converted_dir(c), output_loading_info=True)
        if STANDALONE_BROKEN:  # the reason's counts: every key missing
            quoted = STANDALONE_KEYS[cls.__name__]
            assert_measured(f"{cls.__name__} keys (missing, all)", (len(info["missing_keys"]), len(model.state_dict())),
                            (quoted, quoted))
        if info["missing_keys"]:
            missing[cls.__name__] = f"{len(info['missing_keys'])} of {len(model.state_dict())} keys missing"
    assert not missing, missing


@STANDALONE_LOADS_NOTHING
def test_vision_model_loads_what_xclip_model_saved(xclip_variant, tmp_path, record_keys):
    """Weights a user saves from XCLIPModel (save_pretrained) load into XCLIPVisionModel:
    nothing missing, and the vision tower computes what it computed inside XCLIPModel.
    The check `upgrade-check --bisect` runs to find the release that broke it (README)."""
    c = harness.case(xclip_variant.name)
    full = c.hf_model()
    full.save_pretrained(tmp_path)
    vision, info = transformers.XCLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    record_keys(info, compared_with="none missing")
    assert not info["missing_keys"], (f"{len(info['missing_keys'])} of {len(vision.state_dict())} XCLIPVisionModel "
                                      f"keys missing, e.g. {sorted(info['missing_keys'])[:3]}")
    frames = c.inputs["video"].flatten(0, 1)  # (videos * frames, C, H, W), as XCLIPModel feeds its vision tower
    with torch.no_grad():
        inside, alone = full.vision_model(pixel_values=frames), vision.eval()(pixel_values=frames)
    assert torch.equal(inside.pooler_output, alone.pooler_output)


def test_config_derivation_matches_published_numbers(xclip_variant):
    """hf_config derives heads (width // 64) and MLP widths (4 x width) as the original
    does; for the real configs that must reproduce every number the registry records."""
    spec = xclip_variant.config
    cfg = xclip.hf_config(spec)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.num_attention_heads, v.intermediate_size) == (spec["vision_num_attention_heads"], spec["vision_intermediate_size"])
    assert (t.num_attention_heads, t.intermediate_size) == (spec["text_num_attention_heads"], spec["text_intermediate_size"])
    assert (v.mit_num_attention_heads, v.mit_intermediate_size) == (spec["mit_num_attention_heads"], spec["mit_intermediate_size"])
    assert cfg.prompt_num_attention_heads == spec["prompt_num_attention_heads"]
    assert (v.image_size, v.patch_size, v.num_frames) == (spec["image_size"], spec["patch_size"], spec["num_frames"])


@given(heads=st.integers(1, 4), head_dim=st.integers(1, 8), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_in_proj_split_computes_multihead_attention(heads, head_dim, n, seed):
    """nn.MultiheadAttention (the original) equals attention computed from the split
    q/k/v projections and out_proj (HF's layout), for random widths; the split inverts."""
    width = heads * head_dim
    gen = torch.Generator().manual_seed(seed)
    mha = torch.nn.MultiheadAttention(width, heads).double()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(n, 1, width, generator=gen, dtype=torch.float64)  # (L, N, E) as the original
    want = mha(x, x, x, need_weights=False)[0][:, 0]
    qw, kw, vw = reshape.split_qkv(mha.in_proj_weight)
    qb, kb, vb = reshape.split_qkv(mha.in_proj_bias)
    assert torch.equal(reshape.merge_qkv(qw, kw, vw), mha.in_proj_weight)
    split = lambda t: t.view(n, heads, head_dim).transpose(0, 1)
    q, k, v = (split(F.linear(x[:, 0], w, b)) for w, b in ((qw, qb), (kw, kb), (vw, vb)))
    attended = torch.softmax(q @ k.transpose(1, 2) / head_dim ** 0.5, -1) @ v
    got = F.linear(attended.transpose(0, 1).reshape(n, width), mha.out_proj.weight, mha.out_proj.bias)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.slow
def test_cli_converts_and_verifies(tmp_path, capsys):
    """The CLI path for X-CLIP at full size (base patch32): original file -> output -> verify."""
    from converters import cli
    from converters.registry import get_variant

    variant = get_variant("xclip-base-patch32")
    hparams = parity_xclip.hparams(variant.config)
    path = tmp_path / "k400_32_8.pth"
    xclip_original.save_checkpoint(xclip_original.build_reference(hparams, 0), path, training_state=False)
    code = cli.main(["convert", variant.name, "--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--verify"])
    err = capsys.readouterr().err
    assert code == 0, err
    # the training config X-CLIP pickles, a yacs CfgNode, is named and never built
    assert "warning: k400_32_8.pth: skipped pickled object(s) that are not tensors, kept as inert data: " \
           "config (yacs.config.CfgNode)" in err, err
    assert "verify passed" in err, err
    record = json.loads((tmp_path / "hf" / "parity.json").read_text())
    assert record["outcome"] == "pass" and record["input"]["kind"] == "seeded"
    outputs = {o["output"]: o["elements"] for o in record["outputs"]}
    assert outputs["logits_per_video"] == 2 * 3  # the reference's 2 videos against its 3 texts
