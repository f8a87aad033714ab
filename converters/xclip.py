"""X-CLIP (microsoft/VideoX, OpenAI CLIP naming) -> XCLIPModel.

The original keeps q, k and v fused in nn.MultiheadAttention's `in_proj_weight`
(text, vision, message attention and MIT alike); HF has separate q/k/v_proj, so
those are split. The visual and text projections are used as `x @ P` in the
original and as Linear weights in HF, so they are transposed. Head counts and MLP
widths are not stored in checkpoints: the original derives heads = width // 64 and
MLP = 4 x width everywhere, and so does `hf_config`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from . import clip_tokenizer, errors
from .family import Family, InputRecipe, PublishedValues, Source, Variant
from .rename import prefixed, rules
from .reshape import MATMUL_KERNEL_TO_LINEAR, SPLIT_QKV

NAME = "xclip"
HEAD_WIDTH = 64  # the original: heads = width // 64
# img_norm_cfg of the original (datasets/build.py:34-35: mean [123.675, 116.28, 103.53], std [58.395, 57.12,
# 57.375] on 0..255), which are ImageNet's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Widths by size. The original sets every head count to width // 64 (openai/CLIP and
# X-CLIP mit.py / prompt.py): text 512 -> 8, vision 768 -> 12, MIT and prompt generator
# at the projection width (512 -> 8, 768 -> 12).
_SIZES = {
    "base": dict(vision_hidden_size=768, vision_intermediate_size=3072, vision_num_hidden_layers=12,
                 vision_num_attention_heads=12, text_hidden_size=512, text_intermediate_size=2048,
                 text_num_attention_heads=8, mit_hidden_size=512, mit_intermediate_size=2048,
                 mit_num_attention_heads=8, projection_dim=512, prompt_num_attention_heads=8),
    "large": dict(vision_hidden_size=1024, vision_intermediate_size=4096, vision_num_hidden_layers=24,
                  vision_num_attention_heads=16, text_hidden_size=768, text_intermediate_size=3072,
                  text_num_attention_heads=12, mit_hidden_size=768, mit_intermediate_size=3072,
                  mit_num_attention_heads=12, projection_dim=768, prompt_num_attention_heads=12),
}
_COMMON = dict(text_num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
               mit_num_hidden_layers=1, prompt_layers=2)

_RELEASE = "https://github.com/nbl97/X-CLIP_Model_Zoo/releases/download/v1.0/"
_DRIVE = "https://drive.google.com/u/0/uc?id={}&export=download&confirm=t&uuid={}"
# name (after "xclip-"): (checkpoint, probs[0] asserted by the upstream script). Release
# files are named by the URL; Drive files by (id, uuid, local name after the README's log).
_MODELS = {
    "base-patch32": ("k400_32_8.pth", (0.0019, 0.9951, 0.0030)),
    "base-patch32-16-frames": ("k400_32_16.pth", (7.0999e-04, 9.9883e-01, 4.5580e-04)),
    "base-patch16": ("k400_16_8.pth", (0.0083, 0.9681, 0.0236)),
    "base-patch16-16-frames": ("k400_16_16.pth", (7.6937e-04, 9.9728e-01, 1.9473e-03)),
    "large-patch14": (("1NUOImq0o5DlQTST17iIP3vG7DgmHQuCx", "b26caedc-88e2-473e-830a-9d158b653cdb",
                       "k400_14_8.pth"), (0.0062, 0.9864, 0.0075)),
    "large-patch14-16-frames": (("1FOYgnJc097OJ4lGwtRCCydQyVPJEOH7d", "538fa810-e671-4050-b385-9a623f89804f",
                                 "k400_14_16_336.pth"), (3.3877e-04, 9.9937e-01, 2.8888e-04)),
    "base-patch16-kinetics-600": ("k600_16_8.pth", (0.0555, 0.8914, 0.0531)),
    "base-patch16-kinetics-600-16-frames": ("k600_16_16.pth", (3.8554e-04, 9.9929e-01, 3.2754e-04)),
    "large-patch14-kinetics-600": (("1FV8C1INuM91sLAN4ImjzePLIlpMSihwV", "141d4977-4a65-44ae-864f-4b0c19f838be",
                                    "k600_14_8.pth"), (0.0036, 0.9920, 0.0045)),
    "base-patch16-hmdb-2-shot": ("few_hmdb_2.pth", (7.1890e-06, 9.9994e-01, 5.6559e-05)),
    "base-patch16-hmdb-4-shot": ("few_hmdb_4.pth", (1.0320e-05, 9.9993e-01, 6.2435e-05)),
    "base-patch16-hmdb-8-shot": ("few_hmdb_8.pth", (4.1377e-06, 9.9990e-01, 9.8386e-05)),
    "base-patch16-hmdb-16-shot": ("few_hmdb_16.pth", (4.1347e-05, 9.9962e-01, 3.3411e-04)),
    "base-patch16-ucf-2-shot": ("few_ucf_2.pth", (8.5857e-05, 9.9928e-01, 6.3291e-04)),
    "base-patch16-ucf-4-shot": ("few_ucf_4.pth", (8.5857e-05, 9.9928e-01, 6.3291e-04)),
    "base-patch16-ucf-8-shot": ("few_ucf_8.pth", (0.0027, 0.9904, 0.0070)),
    "base-patch16-ucf-16-shot": ("few_ucf_16.pth", (9.8219e-04, 9.9593e-01, 3.0863e-03)),
    "base-patch16-zero-shot": ("zero.pth", (3.5082e-04, 9.9785e-01, 1.7966e-03)),
}
_SUSPECT = {  # upstream script copy-paste suspicion
    "base-patch16-ucf-2-shot": "identical to ucf-4-shot's values: copy-paste suspected in the upstream script",
    "base-patch16-ucf-4-shot": "identical to ucf-2-shot's values: copy-paste suspected in the upstream script",
}
_HUB_SEEN = {"base-patch32", "large-patch14-16-frames", "base-patch16-zero-shot"}  # others inferred
_VIDEO = {8: "eating_spaghetti_8_frames.npy", 16: "eating_spaghetti.npy", 32: "eating_spaghetti_32_frames.npy"}
_TEXTS = ("playing sports", "eating spaghetti", "go shopping")
_SCRIPT = "upstream convert_x_clip_original_pytorch_to_hf.py (atol 1e-3 on the softmax probabilities)"
_LARGE_HEADS = ("MIT and prompt-generator heads: the original uses width // 64 = 12 (VideoX X-CLIP mit.py, "
                "prompt.py); upstream get_xclip_config leaves mit_num_attention_heads and "
                "prompt_num_attention_heads at 8 (same weight shapes, different attention), and the published "
                "probs came from that 8-head model; the hub config.json was not checked. The config follows "
                "the original.")
# microsoft/xclip-base-patch32 only: the upstream integration test (test_modeling_x_clip.py).
# Not checked by the tier: the upstream integration test test_inference_interpolate_pos_encoding
# asserts vision_model_output.last_hidden_state[0, :3, :3] == (0.0126, 0.2109, 0.0609, 0.0448,
# 0.5862, -0.1688, -0.0881, 0.8525, -0.3044) (atol 1e-4) on another input (180 px,
# interpolate_pos_encoding=True): a test of HF's interpolation, not of the conversion.
_TEST_VALUES = (
    PublishedValues("logits_per_video[0]", (14.0181, 20.2771, 14.4776), 1e-3,
                    "upstream integration test (rtol=atol=1e-3): XCLIPProcessor.from_pretrained(hub), "
                    "eating_spaghetti_8_frames.npy, the same 3 texts, padding=True"),
)


def _source(checkpoint) -> Source:
    if isinstance(checkpoint, str):
        return Source(url=_RELEASE + checkpoint, filename=checkpoint, container="torch", container_keys=("model",))
    drive_id, uuid, filename = checkpoint
    return Source(url=_DRIVE.format(drive_id, uuid), filename=filename, container="torch", container_keys=("model",))


def _variant(key: str) -> Variant:
    checkpoint, probs = _MODELS[key]
    size = key.split("-")[0]
    patch = int(key.split("-patch")[1][:2])
    frames = 16 if "16-frames" in key else 32 if "shot" in key else 8
    image_size = 336 if key == "large-patch14-16-frames" else 224
    notes = ["the processor resizes the short side to int(256 / 224 * size) before the centre crop, as the "
             "original's evaluation does; the upstream recipe (the published values) resized it to the model size"]
    if size == "large":
        notes.append(_LARGE_HEADS)
    if not isinstance(checkpoint, str):
        notes.append("Google Drive file (README link); the upstream script's URL has a literal '&amp;' "
                     "(HTML-escaped), decoded to '&' here; upstream saves it as pytorch_model.bin, the "
                     "local name here follows the README's log file name (inferred)")
    if image_size == 336:
        notes.append("336 px: VideoMAEImageProcessor(size=336) today keeps the default 224x224 centre crop, "
                     "so the upstream recipe would feed 224 px frames; the published values (Sep 2022) were "
                     "made with VideoMAEFeatureExtractor(size=336), which resized and cropped to 336 (inferred)")
    if key not in _HUB_SEEN:
        notes.append("hub id inferred: the script pushes to nielsr/<name>; microsoft/ seen for 3 models only")
    if key == "base-patch32":
        notes.append("the early script version (07694d46) asserted the same probs on logits_per_image with "
                     "spaghetti-video-8-frames/pixel_values.pt")
    name = f"xclip-{key}"
    return Variant(
        name=name,
        family=NAME,
        hub_id=f"microsoft/{name}",
        config=dict(image_size=image_size, patch_size=patch, num_frames=frames, **_SIZES[size], **_COMMON),
        source=_source(checkpoint),
        inputs=InputRecipe(
            description=f"{_VIDEO[frames]} ({frames} frames) through VideoMAEImageProcessor(size={image_size}) "
                        "(ImageNet mean/std) and the CLIP tokenizer as XCLIPProcessor, 3 texts, padding=True; "
                        "probs = logits_per_video.softmax(dim=1). Upstream loaded the tokenizer as "
                        "CLIPTokenizerFast(openai/clip-vit-base-patch32); here it is built from openai/CLIP's "
                        "BPE file shipped with the package (converters/clip_tokenizer.py)",
            files=(f"hf://datasets/hf-internal-testing/spaghetti-video/{_VIDEO[frames]}",),
            params=dict(frames=frames, image_size=image_size, image_mean=(0.485, 0.456, 0.406),
                        image_std=(0.229, 0.224, 0.225), texts=_TEXTS, padding=True,
                        tokenizer="openai/CLIP bpe_simple_vocab_16e6.txt.gz (shipped)"),
        ),
        published=(PublishedValues("probs[0]", probs, 1e-3, "; ".join(filter(None, (_SCRIPT, _SUSPECT.get(key))))),
                   *(_TEST_VALUES if key == "base-patch32" else ())),
        notes="; ".join(notes),
    )


VARIANTS = tuple(_variant(key) for key in _MODELS)


# ---- config ---------------------------------------------------------------------------

def hf_config(spec: Mapping, id2label: Mapping[int, str] | None = None):
    from transformers import XCLIPConfig

    text, vision, mit, proj = (spec["text_hidden_size"], spec["vision_hidden_size"], spec["mit_hidden_size"],
                               spec["projection_dim"])
    text_config = dict(vocab_size=spec["vocab_size"], hidden_size=text, intermediate_size=4 * text,
                       num_hidden_layers=spec["text_num_hidden_layers"], num_attention_heads=text // HEAD_WIDTH,
                       max_position_embeddings=spec["max_position_embeddings"], hidden_act="quick_gelu",
                       layer_norm_eps=1e-5)
    vision_config = dict(hidden_size=vision, intermediate_size=4 * vision,
                         num_hidden_layers=spec["vision_num_hidden_layers"], num_attention_heads=vision // HEAD_WIDTH,
                         image_size=spec["image_size"], patch_size=spec["patch_size"], num_frames=spec["num_frames"],
                         mit_hidden_size=mit, mit_intermediate_size=4 * mit,
                         mit_num_hidden_layers=spec["mit_num_hidden_layers"], mit_num_attention_heads=mit // HEAD_WIDTH,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, drop_path_rate=0.0)
    return XCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=proj,
                       prompt_layers=spec["prompt_layers"], prompt_num_attention_heads=proj // HEAD_WIDTH,
                       prompt_hidden_act="quick_gelu", prompt_alpha=0.1)


def video_processor(image_size: int, shortest_edge: int | None = None):
    """The original's evaluation preprocessing (VideoX X-CLIP datasets/build.py:34-35, 245, 289-290): the short
    side to int(256 / 224 * size), the centre crop at the model size, ImageNet mean/std. The mean/std are
    passed: VideoMAEImageProcessor's default is 0.5/0.5 today, while the VideoMAEFeatureExtractor of the
    upstream conversion (Sep 2022) defaulted to ImageNet's. The upstream recipe resized the short side to
    the model size (`shortest_edge`, real_input)."""
    try:
        from transformers import VideoMAEImageProcessorPil as Processor  # 5.x, no torchvision needed
    except ImportError:
        from transformers import VideoMAEImageProcessor as Processor
    edge = int(256 / 224 * image_size) if shortest_edge is None else shortest_edge
    return Processor(size={"shortest_edge": edge}, crop_size={"height": image_size, "width": image_size},
                     image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


TOKENIZER_NOTE = "TOKENIZER_MISSING.md"


class VideoProcessorOnly:
    """What is written when CLIP's tokenizer cannot be built: the video processor, and
    a note in the output saying why and what `from_pretrained` will then load."""

    tokenizer = None

    def __init__(self, image_processor, reason: str):
        self.image_processor, self.reason = image_processor, reason

    def save_pretrained(self, directory, **kwargs):
        self.image_processor.save_pretrained(directory, **kwargs)
        (Path(directory) / TOKENIZER_NOTE).write_text(
            "# No tokenizer in this output\n\n"
            f"convert-parity could not build the CLIP tokenizer: {self.reason}.\n\n"
            "The weights and the video processor are complete. `XCLIPProcessor` / `AutoProcessor` cannot be "
            "loaded from this directory as it is; `AutoImageProcessor` can. Reinstall convert-parity (the "
            "tokenizer is built from its converters/data/bpe_simple_vocab_16e6.txt.gz) and convert again.\n")


def hf_processor(spec: Mapping, tokenizer=None, shortest_edge: int | None = None):
    """XCLIPProcessor: the video processor and CLIP's tokenizer, built offline from the
    BPE vocabulary shipped with the package (clip_tokenizer; the upstream conversion
    loaded the same vocabulary from the hub's openai/clip-vit-base-patch32).

    Without a usable tokenizer (the data file missing or altered) one warning, and the
    video processor alone with a note (VideoProcessorOnly)."""
    from transformers import XCLIPProcessor

    if tokenizer is None:
        try:
            tokenizer = clip_tokenizer.clip_tokenizer()
        except clip_tokenizer.VocabularyError as err:
            reason = errors.shown(err, limit=400)
            logging.getLogger("convert_parity").warning(
                "no CLIP tokenizer, the output has the video processor only (see %s): %s", TOKENIZER_NOTE, reason)
            return VideoProcessorOnly(video_processor(spec["image_size"], shortest_edge), reason)
    return XCLIPProcessor(image_processor=video_processor(spec["image_size"], shortest_edge), tokenizer=tokenizer)


# ---- rule table -------------------------------------------------------------------------

def _in_proj(src: str, dst: str):
    """nn.MultiheadAttention's fused in-projection (rows [q; k; v]) -> HF's q/k/v_proj."""
    return tuple((f"{src}.in_proj_{p}", tuple(f"{dst}.{x}_proj.{p}" for x in "qkv"), SPLIT_QKV)
                 for p in ("weight", "bias"))


_BLOCK = (  # openai/CLIP ResidualAttentionBlock -> HF encoder layer
    *_in_proj("attn", "self_attn"),
    ("attn.out_proj.{p}", "self_attn.out_proj.{p}"),
    ("ln_1.{p}", "layer_norm1.{p}"),
    ("mlp.c_fc.{p}", "mlp.fc1.{p}"),
    ("mlp.c_proj.{p}", "mlp.fc2.{p}"),
    ("ln_2.{p}", "layer_norm2.{p}"),
)
_CROSS_FRAME = (  # the vision block's message token
    ("message_fc.{p}", "message_fc.{p}"),
    ("message_ln.{p}", "message_ln.{p}"),
    *_in_proj("message_attn", "message_attn"),
    ("message_attn.out_proj.{p}", "message_attn.out_proj.{p}"),
)
_PROMPT_LAYER = (
    ("cross_attn.{x}.{p}", "cross_attn.{x}.{p}"),  # q/k/v_proj (no bias) and proj
    ("{norm}.{p}", "{norm}.{p}"),  # norm1, norm3 (the original has no norm2)
    ("mlp.{j}.{p}", "mlp.{j}.{p}"),
)

RULES = rules(
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    *prefixed("transformer.resblocks.{i}.", "text_model.encoder.layers.{i}.", _BLOCK),
    ("ln_final.{p}", "text_model.final_layer_norm.{p}"),
    ("text_projection", "text_projection.weight", MATMUL_KERNEL_TO_LINEAR),  # used as x @ P
    ("logit_scale", "logit_scale"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.ln_pre.{p}", "vision_model.pre_layernorm.{p}"),
    *prefixed("visual.transformer.resblocks.{i}.", "vision_model.encoder.layers.{i}.", _BLOCK + _CROSS_FRAME),
    ("visual.ln_post.{p}", "vision_model.post_layernorm.{p}"),
    ("visual.proj", "visual_projection.weight", MATMUL_KERNEL_TO_LINEAR),  # used as x @ P
    ("mit.positional_embedding", "mit.position_embedding"),
    *prefixed("mit.resblocks.{i}.", "mit.encoder.layers.{i}.", _BLOCK),
    ("prompts_visual_ln.{p}", "prompts_visual_layernorm.{p}"),
    ("prompts_visual_proj", "prompts_visual_projection"),  # both use it as x @ P: no transpose
    ("prompts_generator.alpha", "prompts_generator.alpha"),
    ("prompts_generator.norm.{p}", "prompts_generator.layernorm.{p}"),
    *prefixed("prompts_generator.decoder.{i}.", "prompts_generator.decoder.{i}.", _PROMPT_LAYER),
)


# ---- the published check -------------------------------------------------------------------

def process(processor, texts, video, padding=True) -> dict:
    """Model inputs from XCLIPProcessor's own tokenizer and video processor.

    Called through its parts: transformers 4.57.6's XCLIPProcessor(text=..., videos=...)
    silently returns no pixel_values (parity_tests/test_xclip.py records it)."""
    return {**processor.tokenizer(list(texts), padding=padding, return_tensors="pt"),
            "pixel_values": processor.image_processor(list(video), return_tensors="pt")["pixel_values"]}


def real_input(variant: Variant, files, tokenizer=None) -> dict:
    import numpy as np

    params = variant.inputs.params
    # the upstream recipe: VideoMAEImageProcessor(size=image_size), the short side to the model size
    processor = hf_processor({"image_size": params["image_size"]}, tokenizer or clip_tokenizer.clip_tokenizer(),
                             shortest_edge=params["image_size"])
    return process(processor, params["texts"], np.load(files[0])[: params["frames"]], params["padding"])


def real_outputs(model, variant: Variant, files, tokenizer=None) -> dict:
    out = model(**real_input(variant, files, tokenizer))
    return {"logits_per_video": out.logits_per_video, "probs": out.logits_per_video.softmax(dim=1)}


FAMILY = Family(
    name=NAME, variants=VARIANTS, tables={"XCLIPModel": RULES},  # checkpoint["model"]
    hf_config=hf_config, hf_processor=hf_processor, real_input=real_input, real_outputs=real_outputs)
