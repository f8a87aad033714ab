"""ViT-MSN (facebookresearch/msn, DeiT naming) -> ViTMSNModel (the backbone, no classifier).

Data only: the converter comes with its family issue.
"""
from __future__ import annotations

from .registry import InputRecipe, PublishedValues, Source, Variant

FAMILY = "vit_msn"
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
_TEST_VALUES = PublishedValues(
    "logits[0, :3]", (0.5588, 0.6853, -0.5929), 1e-4,
    "NOT a conversion reference: upstream integration test (rtol=atol=1e-4) on "
    "ViTMSNForImageClassification.from_pretrained('facebook/vit-msn-small'), whose classifier is not in the "
    "hub backbone and is randomly initialised after torch.manual_seed(2), so the numbers depend on torch's RNG "
    "and init order; input tests/fixtures/tests_samples/COCO/000000039769.png with "
    "ViTImageProcessor.from_pretrained('facebook/vit-msn-small'); shape (1, 1000)")


def _variant(name: str) -> Variant:
    filename, width, patch, values = _MODELS[name]
    hidden, intermediate, layers, heads = _WIDTHS[width]
    notes = ["the projection head module.fc.{fc1,bn1,fc2,bn2,fc3} is dropped",
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
        family=FAMILY,
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
