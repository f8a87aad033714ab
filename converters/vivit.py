"""ViViT (google-research/scenic, unfactorised "model 1", Flax) -> VivitForVideoClassification.

The loader flattens the Flax tree with "/" (`Transformer/encoderblock_0/...`). Flax
keeps attention kernels per head ((D, heads, head_dim) in, (heads, head_dim, D) out),
dense kernels as (in, out) and the tubelet Conv3D kernel as (T, H, W, Cin, Cout);
each becomes its torch layout through one op of `reshape`. LayerNorm `scale` is the
torch `weight`.

Key schema on disk: the transformers 4.x names (`vivit.encoder.layer.N.attention.
attention.query`, ...). They are what the published checkpoints carry, what 4.57
can load, what 5.x renames on load (conversion_mapping "ViTModel") and what 5.x's
own save_pretrained writes back (it reverts that mapping), so one converted
directory loads under both lines and the output does not depend on the installed
version. The family's `installed_schema` gives the installed line's names for an
in-memory load_state_dict (converters/vit_hf5_names.py).
"""
from __future__ import annotations

from typing import Mapping

from . import vit_hf5_names
from .family import Family, InputRecipe, PublishedValues, Source, Variant
from .rename import prefixed, rules
from .reshape import (CONV_KERNEL_CHANNELS_LAST_TO_FIRST, HEADS_BIAS_TO_LINEAR, HEADS_IN_KERNEL_TO_LINEAR,
                      HEADS_OUT_KERNEL_TO_LINEAR, MATMUL_KERNEL_TO_LINEAR)

NAME = "vivit"
MODEL_CLASS = "VivitForVideoClassification"

_URL = "https://storage.googleapis.com/scenic-bucket/vivit/kinetics_400/vivit_base_16x2_unfactorized/checkpoint"
_VIDEO = "hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti_32_frames.npy"

# ViViT-B, tubelet 2x16x16 (frames x patch x patch). The original's nn.gelu is the tanh
# approximation: HF's "gelu_fast" is the same formula (exact gelu is not).
_CONFIG = dict(image_size=224, num_frames=32, tubelet_frames=2, patch_size=16, hidden_size=768,
               num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_fast",
               layer_norm_eps=1e-6, num_labels=400, label_file="kinetics400-id2label.json")

# The two preprocessing recipes behind the two published value sets (VivitImageProcessor
# arguments). The script's is the original scenic one: pixels in [-1, 1], no normalisation.
SCRIPT_RECIPE = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=2,
                     rescale_factor=1 / 127.5, offset=True, do_normalize=False)
INTEGRATION_TEST_RECIPE = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=2,
                               rescale_factor=1 / 127.5, offset=True, do_normalize=True,
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

# logits[0, :5], atol 1e-4. Both sources call their numbers "taken from original model";
# they differ in preprocessing, so each is read from its own output (see real_outputs).
_PUBLISHED = (
    PublishedValues(
        "logits[0, :5]", (-1.0543, 2.0764, -0.2104, 0.4439, -0.9658), 1e-4,
        "upstream convert_vivit_flax_to_pytorch.py (also the integration test at 05920b01): pre-merge "
        "VivitImageProcessor, shortest edge 256, centre crop 224, bilinear, x*2/255 - 1 (do_zero_centering), "
        "no normalisation; this is the original scenic recipe and the reference for the conversion"),
    PublishedValues(
        "logits_integration_test[0, :5]", (-0.9498, 2.7971, -1.4049, 0.1024, -1.8353), 1e-4,
        "upstream integration test test_modeling_vivit.py at 764cadc9 (newer values): VivitImageProcessor() "
        "current defaults, x/127.5 - 1 (offset) and then normalised again with mean=std=0.5 into [-3, 1]; "
        "the HF pipeline's numbers, not the original's (the double normalisation is inferred as the cause; "
        "which PR, #25174 or #25547, rewrote them is not known); checked on its own input "
        "(INTEGRATION_TEST_RECIPE) as the output logits_integration_test"),
)

VARIANTS = (
    Variant(
        name="vivit-b-16x2-kinetics400",
        family=NAME,
        hub_id="google/vivit-b-16x2-kinetics400",
        config=_CONFIG,
        source=Source(url=_URL, filename="checkpoint", container="flax_msgpack",
                      container_keys=("optimizer/target", "params")),
        inputs=InputRecipe(
            description="all 32 frames of eating_spaghetti_32_frames.npy; the script's (pre-merge) processor: "
                        "shortest edge 256, centre crop 224, bilinear, rescale x*2/255 - 1, no normalisation "
                        "(scenic kinetics400 config, dmvr default mean 0 / std 1)",
            files=(_VIDEO,),
            params=dict(frames=32, shortest_edge=256, crop_size=224, resample="bilinear",
                        rescale_factor=2 / 255, offset=-1.0, do_normalize=False),
        ),
        published=_PUBLISHED,
        notes="the hub preprocessor_config differs from both recipes (shortest_edge 224, do_normalize true, "
              "mean/std 0.5, rescale_factor 1/127.5 since commit 8a7171a), so from_pretrained preprocessing "
              "is a third variant; the script's get_processor assertions fail against the current processor",
    ),
)


