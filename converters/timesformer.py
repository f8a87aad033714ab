"""TimeSformer (facebookresearch/TimeSformer, divided space-time) -> TimesformerForVideoClassification.

The original keeps q, k and v fused in one `qkv` Linear, stacked q;k;v with
heads contiguous inside each, which is exactly HF's `attention.attention.qkv`,
so the conversion is a rename: no tensor is split, transposed or copied.
"""
from __future__ import annotations

from typing import Mapping

from .family import Family, InputRecipe, PublishedValues, Source, Variant
from .rename import prefixed, rules

NAME = "timesformer"

_SIZES = {  # name: (image size, frames); all are ViT-B/16 (768 wide, 12 layers, 12 heads)
    "base": (224, 8),
    "hr": (448, 16),
    "large": (224, 96),
}
# The original README's large SSv2 model is TimeSformer_divST_64_224_SSv2: its
# time_embed has 64 rows. Upstream converts every large model with 96 frames, which
# cannot load that file; the registry follows the checkpoint.
_FRAMES_OVERRIDE = {("large", "ssv2"): 64}
_DATASETS = {  # name: (labels, hub label file)
    "k400": (400, "kinetics400-id2label.json"),
    "k600": (600, "kinetics600-id2label.json"),
    "ssv2": (174, "something-something-v2-id2label.json"),
}
# SSv2 frames are JPEGs decoded by cv2 (BGR, timesformer/datasets/utils.py:36) and the vit arch skips the
# configured channel reversal (ssv2.py:259 -> utils.py:84), so the SSv2 models were trained and tested on BGR.
_SSV2_BGR = ("trained and tested on BGR frames (cv2 decoding; REVERSE_INPUT_CHANNEL is skipped for vit): reverse "
             "the channels of RGB video before the processor (it cannot; parity_tests/test_processors.py measures it)")
_DROPBOX = "https://www.dropbox.com/s/{}?dl=1"
# Files listed in the original README (the upstream script names only base-k400's Drive copy).
_URLS = {
    ("base", "k400"): "https://drive.google.com/u/1/uc?id=17yvuYp9L4mn-HpIcK5Zo6K3UoOy1kA5l&export=download",
    ("hr", "k400"): _DROPBOX.format("6f0x172lpqy3oxt/TimeSformer_divST_16x16_448_K400.pyth"),
    ("large", "k400"): _DROPBOX.format("r1iuxahif3sgimo/TimeSformer_divST_96x4_224_K400.pyth"),
    ("base", "k600"): _DROPBOX.format("4h2qt41m2z3aqrb/TimeSformer_divST_8x32_224_K600.pyth"),
    ("hr", "k600"): _DROPBOX.format("ft1e92g2vhvxecv/TimeSformer_divST_16x16_448_K600.pyth"),
    ("large", "k600"): _DROPBOX.format("857rx6xeclxfhdg/TimeSformer_divST_96x4_224_K600.pyth"),
    ("base", "ssv2"): _DROPBOX.format("tybhuml57y24wpm/TimeSformer_divST_8_224_SSv2.pyth"),
    ("hr", "ssv2"): _DROPBOX.format("9t68uzk8w2fpfnv/TimeSformer_divST_16_448_SSv2.pyth"),
    ("large", "ssv2"): _DROPBOX.format("3f1rm2al8mhprwa/TimeSformer_divST_64_224_SSv2.pyth"),
}
# logits[0, :3] asserted by the upstream conversion script (atol 1e-4) on the first
# 8 frames of eating_spaghetti.npy at 224px, for every variant (hr included).
_PUBLISHED = {
    ("base", "k400"): (-0.3016, -0.7713, -0.4205),
    ("base", "k600"): (-0.7267, -0.7466, 3.2404),
    ("base", "ssv2"): (-0.9059, 0.6433, -3.1457),
    ("hr", "k400"): (-0.9617, -3.7311, -3.7708),
    ("hr", "k600"): (2.5273, 0.7127, 1.8848),
    ("hr", "ssv2"): (-3.6756, -0.7513, 0.7180),
    # large: upstream asserts placeholder zeros; nothing was published.
}
_PUBLISHED_ATOL = 1e-4
_REFERENCE_VIDEO = "hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti.npy"


def _filename(url: str) -> str:
    if "dropbox" in url:
        return url.rsplit("/", 1)[-1].split("?")[0]
    return "TimeSformer_divST_8x32_224_K400.pyth"  # the Drive copy of the README's base K400 file


