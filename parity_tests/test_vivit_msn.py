"""Family checks for ViViT and ViT-MSN beyond the generic matrix: the attention layout
against flax's own layer, the GELU variant, the MSN container (target_encoder vs
encoder, the dropped projection head), the on-disk key schema, and the real tier's
per-recipe outputs run end to end from caches on the tiny models."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from converters import downloads, state_dicts, torch_files, pipeline, vit_msn, vivit
from converters.family import PublishedValues
from converters.registry import get_variant
from converters.rename import RenameError
from fixtures import harness
from parity_harness.compare import assert_measured, assert_parity, compare_outputs
from test_real_checkpoints import check_published

VIVIT = "vivit-b-16x2-kinetics400"
MSN = tuple(v.name for v in vit_msn.VARIANTS)
# On the worker that runs the matrix's checks of the same variant (--dist=loadgroup):
# one tiny build, and one flax compilation, per variant.
on_vivit = pytest.mark.xdist_group(VIVIT)


def grouped(*names):
    return [pytest.param(n, id=n, marks=pytest.mark.xdist_group(n)) for n in names]


# ---- ViViT ------------------------------------------------------------------------------------

# A fifth of the profile's examples: flax runs eagerly here and compiles each op for every new
# shape (~0.8 s an example); the layout maps themselves are covered in test_properties.py.
@pytest.mark.slow
@settings(max_examples=max(4, settings().max_examples // 5))
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 8), tokens=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_vivit_attention_layout_matches_flax_layer(heads, head_dim, tokens, seed):
    """flax's MultiHeadDotProductAttention (what scenic calls) with random params equals
    F.linear + scaled dot-product attention on the weights the converter produces."""
    import flax.linen as nn

    d = heads * head_dim + 3  # the model width need not equal heads * head_dim in flax
    rng = np.random.RandomState(seed)
    shapes = {"query": (d, heads, head_dim), "key": (d, heads, head_dim), "value": (d, heads, head_dim),
              "out": (heads, head_dim, d)}
    params = {name: {"kernel": (rng.standard_normal(shape) / np.sqrt(d)).astype(np.float32),  # (no init: it compiles)
                     "bias": rng.standard_normal(shape[1:] if name != "out" else (d,)).astype(np.float32)}
              for name, shape in shapes.items()}
    x = rng.standard_normal((2, tokens, d)).astype(np.float32)
    layer = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=heads * head_dim)
    want = np.asarray(layer.apply({"params": params}, x, x))

    block = f"Transformer/encoderblock_0/{vivit._ATTN}"
    converted = vivit.FAMILY.convert({f"{block}/{name}/{leaf}": torch.tensor(params[name][leaf])
                                      for name in shapes for leaf in ("kernel", "bias")})
    hf = {"query": "attention.attention.query", "key": "attention.attention.key",
          "value": "attention.attention.value", "out": "attention.output.dense"}
    w = {f"{name}.{kind}": converted[f"vivit.encoder.layer.0.{hf[name]}.{kind}"]
         for name in shapes for kind in ("weight", "bias")}
    t = torch.tensor(x)
    q, k, v = (F.linear(t, w[f"{n}.weight"], w[f"{n}.bias"]).unflatten(-1, (heads, head_dim)).transpose(1, 2)
               for n in ("query", "key", "value"))
    got = F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), w["out.weight"], w["out.bias"])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-4)


def _with_activation(c: harness.Case, act: str):
    model = pipeline.hf_model_class(c.variant)(vivit.hf_config({**c.spec, "hidden_act": act})).eval()
    model.load_state_dict(pipeline.for_installed_transformers(c.variant, c.converted), strict=True)
    return model


def test_vivit_config_keeps_tanh_gelu():
    assert vivit.hf_config(get_variant(VIVIT).config).hidden_act == "gelu_fast"


@on_vivit
def test_vivit_tanh_gelu_variants_agree():
    """HF's other tanh-approximation names compute the same model (rounding only)."""
    c = harness.case(VIVIT)
    for act in ("gelu_new", "gelu_pytorch_tanh"):
        assert_parity(compare_outputs(c.reference, c.original.hf_forward(_with_activation(c, act), c.inputs),
                                                      **c.original.tolerance), act)


# The tiny model's logits against the original: exact GELU (max abs, elements out of
# tolerance of 800) and the converted gelu_fast (max abs).
EXACT_GELU = {"max_abs": "5.4e-4", "mismatched": 460, "gelu_fast": "9.5e-7"}


@on_vivit
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "not a port difference but the reason for gelu_fast: the original's nn.gelu is the tanh approximation; "
    f"with HF's exact 'gelu' the tiny model's logits differ by up to {EXACT_GELU['max_abs']} "
    f"({EXACT_GELU['mismatched']} of 800 out of tolerance; gelu_fast: {EXACT_GELU['gelu_fast']}). A field note's "
    "smaller figures were not reproduced."))