# ---- config ---------------------------------------------------------------------------

def hf_config(spec: Mapping, id2label: Mapping[int, str] | None = None):
    from transformers import VivitConfig

    labels = spec["num_labels"]
    id2label = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(labels)}
    patch = spec["patch_size"]
    return VivitConfig(
        image_size=spec["image_size"], num_frames=spec["num_frames"], tubelet_size=[spec["tubelet_frames"], patch, patch],
        hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], intermediate_size=spec["intermediate_size"],
        hidden_act=spec["hidden_act"], layer_norm_eps=spec["layer_norm_eps"], qkv_bias=True,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )


def hf_processor(spec: Mapping, recipe: Mapping = SCRIPT_RECIPE):
    """VivitImageProcessor with the original's recipe, scaled to the model's size
    (256/224 shortest edge before the centre crop). Pure numpy/PIL on both lines."""
    from transformers import VivitImageProcessor

    size = spec["image_size"]
    return VivitImageProcessor(**{**recipe, "size": {"shortest_edge": round(size * 256 / 224)},
                                  "crop_size": {"height": size, "width": size}})


# ---- rule table ---------------------------------------------------------------------------
# Each kernel goes to its torch layout through one op; biases and norms are copied.

def _dense(src: str, dst: str, kernel_op=MATMUL_KERNEL_TO_LINEAR, bias_op=None):
    return ((f"{src}/kernel", f"{dst}.weight", kernel_op), (f"{src}/bias", f"{dst}.bias", bias_op))


def _norm(src: str, dst: str):
    return ((f"{src}/scale", f"{dst}.weight"), (f"{src}/bias", f"{dst}.bias"))


def _heads_in(src: str, dst: str):  # Flax attention q/k/v: (D, heads, head_dim) kernel, (heads, head_dim) bias
    return _dense(src, dst, HEADS_IN_KERNEL_TO_LINEAR, HEADS_BIAS_TO_LINEAR)


_ATTN = "MultiHeadDotProductAttention_0"
_BLOCK = (  # scenic encoderblock -> HF 4.x VivitLayer
    *_norm("LayerNorm_0", "layernorm_before"),
    *_heads_in(f"{_ATTN}/query", "attention.attention.query"),
    *_heads_in(f"{_ATTN}/key", "attention.attention.key"),
    *_heads_in(f"{_ATTN}/value", "attention.attention.value"),
    *_dense(f"{_ATTN}/out", "attention.output.dense", HEADS_OUT_KERNEL_TO_LINEAR),  # (heads, head_dim, D)
    *_norm("LayerNorm_1", "layernorm_after"),
    *_dense("MlpBlock_0/Dense_0", "intermediate.dense"),
    *_dense("MlpBlock_0/Dense_1", "output.dense"),
)

RULES = rules(
    ("cls", "vivit.embeddings.cls_token"),
    *_dense("embedding", "vivit.embeddings.patch_embeddings.projection", CONV_KERNEL_CHANNELS_LAST_TO_FIRST),  # THWIO
    ("Transformer/posembed_input/pos_embedding", "vivit.embeddings.position_embeddings"),
    *prefixed("Transformer/encoderblock_{i}/", "vivit.encoder.layer.{i}.", _BLOCK),
    *_norm("Transformer/encoder_norm", "vivit.layernorm"),
    *_dense("output_projection", "classifier"),
)


# ---- the published check -------------------------------------------------------------------

def real_input(variant: Variant, files, recipe: Mapping = SCRIPT_RECIPE) -> dict:
    """The reference video (all 32 frames) through the recipe's processor."""
    import numpy as np

    frames = list(np.load(files[0])[: variant.inputs.params["frames"]])
    return dict(hf_processor(variant.config, recipe)(frames, return_tensors="pt"))


def real_outputs(model, variant: Variant, files) -> dict:
    """`logits` on the script's input (the original recipe), `logits_integration_test`
    on the newer integration test's input: each published set on its own input."""
    return {"logits": model(**real_input(variant, files, SCRIPT_RECIPE)).logits,
            "logits_integration_test": model(**real_input(variant, files, INTEGRATION_TEST_RECIPE)).logits}


FAMILY = Family(
    name=NAME, variants=VARIANTS, tables={MODEL_CLASS: RULES},  # the flattened scenic tree ("/"-joined)
    hf_config=hf_config, hf_processor=hf_processor, real_input=real_input, real_outputs=real_outputs,
    installed_schema=vit_hf5_names.installed_schema(MODEL_CLASS, "vivit."))
