"""ViViT (google-research/scenic, unfactorised "model 1", Flax) -> VivitForVideoClassification.

Data only: the converter comes with its family issue.
"""
from __future__ import annotations

from .registry import InputRecipe, PublishedValues, Source, Variant

FAMILY = "vivit"
MODEL_CLASS = "VivitForVideoClassification"

_URL = "https://storage.googleapis.com/scenic-bucket/vivit/kinetics_400/vivit_base_16x2_unfactorized/checkpoint"
_VIDEO = "hf://datasets/hf-internal-testing/spaghetti-video/eating_spaghetti_32_frames.npy"

# ViViT-B, tubelet 2x16x16. The original's nn.gelu is the tanh approximation: HF's
# default "gelu_fast" matches it (exact gelu does not).
_CONFIG = dict(image_size=224, num_frames=32, tubelet_size=(2, 16, 16), hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_fast", layer_norm_eps=1e-6,
               num_labels=400, label_file="kinetics400-id2label.json")

# logits[0, :5], atol 1e-4. Both sources call their numbers "taken from original model";
# they differ in preprocessing.
_PUBLISHED = (
    PublishedValues(
        "logits[0, :5]", (-1.0543, 2.0764, -0.2104, 0.4439, -0.9658), 1e-4,
        "upstream convert_vivit_flax_to_pytorch.py (also the integration test at 05920b01): pre-merge "
        "VivitImageProcessor, shortest edge 256, centre crop 224, bilinear, x*2/255 - 1 (do_zero_centering), "
        "no normalisation; this is the original scenic recipe and the reference for the conversion"),
    PublishedValues(
        "logits[0, :5]", (-0.9498, 2.7971, -1.4049, 0.1024, -1.8353), 1e-4,
        "upstream integration test test_modeling_vivit.py at 764cadc9 (newer values): VivitImageProcessor() "
        "current defaults, x/127.5 - 1 (offset) and then normalised again with mean=std=0.5 into [-3, 1]; "
        "the HF pipeline's numbers, not the original's (the double normalisation is inferred as the cause; "
        "which PR, #25174 or #25547, rewrote them is not known)"),
)

VARIANTS = (
    Variant(
        name="vivit-b-16x2-kinetics400",
        family=FAMILY,
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
