"""`Original.recipe_inputs`: the published recipe's input (the family's `real_input` on the recipe
files) in the original's layout, for `convert --verify` (#16).

Offline, on stand-in recipe files the tests make (random videos and images in the hub cache
and the download cache, read back through downloads.cached_only):

* at each variant's full-size spec, `hf_forward` on `recipe_inputs(...)` hands the HF model
  exactly the tensors `real_input` gives: a stub model records its call (no full-size build);
* where the recipe does not fit the spec (stated below, with why), it is None;
* on the tiny models, with the recipe scaled to their sizes, the original's `forward` and the
  converted model's `hf_forward` agree on it within the family tolerance: the original takes
  the layout `recipe_inputs` gives (X-CLIP: zero-padded context-length ids beside the HF
  tokenizer's own; Perceiver flow: frames read back off the patches).
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from converters import downloads, pipeline
from converters.registry import all_variants, family, known_divergence
from parity_fixtures import harness
from parity_fixtures.parity_xclip import write_tiny_clip_tokenizer
from parity_harness.compare import assert_parity, compare_outputs
from parity_tests.test_real_checkpoints import _put_in_cache

# Recipes that do not fit their own variant at full size: TimeSformer's one recipe is the 224 px,
# 8-frame video for every variant (the hr models take 448 px and 16 frames, the large ones 96 or 64
# frames; both sides would interpolate their embeddings and use only some rows), and the
# multimodal Perceiver has no recipe (the conversion script fed unseeded randn).
NOT_FITTING = {"timesformer-hr-finetuned-k400", "timesformer-hr-finetuned-k600", "timesformer-hr-finetuned-ssv2",
               "timesformer-large-finetuned-k400", "timesformer-large-finetuned-k600",
               "timesformer-large-finetuned-ssv2", "multimodal-perceiver"}


def _input_signature(v) -> tuple:
    """What the recipe's input and its fit depend on; one variant per signature is tested."""
    keys = ("model_class", "image_size", "num_frames", "train_height", "max_position_embeddings", "vocab_size")
    return v.family, v.inputs.files, repr(dict(v.inputs.params)), tuple(v.config.get(k) for k in keys)


def _representatives() -> list:
    seen, chosen = set(), []
    for v in all_variants():
        if _input_signature(v) not in seen:
            seen.add(_input_signature(v))
            chosen.append(pytest.param(v, id=v.name, marks=pytest.mark.xdist_group(v.name)))
    return chosen


REPRESENTATIVES = _representatives()


# ---- stand-in recipe files ------------------------------------------------------------------

def _video_npy(frames: int = 32, height: int = 120, width: int = 160) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(frames).integers(0, 256, (frames, height, width, 3), dtype=np.uint8))
    return buffer.getvalue()


def _image(url: str, height: int, width: int) -> bytes:
    """A random RGB image in the format the URL names (PNG, JPEG)."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(len(url)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG" if url.endswith(".jpg") else "PNG")
    return buffer.getvalue()


def _stand_in_bytes(url: str) -> bytes:
    if url.endswith(".npy"):
        return _video_npy()  # 32 frames: every recipe reads its first 8, 16 or 32
    if "sintel" in url:
        return _image(url, 436, 512)  # at least the flow model's 368 x 496 train size (top-left crop)
    return _image(url, 300, 400)


@pytest.fixture
def recipe_files(offline_hub_cache, tmp_path, monkeypatch):
    """files(variant): the stand-ins of its recipe files, cached, as downloads.cached_only finds them."""
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))

    def files(variant):
        for url in variant.inputs.files:
            if downloads.parse_hub_url(url):
                offline_hub_cache(url, _stand_in_bytes(url))
            else:
                _put_in_cache(url, _stand_in_bytes(url))
        found = downloads.cached_only(variant.inputs.files)
        assert found is not None, "the stand-in files are not where cached_only looks"
        return found

    return files


# ---- what hf_forward hands the HF model -------------------------------------------------------

class _Called(Exception):
    pass


class _RecordingModel(torch.nn.Module):
    """Stands in for the full-size HF model: records the call's keyword arguments and stops."""

    def forward(self, **kwargs):
        self.kwargs = kwargs
        raise _Called


def _recording_model(spec):
    # Perceiver's hf_forward picks its input layout by the HF class name.
    cls = type(spec["model_class"], (_RecordingModel,), {}) if "model_class" in spec else _RecordingModel
    return cls()


def _fed(original, spec, inputs) -> dict:
    model = _recording_model(spec)
    with pytest.raises(_Called):
        original.hf_forward(model, inputs)
    return model.kwargs