def _variant(size: str, dataset: str) -> Variant:
    image_size, frames = _SIZES[size]
    frames = _FRAMES_OVERRIDE.get((size, dataset), frames)
    labels, label_file = _DATASETS[dataset]
    url = _URLS[(size, dataset)]
    values = _PUBLISHED.get((size, dataset))
    org = "fcakyon" if size == "large" else "facebook"  # upstream pushed the large models there
    return Variant(
        name=f"timesformer-{size}-finetuned-{dataset}",
        family=NAME,
        hub_id=f"{org}/timesformer-{size}-finetuned-{dataset}",
        config=dict(image_size=image_size, patch_size=16, num_frames=frames, hidden_size=768,
                    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    num_labels=labels, label_file=label_file),
        source=Source(url=url, filename=_filename(url),
                      container="torch", container_keys=("model", "module", "model_state"), prefix="model."),
        inputs=InputRecipe(
            description="first 8 frames of eating_spaghetti.npy (16 frames), VideoMAE processor with "
                        "mean=std=0.5, shortest edge 224, centre crop 224 (the same input for every variant)",
            files=(_REFERENCE_VIDEO,),
            params=dict(frames=8, image_size=224, image_mean=0.5, image_std=0.5),
        ),
        published=(PublishedValues(
            output="logits[0, :3]", values=values, atol=_PUBLISHED_ATOL,
            note="upstream conversion script" if values is not None
            else "nothing published: upstream asserts placeholder zeros [0, 0, 0]"),),
        notes="; ".join(filter(None, (
            "original README: 64 frames; upstream converts it with 96, which cannot load"
            if (size, dataset) in _FRAMES_OVERRIDE else "",
            _SSV2_BGR if dataset == "ssv2" else "",
            "the processor writes the original's normalisation (mean 0.45, std 0.225); the published values "
            "came from mean=std=0.5 (the upstream script's input, kept for them)"))),
    )


VARIANTS = tuple(_variant(size, ds) for size in _SIZES for ds in _DATASETS)


# ---- config -----------------------------------------------------------------

def hf_config(spec: Mapping, id2label: Mapping[int, str] | None = None):
    from transformers import TimesformerConfig

    labels = spec["num_labels"]
    id2label = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(labels)}
    return TimesformerConfig(
        image_size=spec["image_size"], patch_size=spec["patch_size"], num_frames=spec["num_frames"],
        hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], intermediate_size=spec["intermediate_size"],
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, attention_type="divided_space_time",
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )


# The original's test-time normalisation (timesformer/config/defaults.py:298, 304: DATA.MEAN 0.45,
# DATA.STD 0.225); the upstream script's 0.5/0.5 is its reference-input recipe, used by real_input.
IMAGE_MEAN, IMAGE_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)


def hf_processor(spec: Mapping, image_mean=IMAGE_MEAN, image_std=IMAGE_STD):
    try:
        from transformers import VideoMAEImageProcessorPil as Processor  # 5.x, no torchvision needed
    except ImportError:
        from transformers import VideoMAEImageProcessor as Processor  # 4.x: PIL/numpy already
    size = spec["image_size"]
    return Processor(image_mean=list(image_mean), image_std=list(image_std),
                     size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ---- rename table -------------------------------------------------------------

_BLOCK = (
    ("norm1.{p}", "layernorm_before.{p}"),
    ("attn.qkv.{p}", "attention.attention.qkv.{p}"),
    ("attn.proj.{p}", "attention.output.dense.{p}"),
    ("temporal_norm1.{p}", "temporal_layernorm.{p}"),
    ("temporal_attn.qkv.{p}", "temporal_attention.attention.qkv.{p}"),
    ("temporal_attn.proj.{p}", "temporal_attention.output.dense.{p}"),
    ("temporal_fc.{p}", "temporal_dense.{p}"),
    ("norm2.{p}", "layernorm_after.{p}"),
    ("mlp.fc1.{p}", "intermediate.dense.{p}"),
    ("mlp.fc2.{p}", "output.dense.{p}"),
)

RULES = rules(
    ("cls_token", "timesformer.embeddings.cls_token"),
    ("pos_embed", "timesformer.embeddings.position_embeddings"),
    ("time_embed", "timesformer.embeddings.time_embeddings"),
    ("patch_embed.proj.{p}", "timesformer.embeddings.patch_embeddings.projection.{p}"),
    *prefixed("blocks.{i}.", "timesformer.encoder.layer.{i}.", _BLOCK),
    ("norm.{p}", "timesformer.layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
)


def user_warnings(variant: Variant) -> tuple[str, ...]:
    """What `convert` tells the user about this variant (port differences the processor cannot fix)."""
    return (_SSV2_BGR,) if variant.name.endswith("-ssv2") else ()


def real_input(variant: Variant, files) -> dict:
    """The upstream reference input: the first frames of the spaghetti video, processed."""
    import numpy as np

    params = variant.inputs.params
    frames = list(np.load(files[0])[: params["frames"]])
    processor = hf_processor({"image_size": params["image_size"]}, (params["image_mean"],) * 3, (params["image_std"],) * 3)
    return dict(processor(frames, return_tensors="pt"))


def real_outputs(model, variant: Variant, files) -> dict:
    """What the published values are read from (see PublishedValues.output)."""
    return {"logits": model(**real_input(variant, files)).logits}


FAMILY = Family(
    name=NAME, variants=VARIANTS, tables={"TimesformerForVideoClassification": RULES},  # keys without `model.`
    hf_config=hf_config, hf_processor=hf_processor, real_input=real_input, real_outputs=real_outputs,
    user_warnings=user_warnings)
