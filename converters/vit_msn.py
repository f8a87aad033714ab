"""ViT-MSN (facebookresearch/msn, DeiT naming) -> ViTMSNModel (the backbone, no classifier).

The converter reads the EMA `target_encoder` of the training container (the loader
strips its `module.` prefix), splits the fused qkv and drops the MSN projection head
`fc.*`, which has no HF counterpart. Key schema on disk: transformers 4.x names, as
for ViViT (see converters/vit_hf5_names.py): the published checkpoints' names, loadable
by 4.57 and renamed on load by 5.x.
"""
from __future__ import annotations

from typing import Mapping

from . import vit_hf5_names
from .family import Family, InputRecipe, PublishedValues, Source, Variant
from .rename import prefixed, rules
from .reshape import SPLIT_QKV

NAME = "vit_msn"
MODEL_CLASS = "ViTMSNModel"

_WIDTHS = {  # hidden, intermediate, layers, heads
    "s": (384, 1536, 12, 6),
    "b": (768, 3072, 12, 12),
    "l": (1024, 4096, 24, 16),
}
# name: (file under dl.fbaipublicfiles.com/msn/, width, patch,
#        last_hidden_state[0, 0, :3] asserted by the upstream script)
_MODELS = {
    "vit-msn-small": ("vits16_800ep.pth.tar", "s", 16, (-1.0915, -1.4876, -1.1809)),
    "vit-msn-base": ("vitb16_600ep.pth.tar", "b", 16, (14.2889, -18.9045, 11.7281)),
    "vit-msn-large": ("vitl16_600ep.pth.tar", "l", 16, (41.5028, -22.8681, 45.6475)),
    "vit-msn-base-4": ("vitb4_300ep.pth.tar", "b", 4, (-4.3868, 5.2932, -0.4137)),
    "vit-msn-large-7": ("vitl7_200ep.pth.tar", "l", 7, (-0.1792, -0.6465, 2.4263)),
}
_HUB_ID_INFERRED = {"vit-msn-base", "vit-msn-large", "vit-msn-large-7"}
_URL = "https://dl.fbaipublicfiles.com/msn/{}"
_IMAGE = "http://images.cocodataset.org/val2017/000000039769.jpg"
_SCRIPT_NOTE = ("conversion reference: upstream convert_msn_to_pytorch.py, CLS token after the final LayerNorm "
                "(atol 1e-4; values from the Colab gist sayakpaul/3672419a04f5997827503fd84079bdd1)")
# vit-msn-small only: the upstream integration test, on a randomly initialised classifier.
# The values were (0.5588, 0.6853, -0.5929); kept as None so the tier skips them.
_TEST_VALUES = PublishedValues(
    "logits[0, :3]", None, 1e-4,
    "NOT a conversion reference (values (0.5588, 0.6853, -0.5929) not checked): upstream integration test (rtol=atol=1e-4) on "
    "ViTMSNForImageClassification.from_pretrained('facebook/vit-msn-small'), whose classifier is not in the "
    "hub backbone and is randomly initialised after torch.manual_seed(2), so the numbers depend on torch's RNG "
    "and init order; input tests/fixtures/tests_samples/COCO/000000039769.png with "
    "ViTImageProcessor.from_pretrained('facebook/vit-msn-small'); shape (1, 1000)")


def _variant(name: str) -> Variant:
    filename, width, patch, values = _MODELS[name]
    hidden, intermediate, layers, heads = _WIDTHS[width]
    notes = ["the projection head module.fc.{fc1,bn1,fc2,bn2,fc3} is dropped",
             "the processor is the original's evaluation transform (short side 256, centre crop 224, "
             "BitImageProcessor); the hub's ViTImageProcessor resizes to 224x224 without a crop (the upstream "
             "script's recipe, kept for the published values)",
             "upstream sets num_labels 1000 and ImageNet labels although ViTMSNModel has no classifier"]
    if width == "l":
        notes.append("upstream also sets hidden_dropout_prob 0.1 (no effect at eval)")
    if name != "vit-msn-small":
        notes.append("URL not in the upstream script (only the s16 default is): the file name follows the "
                     "script's substring branches and third-party code listing the msn files")
    if name in _HUB_ID_INFERRED:
        notes.append("hub id inferred by naming (not seen on the hub)")
    if name == "vit-msn-large-7":
        notes.append("the script's values for l7 sit in its final `else` branch")
    return Variant(
        name=name,
        family=NAME,
        hub_id=f"facebook/{name}",
        config=dict(image_size=224, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=intermediate, num_labels=1000,
                    label_file="imagenet-1k-id2label.json"),
        source=Source(url=_URL.format(filename), filename=filename, container="torch",
                      container_keys=("target_encoder",), prefix="module."),
        inputs=InputRecipe(
            description="COCO val2017 000000039769.jpg (two cats) through ViTImageProcessor(size=224, ImageNet "
                        "default mean/std): resize to 224x224 (bilinear, inferred), no crop, rescale 1/255; "
                        "torch.manual_seed(2) before the forward pass",
            files=(_IMAGE,),
            params=dict(image_size=224, do_center_crop=False, image_mean=(0.485, 0.456, 0.406),
                        image_std=(0.229, 0.224, 0.225), seed=2),
        ),
        published=(PublishedValues("last_hidden_state[0, 0, :3]", values, 1e-4, _SCRIPT_NOTE),
                   *((_TEST_VALUES,) if name == "vit-msn-small" else ())),
        notes="; ".join(notes),
    )