def test_vivit_exact_gelu_breaks_parity():
    c = harness.case(VIVIT)
    (fast,) = compare_outputs(c.reference, c.hf_outputs(), **c.original.tolerance)
    (exact,) = compare_outputs(c.reference, c.original.hf_forward(_with_activation(c, "gelu"), c.inputs),
                               **c.original.tolerance)
    assert_measured("gelu_fast", fast.max_abs, EXACT_GELU["gelu_fast"])
    assert_measured("exact gelu", exact.max_abs, EXACT_GELU["max_abs"])
    assert_measured("exact gelu, elements out of tolerance", (exact.mismatched, exact.total),
                    (EXACT_GELU["mismatched"], 800))
    assert_parity([exact], "exact gelu")


def test_vivit_script_recipe_is_the_registry_recipe():
    """The processor arguments behind `logits` say what the registry's InputRecipe says."""
    p, r = get_variant(VIVIT).inputs.params, vivit.SCRIPT_RECIPE
    assert (r["size"]["shortest_edge"], r["crop_size"]["height"], r["resample"]) == (p["shortest_edge"], p["crop_size"], 2)
    assert r["rescale_factor"] == p["rescale_factor"] and r["offset"] == (p["offset"] == -1.0)  # x * 2/255 - 1
    assert r["do_normalize"] == p["do_normalize"] is False
    assert vivit.INTEGRATION_TEST_RECIPE == {**r, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


@pytest.mark.parametrize("layers", [1, 3, 12])
def test_vivit_repeated_block_tree_is_the_traced_tree(layers):
    """ViViTOriginal.on_meta (one traced block, repeated) names and shapes what a direct trace
    of the reference at that depth gives."""
    from fixtures import parity_vivit

    spec = {**get_variant(VIVIT).config, "num_hidden_layers": layers}
    shapes = lambda tree: {k: tuple(v.shape) for k, v in tree.items()}  # noqa: E731
    assert shapes(parity_vivit.ORIGINAL.on_meta(spec)) == shapes(parity_vivit.traced_on_meta(spec))


@on_vivit
def test_vivit_pre_logits_is_refused():
    """A scenic config with representation_size has pre_logits, which VivitForVideoClassification
    cannot hold: the rename table refuses it instead of dropping a layer silently."""
    tree = harness.original("vivit").on_meta(harness.case(VIVIT).spec)
    tree["pre_logits/kernel"] = torch.empty(32, 32, device="meta")
    with pytest.raises(RenameError, match="pre_logits/kernel"):
        vivit.FAMILY.convert(tree)


# ---- ViT-MSN ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", grouped(*MSN))
def test_msn_projection_head_is_dropped_on_purpose(name):
    c = harness.case(name)
    original = pipeline.load_original_state_dict(c.checkpoint, c.variant)
    head = [k for k in original if k.startswith("fc.")]
    assert len(head) == 16  # fc1, fc2, fc3 (weight, bias); bn1, bn2 (weight, bias, running stats, count)
    kept = sum(v.numel() for k, v in original.items() if k not in head)
    assert sum(v.numel() for v in c.converted.values()) == kept  # the head and nothing else
    with pytest.raises(RenameError, match="head.weight"):  # a key with no rule is still refused
        vit_msn.FAMILY.convert({**original, "head.weight": torch.zeros(1)})


def _load_entry(c: harness.Case, entry: str):
    return state_dicts.find_state_dict(torch_files.load_torch_checkpoint(c.checkpoint), (entry,), "module.")


@pytest.mark.parametrize("name", grouped(*MSN[:2]))
def test_msn_reads_target_encoder_not_encoder(name):
    """The loader takes target_encoder (the EMA weights the original evaluates); a converter
    reading the online `encoder` must fail parity."""
    c = harness.case(name)
    target = vit_msn.FAMILY.convert(_load_entry(c, "target_encoder"))
    assert target.keys() == c.converted.keys() and all(torch.equal(target[k], c.converted[k]) for k in target)
    model = pipeline.hf_model_class(c.variant)(c.hf_config()).eval()
    model.load_state_dict(pipeline.for_installed_transformers(c.variant, vit_msn.FAMILY.convert(_load_entry(c, "encoder"))))
    diffs = compare_outputs(c.reference, c.original.hf_forward(model, c.inputs), **c.original.tolerance)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_parity(diffs, "encoder instead of target_encoder")


# ---- key schema -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", grouped(VIVIT, MSN[0]))
def test_on_disk_names_are_what_save_pretrained_writes(name, tmp_path):
    """The converter writes the names this transformers line's own save_pretrained writes
    (4.x: its module names; 5.x: the 4.x names, by reverting its load-time renaming), so a
    converted directory and a re-saved one carry the same keys on either line."""
    from safetensors import safe_open

    c = harness.case(name)
    c.hf_model().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        saved = set(fh.keys())
    assert saved == set(c.converted)
    assert not any(".layers." in k or "_proj." in k for k in saved)  # 4.x names, not 5.x


# ---- the real tier on the tiny models, end to end from caches -----------------------------------

def _cache_file(url: str, data: bytes, put_hub):
    """`put_hub` is the offline_hub_cache fixture: hub files go there, URLs to our cache."""
    if url.startswith("hf://"):
        put_hub(url, data)
    else:
        path = downloads.cache_path_for(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))  # the hub cache: offline_hub_cache