def _assert_same_tensors(fed: dict, expected: dict) -> None:
    """The same names, shapes and values; float dtypes equal (integer ids and masks may be int32
    where real_input gives int64: the Haiku original takes int32, torch reads either)."""
    assert set(fed) == set(expected), (sorted(fed), sorted(expected))
    for name, want in expected.items():
        got = fed[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.dtype == want.dtype or not (got.is_floating_point() or want.is_floating_point()), (
            name, got.dtype, want.dtype)
        assert torch.equal(got.to(want.dtype), want), (name, (got.to(want.dtype) != want).sum().item())


@pytest.mark.parametrize("recipe_variant", REPRESENTATIVES)
def test_hf_forward_on_recipe_inputs_feeds_real_input(recipe_variant, recipe_files):
    """At the full-size spec the HF model gets exactly real_input's tensors; None where the
    recipe does not fit (NOT_FITTING)."""
    variant = recipe_variant
    spec = pipeline.spec_of(variant)
    original = harness.original(variant.family)
    files = recipe_files(variant)
    inputs = original.recipe_inputs(variant, spec, files)
    if variant.name in NOT_FITTING:
        assert inputs is None
        return
    assert inputs is not None, "the recipe fits its own full-size variant"
    _assert_same_tensors(_fed(original, spec, inputs), family(variant.family).real_input(variant, files))
    if spec.get("model_class") == "PerceiverForMaskedLM":  # the masked argmax reads the hub tokenizer's span
        (a, b), (rows, cols) = variant.inputs.params["hub_tokenizer_mask"], inputs["masked"]
        assert rows.tolist() == [[0] * (b - a)] and cols.tolist() == [list(range(a, b))]


@pytest.mark.parametrize("recipe_variant", REPRESENTATIVES)
def test_recipe_does_not_fit_the_tiny_spec(recipe_variant, recipe_files):
    """The registry's recipe makes inputs of the full-size model's sizes (X-CLIP also token ids up
    to 49407): a shrunk spec gets None, never an input it cannot take."""
    variant = recipe_variant
    original = harness.original(variant.family)
    assert original.recipe_inputs(variant, original.tiny_spec(variant), recipe_files(variant)) is None


# ---- the original takes that layout: the tiny models on the recipe scaled to them ---------------

def _scaled_to(variant, spec: dict):
    """The variant with the tiny spec and its recipe's sizes set to the spec's."""
    params = dict(variant.inputs.params)
    sizes = {"frames": spec.get("num_frames"), "image_size": spec.get("image_size"),
             "max_length": spec.get("max_position_embeddings")}
    params.update({k: v for k, v in sizes.items() if k in params and v is not None})
    if "train_size" in params:
        params["train_size"] = (spec["train_height"], spec["train_width"])
    return dataclasses.replace(variant, config=spec, inputs=dataclasses.replace(variant.inputs, params=params))


# Behind `slow` (5-10 s each, a Haiku or Flax compile for the batch of one): the recipes whose
# layout change is a plain transpose, which the matrix already proves hf_forward undoes.
_SLOW_SCALED = {"vivit-b-16x2-kinetics400", "vision-perceiver-learned", "vision-perceiver-fourier",
                "vision-perceiver-conv"}
SCALED = [pytest.param(*p.values, id=p.id, marks=[*p.marks, *([pytest.mark.slow] if p.id in _SLOW_SCALED else [])])
          for p in REPRESENTATIVES if p.id not in NOT_FITTING]


@pytest.mark.parametrize("recipe_variant", SCALED)
def test_original_and_converted_agree_on_the_scaled_recipe(recipe_variant, recipe_files, tmp_path):
    """The tiny original (forward; port_forward for a known divergence) and the converted model
    agree on recipe_inputs within the family tolerance, with the shapes output_shapes states:
    the original takes the layout recipe_inputs gives, at a batch of one."""
    variant = recipe_variant
    c = harness.case(variant.name)
    tiny = _scaled_to(variant, c.spec)
    files = recipe_files(variant)
    extra = {}
    if variant.family == "xclip":  # the real tokenizer's ids do not fit the tiny vocabulary
        extra["tokenizer"] = write_tiny_clip_tokenizer(tmp_path / "tokenizer", c.spec["vocab_size"])
    inputs = c.original.recipe_inputs(tiny, c.spec, files, **extra)
    assert inputs is not None, "the scaled recipe fits the tiny spec"
    model = c.original.build(c.spec, harness.SEED)
    expected = (c.original.port_forward(model, inputs) if known_divergence(variant)
                else c.original.forward(model, inputs))
    actual = c.original.hf_forward(c.hf_model(), inputs)
    assert {k: tuple(v.shape) for k, v in expected.items()} == c.original.output_shapes(c.spec, inputs)
    assert_parity(compare_outputs(expected, actual, **c.original.tolerance),
                  f"{variant.name}: original vs converted on the recipe scaled to the tiny model")