VARIANTS = tuple(_variant(name) for name in _MODELS)


# ---- config ---------------------------------------------------------------------------

def hf_config(spec: Mapping, id2label: Mapping[int, str] | None = None):
    """Upstream writes num_labels 1000 and the ImageNet labels although ViTMSNModel has
    no classifier; kept, so the config matches the published one."""
    from transformers import ViTMSNConfig

    labels = spec["num_labels"]
    id2label = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(labels)}
    return ViTMSNConfig(
        image_size=spec["image_size"], patch_size=spec["patch_size"], hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"], hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def hf_processor(spec: Mapping):
    """The original's evaluation transform (msn linear_eval.py:124-130): the short side to 256 (for 224),
    bilinear, centre crop 224, ImageNet mean/std. ViTImageProcessor cannot crop, so BitImageProcessor
    (shortest edge, centre crop, the same normalisation) on both transformers lines."""
    try:
        from transformers import BitImageProcessorPil as Processor  # 5.x, no torchvision needed
    except ImportError:
        from transformers import BitImageProcessor as Processor  # 4.x: PIL/numpy already
    size = spec["image_size"]
    return Processor(size={"shortest_edge": round(size * 256 / 224)}, resample=2,  # PIL bilinear
                     crop_size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def recipe_processor(variant: Variant):
    """The upstream script's reference-input recipe: ViTImageProcessor(size=224), a 224x224 resize without
    a crop (the published values were computed on it)."""
    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    size = variant.config["image_size"]  # the model's input size (224; the tiny models' own)
    return Processor(size={"height": size, "width": size}, image_mean=list(variant.inputs.params["image_mean"]),
                     image_std=list(variant.inputs.params["image_std"]))


# ---- rename table ---------------------------------------------------------------------------

_BLOCK = (  # DeiT block -> HF 4.x ViTMSNLayer
    ("norm1.{p}", "layernorm_before.{p}"),
    # the fused qkv Linear, rows [q; k; v]
    *((f"attn.qkv.{p}", tuple(f"attention.attention.{x}.{p}" for x in ("query", "key", "value")), SPLIT_QKV)
      for p in ("weight", "bias")),
    ("attn.proj.{p}", "attention.output.dense.{p}"),
    ("norm2.{p}", "layernorm_after.{p}"),
    ("mlp.fc1.{p}", "intermediate.dense.{p}"),
    ("mlp.fc2.{p}", "output.dense.{p}"),
)

RULES = rules(
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    *prefixed("blocks.{i}.", "encoder.layer.{i}.", _BLOCK),
    ("norm.{p}", "layernorm.{p}"),
    ("fc.{layer}.{p}", None),  # the MSN projection head: not part of the backbone
)


# ---- the published check -------------------------------------------------------------------

def real_input(variant: Variant, files) -> dict:
    """The COCO cats image through the script's ViTImageProcessor recipe."""
    from PIL import Image

    with Image.open(files[0]) as image:
        return dict(recipe_processor(variant)(image.convert("RGB"), return_tensors="pt"))


def real_outputs(model, variant: Variant, files) -> dict:
    """last_hidden_state of the backbone (the script checks its cls token). The
    script seeds torch before the forward pass; the backbone has no randomness at eval."""
    return {"last_hidden_state": model(**real_input(variant, files)).last_hidden_state}


FAMILY = Family(
    name=NAME, variants=VARIANTS, tables={MODEL_CLASS: RULES},  # target_encoder without `module.`
    hf_config=hf_config, hf_processor=hf_processor, real_input=real_input, real_outputs=real_outputs,
    installed_schema=vit_hf5_names.installed_schema(MODEL_CLASS))