def _tiny_variant(tiny, c: harness.Case, published, tmp_path):
    """`tiny` with its published values, the tiny checkpoint cached under the real URL."""
    checkpoint = downloads.cache_path_for(c.variant.source.url, c.variant.source.filename)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(c.checkpoint.read_bytes())
    return dataclasses.replace(tiny, published=tuple(published))


def _vivit_tier_case(tmp_path, monkeypatch, put_hub):
    """The tiny ViViT, a random 32-frame video in the caches, and each published set
    replaced by the reference's logits on that set's own recipe."""
    _offline_caches(tmp_path, monkeypatch)
    c = harness.case(VIVIT)
    video = np.random.default_rng(0).integers(0, 256, (32, 40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, video)
    _cache_file(c.variant.inputs.files[0], buffer.getvalue(), put_hub)
    files = [downloads.fetch(f, progress=False) for f in c.variant.inputs.files]
    tiny = dataclasses.replace(c.variant, config=c.spec, inputs=dataclasses.replace(
        c.variant.inputs, params={**c.variant.inputs.params, "frames": c.spec["num_frames"]}))
    reference = c.original.build(c.spec, harness.SEED)
    recipes = {"logits": vivit.SCRIPT_RECIPE, "logits_integration_test": vivit.INTEGRATION_TEST_RECIPE}

    def expected(recipe):
        pixels = vivit.real_input(tiny, files, recipe)["pixel_values"].permute(0, 1, 3, 4, 2)  # to (B, T, H, W, C)
        return c.original.forward(reference, pixels)["logits"]

    published = []
    for p in c.variant.published:
        name = p.output.split("[")[0]
        published.append(PublishedValues(p.output, tuple(harness.select({name: expected(recipes[name])}, p.output)
                                                          .flatten().tolist()), 1e-4, p.note))
    return _tiny_variant(tiny, c, published, tmp_path)


@on_vivit
def test_vivit_tier_checks_each_published_set_on_its_recipe(tmp_path, monkeypatch, offline_hub_cache):
    check_published(_vivit_tier_case(tmp_path, monkeypatch, offline_hub_cache), False, tmp_path, monkeypatch)


@on_vivit
def test_vivit_tier_fails_with_the_recipes_swapped(tmp_path, monkeypatch, offline_hub_cache):
    """The two recipes give different inputs ([-1, 1] vs [-3, 1]): swapping the published
    sets between them must fail, so each set is really read from its own input."""
    variant = _vivit_tier_case(tmp_path, monkeypatch, offline_hub_cache)
    a, b = variant.published
    swapped = (dataclasses.replace(a, values=b.values), dataclasses.replace(b, values=a.values))
    with pytest.raises(AssertionError, match="out of tolerance"):
        check_published(dataclasses.replace(variant, published=swapped), False, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", grouped(MSN[0], MSN[3]))
def test_msn_tier_runs_end_to_end_from_caches(name, tmp_path, monkeypatch, offline_hub_cache):
    """The COCO image recipe, the converted backbone and `last_hidden_state[0, 0, :3]`
    against the tiny reference on the same processed image; the small model's
    integration-test logits (values None) are not checked."""
    from PIL import Image

    _offline_caches(tmp_path, monkeypatch)
    c = harness.case(name)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    _cache_file(c.variant.inputs.files[0], buffer.getvalue(), offline_hub_cache)
    files = [downloads.fetch(f, progress=False) for f in c.variant.inputs.files]
    tiny = dataclasses.replace(c.variant, config=c.spec)
    pixels = vit_msn.real_input(tiny, files)["pixel_values"]
    tokens = harness.original("vit_msn").build(c.spec, harness.SEED).forward_tokens(pixels).detach()
    published = [dataclasses.replace(p, values=None if p.values is None else
                                     tuple(harness.select({"last_hidden_state": tokens}, p.output).tolist()))
                 for p in c.variant.published]
    compared = []
    check_published(_tiny_variant(tiny, c, published, tmp_path), False, tmp_path, monkeypatch, record=compared.extend)
    # What the tier compared: the three hidden-state values, and not the values-None logits.
    assert [(d.key, d.total) for d in compared] == [("last_hidden_state[0, 0, :3]", 3)]


def test_msn_small_integration_logits_are_not_a_reference():
    small = get_variant("vit-msn-small")
    assert [p.output for p in small.published if p.values is None] == ["logits[0, :3]"]
    assert "NOT a conversion reference" in small.published[1].note
