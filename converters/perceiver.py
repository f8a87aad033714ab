"""Perceiver IO (google-deepmind/deepmind-research, Haiku) -> the HF Perceiver classes.

The six released models share one encoder; each has its own HF class (each
variant's config names it as "model_class"), preprocessor and decoder. The
checkpoint is a Haiku params tree (plus batch-norm state for the conv model),
flattened by the loader as "module/name" and "state/module/name". Converting
is one rule table per class, whose rules carry the layout changes: hk.Linear `w`
(in, out) is transposed, hk.Conv2D kernels go from HWIO to OIHW, batch-norm tensors
(1, 1, 1, C) are flattened and its counter widened to torch's int64.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .family import Family, InputRecipe, KnownDivergence, PublishedValues, Source, Variant
from .rename import rules
from .reshape import CONV_KERNEL_CHANNELS_LAST_TO_FIRST, FLATTEN, MATMUL_KERNEL_TO_LINEAR, TO_INT64

NAME = "perceiver"

_GCS = "https://storage.googleapis.com/perceiver_io/"
# Every original runs jax.nn.gelu (deepmind-research perceiver/perceiver.py MLP, line 199 at
# f5de0ed), whose default is the tanh approximation. Of transformers' tanh forms,
# "gelu_pytorch_tanh" is the closest to it in float32: on 6e6 points in [-12, 12] all of
# gelu_new / gelu_pytorch_tanh / gelu_fast differ from jax.nn.gelu(approximate=True) by at
# most 9.5e-7 (2 ulp near x = 4), with mean 3.20e-8 / 3.26e-8 / 3.31e-8 and 77.7% / 77.2% /
# 76.3% of points bit-equal; exact "gelu" differs by up to 4.7e-4. The published hub
# configs keep "gelu" (and the published values were computed with it): `convert
# --hub-config` writes HUB_CONFIG instead, and the real-checkpoint tier checks the
# published values with it.
_FAITHFUL_NUMERICS = dict(hidden_act="gelu_pytorch_tanh")
HUB_CONFIG = dict(hidden_act="gelu")
_NUMERICS_NOTE = ("hidden_act 'gelu_pytorch_tanh' is the original's jax.nn.gelu (tanh approximation); the "
                  "published hub configs keep exact 'gelu' (pointwise gap up to 4.7e-4), which computes the "
                  "published values, not the original's outputs (convert --hub-config writes it). PerceiverConfig."
                  "layer_norm_eps is 1e-12, but the HF modules build nn.LayerNorm with its default 1e-5, the "
                  "original's (checked in transformers 5.23)")
_IMAGENET = dict(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                 num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224,
                 num_labels=1000, label_file="imagenet-1k-id2label.json")
_COCO_PNG = ("https://raw.githubusercontent.com/huggingface/transformers/main/"
             "tests/fixtures/tests_samples/COCO/000000039769.png")
_IMAGE_INPUTS = InputRecipe(
    description="the upstream integration test's input: the COCO cats fixture (000000039769.png) through "
                "PerceiverImageProcessor() defaults: centre crop 256, resize 224 bicubic, rescale 1/255, ImageNet "
                "default mean/std. The conversion script used dalmation.jpg but only printed the argmax class; "
                "the original colab crops 224/256 of the short side and resizes with cv2 INTER_CUBIC",
    files=(_COCO_PNG,),
    params=dict(crop_size=256, image_size=224, resample="bicubic", image_mean=(0.485, 0.456, 0.406),
                image_std=(0.229, 0.224, 0.225), script_image=_GCS + "dalmation.jpg"))
_IMAGE_TEST = ("upstream integration test test_modeling_perceiver.py (rtol=atol=1e-4, 1e-3 on ROCm) on the COCO "
               "cats; the conversion script published no number (it prints the argmax class only)")
_IMAGE_SIZE_NOTE = ("image_size 224 is the input size; the class ignores config.image_size (the published "
                    "config keeps the default 56), so it is not written")

_MLM_TEXT = "This is an incomplete sentence where some words are missing."
_MISSING = (38.0, 115.0, 111.0, 121.0, 121.0, 111.0, 116.0, 109.0, 52.0)  # byte tokens of " missing."

# name: (model_class, checkpoint file, config, inputs, published, notes). The config holds the
# published HF config values (plus the input size and label file); the constants the HF
# classes hard-code (MLM decoder 8 heads / qk 256, 256 learned-position channels, 64 or
# 32/192 Fourier bands, 3x3 flow patches, ...) are the original's too, so they are not repeated.
_MODELS = {
    "language-perceiver": (
        "PerceiverForMaskedLM", "language_perceiver_io_bytes.pickle",
        dict(num_latents=256, d_latents=1280, d_model=768, num_blocks=1, num_self_attends_per_block=26,
             num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280,
             vocab_size=262, max_position_embeddings=2048),
        InputRecipe(
            description="the script's sentence, padded to max_length 2048, tokens 51:60 (' missing.') set to the "
                        "mask token; the script's tokenizer (a local path) adds no leading token, like the "
                        "original colab's raw UTF-8 bytes; the hub tokenizer prepends [CLS], shifting the mask "
                        "to 52:61 (inferred)",
            params=dict(text=_MLM_TEXT, padding="max_length", max_length=2048, mask=(51, 60),
                        hub_tokenizer="deepmind/language-perceiver", hub_tokenizer_mask=(52, 61))),
        (PublishedValues("script_logits_corner[0]", (-11.8336, -11.6850, -11.8483, -12.8149, -12.5863, -12.7904,
                                                     -12.8440, -12.6410, -12.8646), 1e-4,
                         "upstream convert_perceiver_haiku_to_pytorch.py: logits[0, :3, :3] flattened row-major, "
                         "mask 51:60, no leading token; the script uses torch.allclose defaults (rtol 1e-5, atol "
                         "1e-8) on 4-decimal values, older script/test versions atol 1e-4"),
         PublishedValues("script_masked_argmax[0]", _MISSING, 0.0,
                         "upstream conversion script: logits[0, 51:60].argmax(-1), greedy token ids, exact "
                         "(decode to ' missing.')"),
         PublishedValues("logits_corner[0]", (-10.8609, -10.7651, -10.9187, -12.1689, -11.9389, -12.1479,
                                              -12.1518, -11.9707, -12.2073), 1e-4,
                         "upstream integration test (rtol=atol=1e-4): logits[0, :3, :3] flattened row-major, hub "
                         "tokenizer with [CLS], mask 52:61, so position 0 differs from the script's input"),
         PublishedValues("masked_argmax[0]", _MISSING, 0.0,
                         "upstream integration test: logits[0, 52:61].argmax(-1) with the hub tokenizer, exact")),
        "the original colab's decoder: 2048 trainable queries, qk 256, v 768, 8 heads, no final projection, "
        "no query residual (the HF class hard-codes the same)"),
    "vision-perceiver-learned": (
        "PerceiverForImageClassificationLearned", "imagenet_learned_position_encoding.pystate",
        dict(d_model=512, **_IMAGENET),
        _IMAGE_INPUTS,
        (PublishedValues("logits[0, :3]", (-1.1652, -0.1992, -0.7520), 1e-4, _IMAGE_TEST),),
        "d_model 512 = 256 conv1x1 channels + 256 projected trainable position channels (init 0.02); the "
        "original decodes WITHOUT a query residual, the HF class hard-codes use_query_residual=True"),
    "vision-perceiver-fourier": (
        "PerceiverForImageClassificationFourier", "imagenet_fourier_position_encoding.pystate",
        dict(d_model=261, **_IMAGENET),
        _IMAGE_INPUTS,
        (PublishedValues("logits[0, :3]", (-1.1295, -0.2832, 0.3226), 1e-4, _IMAGE_TEST),),
        f"d_model 261 = 3 pixels + 2 x (2 x 64 + 1) fourier features (sine_only False, concat_pos); "
        f"{_IMAGE_SIZE_NOTE}"),
    "vision-perceiver-conv": (
        "PerceiverForImageClassificationConvProcessing", "imagenet_conv_preprocessing.pystate",
        dict(d_model=322, **_IMAGENET),
        _IMAGE_INPUTS,
        (PublishedValues("logits[0, :3]", (-1.1186, 0.0554, 0.0897), 1e-4, _IMAGE_TEST),),
        f"d_model 322 = 64 conv channels + 258 fourier features; 7x7 conv without bias, batch norm (its EMAs in "
        f"the pickle's 'state'), max-pool; the HF stem pads (3, 3) where the original pads TF SAME (2, 3) and "
        f"max-pools without padding (55x55 instead of 56x56); {_IMAGE_SIZE_NOTE}"),
    "optical-flow-perceiver": (
        "PerceiverForOpticalFlow", "optical_flow_checkpoint.pystate",
        dict(num_latents=2048, d_latents=512, d_model=322, num_blocks=1, num_self_attends_per_block=24,
             num_self_attention_heads=16, num_cross_attention_heads=1, train_height=368, train_width=496),
        InputRecipe(
            description="the upstream integration test: hf-internal-testing/fixtures_sintel (load_dataset, split "
                        "test), img / 255 * 2 - 1, the top-left 368x496, 3x3 patches with TF SAME padding, "
                        "channels (row, col, rgb) -> (1, 2, 27, 368, 496); the test's copy-paste bug feeds image 0 "
                        "as BOTH frames (zero motion), which a reproduction must copy. The listed files are the "
                        "original colab's Sintel frames (whether the fixture holds the same images is not known); "
                        "the conversion script fed unseeded torch.randn",
            files=(_GCS + "sintel_frame1.png", _GCS + "sintel_frame2.png"),
            params=dict(dataset="hf-internal-testing/fixtures_sintel", split="test", frames=(0, 0),
                        train_size=(368, 496), crop="top-left", patch_size=3, padding="SAME", scale=2 / 255,
                        offset=-1.0)),
        (PublishedValues("logits_corner[0]",
                         (0.0025, -0.0050, 0.0025, -0.0049, 0.0025, -0.0048, 0.0026, -0.0049, 0.0026, -0.0048,
                          0.0026, -0.0047, 0.0026, -0.0049, 0.0026, -0.0048, 0.0026, -0.0046), 1e-4,
                         "upstream integration test (rtol=atol=1e-4): logits[0, :3, :3, :3] of the (1, 368, 496, 2) "
                         "output, flattened row-major; both frames = frame 1 (copy-paste bug); the script has no "
                         "numeric check"),),
        "train_height/train_width are HF's train_size (the shrink rule works on scalars); the original divides "
        "the decoder output by 100 and the colab then multiplies by FLOW_SCALE_FACTOR 20 to get pixels: HF's "
        "logits are the model output without the x20 (measured in parity_tests/test_perceiver.py)"),
    "multimodal-perceiver": (
        "PerceiverForMultimodalAutoencoding", "video_autoencoding_checkpoint.pystate",
        dict(num_latents=784, d_latents=512, d_model=704, num_blocks=1, num_self_attends_per_block=8,
             num_self_attention_heads=8, num_cross_attention_heads=1, num_frames=16, image_size=56,
             audio_samples_per_frame=1920, samples_per_patch=16, output_num_channels=512,
             num_labels=700, label_file="kinetics700-id2label.json"),
        InputRecipe(
            description="the conversion script's unseeded random input: images randn(1, 16, 3, 224, 224), audio "
                        "randn(1, 30720, 1), label zeros(1, 700); 128 chunks, chunk 0 decoded "
                        "(subsampled image and audio points, label None); the colab uses UCF101's first video",
            params=dict(images_shape=(1, 16, 3, 224, 224), audio_shape=(1, 30720, 1), label_shape=(1, 700),
                        nchunks=128, chunk=0, seeded=False)),
        (PublishedValues("logits", None, 1e-4,
                         "nothing published: the script feeds unseeded torch.randn with no numeric check, and "
                         "there is no integration test for this model"),),
        "image_size 56 is the 4x4-patch grid of the 224px frames: HF uses it only for the Fourier max_resolution "
        "(num_frames, image_size, image_size) = the original's (16, 56, 56), and the script never sets it (the "
        "default 56 is right); output_shape (1, frames, 4 x 56, 4 x 56) is derived from it. The original's "
        "mask_probs: image 0.0, audio 0.0, label 1.0; the script sets the label file after building the model"),
}


def _variant(name: str) -> Variant:
    model_class, filename, config, inputs, published, notes = _MODELS[name]
    return Variant(
        name=name,
        family=NAME,
        hub_id=f"deepmind/{name}",
        config=dict(model_class=model_class, **config, **_FAITHFUL_NUMERICS),
        source=Source(url=_GCS + filename, filename=filename, container="haiku_pickle"),
        inputs=inputs,
        published=published,
        notes=f"{notes}; {_NUMERICS_NOTE}; checkpoint URL from the deepmind colab (the script reads a local "
              "pickle; the loader here unpickles only containers and numeric arrays, nothing from the file runs: "
              "converters/haiku_files.py)",
    )


VARIANTS = tuple(_variant(name) for name in _MODELS)

# Where the HF class hard-codes another computation than the original's, so that no config
# makes the converted model reproduce it (the weights are right: the matrix checks them
# against the original run with the port's structure). Causes read in transformers 5.23
# modeling_perceiver.py and deepmind-research f5de0ed; sizes: the tiny model from the matrix
# (`convert-parity matrix`, held to the record by parity_tests/test_perceiver.py), full
# size from `python -m parity_tools.perceiver_full_size` (random weights, seed 0, one input).
_MEASURED_BY = "convert-parity matrix (tiny) and python -m parity_tools.perceiver_full_size (full size)"
KNOWN_DIVERGENCES = {
    "vision-perceiver-learned": KnownDivergence(
        cause="HF decoder hard-codes the query residual",
        detail="PerceiverForImageClassificationLearned builds its PerceiverClassificationDecoder with "
               "use_query_residual=True (modeling_perceiver.py); the original learned-position config decodes "
               "without one (colab imagenet_classification.ipynb: decoder use_query_residual=False)",
        tiny_max_abs=1.93, full_size_max_abs=1.8, measured_by=_MEASURED_BY),
    "vision-perceiver-conv": KnownDivergence(
        cause="HF conv stem pads (3, 3) and max-pools unpadded where the original pads TF SAME",
        detail="Conv2dSamePadding zero-pads the 7x7/2 conv (3, 3) on each side and Conv2DDownsample "
               "max-pools 3x3/2 with no padding (modeling_perceiver.py); the original pads both 'SAME' "
               "(io_processors.py Conv2DDownsample): (2, 3) for the conv, a 56x56 map at 224 px where HF "
               "gives 55x55",
        tiny_max_abs=1.35, full_size_max_abs=0.056, measured_by=_MEASURED_BY),
}


# ---- config -----------------------------------------------------------------

_ENCODER_KEYS = ("num_latents", "d_latents", "d_model", "num_blocks", "num_self_attends_per_block",
                 "num_self_attention_heads", "num_cross_attention_heads", "hidden_act")
_CLASS_KEYS = {  # the config keys each class reads beyond the encoder's
    "PerceiverForMaskedLM": ("qk_channels", "v_channels", "vocab_size", "max_position_embeddings"),
    "PerceiverForImageClassificationLearned": ("image_size",),
    "PerceiverForImageClassificationFourier": (),
    "PerceiverForImageClassificationConvProcessing": (),
    "PerceiverForOpticalFlow": (),
    "PerceiverForMultimodalAutoencoding": ("num_frames", "image_size", "audio_samples_per_frame",
                                           "samples_per_patch", "output_num_channels"),
}
MULTIMODAL_PATCH = 4  # the HF class and the original both cut frames into 4x4 patches


def _derived(spec: Mapping) -> dict:
    if "train_height" in spec:
        return dict(train_size=[spec["train_height"], spec["train_width"]])
    if spec["model_class"] == "PerceiverForMultimodalAutoencoding":
        pixels = spec["image_size"] * MULTIMODAL_PATCH
        return dict(output_shape=[1, spec["num_frames"], pixels, pixels])
    return {}


def hf_config(spec: Mapping, id2label: Mapping[int, str] | None = None):
    from transformers import PerceiverConfig

    keys = (*_ENCODER_KEYS, *_CLASS_KEYS[spec["model_class"]])
    kwargs = {k: spec[k] for k in keys}
    if "num_labels" in spec:
        labels = spec["num_labels"]
        id2label = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(labels)}
        kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    return PerceiverConfig(**kwargs, **_derived(spec))


def hf_processor(spec: Mapping):
    """What save_pretrained writes beside the model: the image processor (published
    defaults, scaled to the input size), the byte tokenizer for MLM, else nothing."""
    cls = spec["model_class"]
    if cls == "PerceiverForMaskedLM":
        from transformers import PerceiverTokenizer

        return PerceiverTokenizer(model_max_length=spec["max_position_embeddings"])
    if cls.startswith("PerceiverForImageClassification"):
        try:
            from transformers import PerceiverImageProcessorPil as Processor  # 5.x, no torchvision needed
        except ImportError:
            from transformers import PerceiverImageProcessor as Processor  # 4.x: PIL/numpy already
        size = spec["image_size"]
        crop = round(size * 256 / 224)  # the published crop 256 for 224 inputs
        return Processor(crop_size={"height": crop, "width": crop}, size={"height": size, "width": size})
    return None


# ---- rename tables ------------------------------------------------------------
# Haiku names a module's parameters `w`/`b` (hk.Linear, hk.Conv2D), `scale`/`offset`
# (LayerNorm, BatchNorm), `pos_embs` (trainable position encodings); modules built
# in a parent's __init__ are `parent/~/child`, in another method `parent/~method/child`.

def _linear(src: str, dst: str, kernel_op=MATMUL_KERNEL_TO_LINEAR):
    """hk.Linear (w: (in, out)); hk.Conv2D with kernel_op=CONV_KERNEL_CHANNELS_LAST_TO_FIRST (w: HWIO)."""
    return ((f"{src}/w", f"{dst}.weight", kernel_op), (f"{src}/b", f"{dst}.bias"))


def _norm(src: str, dst: str, op=None):
    """hk.LayerNorm; hk.BatchNorm with op=FLATTEN (its (1, 1, 1, C) parameters)."""
    return ((f"{src}/scale", f"{dst}.weight", op), (f"{src}/offset", f"{dst}.bias", op))


def _attention_and_mlp(src: str, dst: str):
    """hk.Linear modules are numbered in creation order: q, k, v, output; MLP widen, narrow."""
    return (*_linear(f"{src}/attention/linear", f"{dst}.attention.self.query"),
            *_linear(f"{src}/attention/linear_1", f"{dst}.attention.self.key"),
            *_linear(f"{src}/attention/linear_2", f"{dst}.attention.self.value"),
            *_linear(f"{src}/attention/linear_3", f"{dst}.attention.output.dense"),
            *_linear(f"{src}/mlp/linear", f"{dst}.mlp.dense1"),
            *_linear(f"{src}/mlp/linear_1", f"{dst}.mlp.dense2"))


def _cross_attention(src: str, dst: str):
    """LayerNorms: layer_norm on the queries, layer_norm_1 on keys/values, layer_norm_2 before the MLP."""
    return (*_attention_and_mlp(src, dst),
            *_norm(f"{src}/layer_norm", f"{dst}.attention.self.layernorm1"),
            *_norm(f"{src}/layer_norm_1", f"{dst}.attention.self.layernorm2"),
            *_norm(f"{src}/layer_norm_2", f"{dst}.layernorm"))


def _self_attention(src: str, dst: str):
    return (*_attention_and_mlp(src, dst),
            *_norm(f"{src}/layer_norm", f"{dst}.attention.self.layernorm1"),
            *_norm(f"{src}/layer_norm_1", f"{dst}.layernorm"))


def _encoder(scope: str):
    """The latents, one cross-attention and the num_self_attends_per_block self-attention
    layers (applied num_blocks times with the same weights)."""
    return (
        (f"{scope}/~/trainable_position_encoding/pos_embs", "perceiver.embeddings.latents"),
        *_cross_attention(f"{scope}/~/cross_attention", "perceiver.encoder.cross_attention"),
        *_self_attention(f"{scope}/~/self_attention", "perceiver.encoder.self_attends.0"),
        *_self_attention(f"{scope}/~/self_attention_{{i}}", "perceiver.encoder.self_attends.{i}"),
    )


def _basic_decoder(src: str, dst: str, final_project: bool = True):
    return (*_cross_attention(f"{src}/cross_attention", f"{dst}.decoding_cross_attention"),
            *(_linear(f"{src}/output", f"{dst}.final_layer") if final_project else ()))


def _classification_query(dst: str):
    return (("classification_decoder/~/basic_decoder/~/trainable_position_encoding/pos_embs",
             f"{dst}.output_position_encodings.position_embeddings"),)


_CLASSIFIER = (*_classification_query("perceiver.decoder.decoder"),
               *_basic_decoder("classification_decoder/~/basic_decoder", "perceiver.decoder.decoder"))
_IMAGE_PRE = "image_preprocessor"
_STEM = f"{_IMAGE_PRE}/~/conv2_d_downsample/~"
_BN_STATE = f"state/{_STEM}/batchnorm/~"

RULES = {
    "PerceiverForMaskedLM": rules(
        ("embed/embeddings", "perceiver.input_preprocessor.embeddings.weight"),
        ("trainable_position_encoding/pos_embs", "perceiver.input_preprocessor.position_embeddings.weight"),
        *_encoder("perceiver_encoder"),
        ("basic_decoder/~/trainable_position_encoding/pos_embs",
         "perceiver.decoder.output_position_encodings.position_embeddings"),
        *_basic_decoder("basic_decoder", "perceiver.decoder", final_project=False),
        ("embedding_decoder/bias", "embedding_decoder.bias"),  # logits = out @ embeddings.T + bias
    ),
    "PerceiverForImageClassificationLearned": rules(
        *_linear(f"{_IMAGE_PRE}/~/conv2_d", "perceiver.input_preprocessor.convnet_1x1",
                 CONV_KERNEL_CHANNELS_LAST_TO_FIRST),
        (f"{_IMAGE_PRE}/~_build_network_inputs/trainable_position_encoding/pos_embs",
         "perceiver.input_preprocessor.position_embeddings.position_embeddings"),
        *_linear(f"{_IMAGE_PRE}/~_build_network_inputs/position_encoding_projector/linear",
                 "perceiver.input_preprocessor.positions_projection"),
        *_encoder("perceiver_encoder"), *_CLASSIFIER,
    ),
    "PerceiverForImageClassificationFourier": rules(*_encoder("perceiver_encoder"), *_CLASSIFIER),
    "PerceiverForImageClassificationConvProcessing": rules(
        (f"{_STEM}/conv/w", "perceiver.input_preprocessor.convnet.conv.weight", CONV_KERNEL_CHANNELS_LAST_TO_FIRST),
        *_norm(f"{_STEM}/batchnorm", "perceiver.input_preprocessor.convnet.batchnorm", FLATTEN),
        # hk.BatchNorm at eval reads each ExponentialMovingAverage's debiased `average`;
        # `hidden` is its raw accumulator, and both EMAs count the same updates.
        (f"{_BN_STATE}/mean_ema/average", "perceiver.input_preprocessor.convnet.batchnorm.running_mean", FLATTEN),
        (f"{_BN_STATE}/var_ema/average", "perceiver.input_preprocessor.convnet.batchnorm.running_var", FLATTEN),
        (f"{_BN_STATE}/mean_ema/counter", "perceiver.input_preprocessor.convnet.batchnorm.num_batches_tracked",
         TO_INT64),
        (f"{_BN_STATE}/var_ema/counter", None),
        (f"{_BN_STATE}/{{ema}}/hidden", None),
        *_encoder("perceiver_encoder"), *_CLASSIFIER,
    ),
    "PerceiverForOpticalFlow": rules(
        *_linear(f"{_IMAGE_PRE}/patches_linear", "perceiver.input_preprocessor.conv_after_patches"),
        *_encoder("perceiver_encoder"),
        *_basic_decoder("flow_decoder/~/basic_decoder", "perceiver.decoder.decoder"),
    ),
    "PerceiverForMultimodalAutoencoding": rules(
        ("multimodal_preprocessor/{m}_padding/pos_embs", "perceiver.input_preprocessor.padding.{m}"),
        ("multimodal_preprocessor/{m}_mask_token/pos_embs", "perceiver.input_preprocessor.mask.{m}"),
        *_encoder("encoder"),
        ("multimodal_decoder/~decoder_query/{m}_padding/pos_embs", "perceiver.decoder.padding.{m}"),
        *_classification_query("perceiver.decoder.modalities.label.decoder"),
        *_basic_decoder("multimodal_decoder/~/basic_decoder", "perceiver.decoder.decoder"),
        *_linear("audio_postprocessor/linear", "perceiver.output_postprocessor.modalities.audio.classifier"),
        *_linear("projection_postprocessor/linear", "perceiver.output_postprocessor.modalities.image.classifier"),
        *_linear("classification_postprocessor/linear",
                 "perceiver.output_postprocessor.modalities.label.classifier"),
    ),
}


# ---- the real-checkpoint tier ----------------------------------------------------------

def _mlm_encoding(variant: Variant, with_special_tokens: bool, mask: tuple[int, int]) -> dict:
    from transformers import PerceiverTokenizer

    params = variant.inputs.params
    tokenizer = PerceiverTokenizer()  # byte-level: nothing to download
    enc = tokenizer(params["text"], add_special_tokens=with_special_tokens, padding=params["padding"],
                    max_length=params["max_length"], return_tensors="pt")
    enc["input_ids"][0, mask[0]:mask[1]] = tokenizer.mask_token_id
    return {"inputs": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _flow_patches(path, params) -> torch.Tensor:
    """(1, 2, 27, H, W): the top-left train_size crop, scaled to [-1, 1], 3x3 zero-padded
    neighbourhoods with channels (row, col, rgb), image 0 as both frames."""
    import numpy as np
    from PIL import Image

    h, w = params["train_size"]
    img = np.asarray(Image.open(path).convert("RGB"), np.float32)[:h, :w] * params["scale"] + params["offset"]
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    patches = np.concatenate([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
    frame = torch.from_numpy(patches).permute(2, 0, 1)
    return torch.stack([frame, frame])[None]


def real_input(variant: Variant, files) -> dict:
    cls = variant.config["model_class"]
    params = variant.inputs.params
    if cls == "PerceiverForMaskedLM":
        return _mlm_encoding(variant, True, params["hub_tokenizer_mask"])
    if cls == "PerceiverForOpticalFlow":
        return {"inputs": _flow_patches(files[0], params)}
    from PIL import Image

    processor = hf_processor({"model_class": cls, "image_size": params["image_size"]})
    return {"inputs": processor(Image.open(files[0]).convert("RGB"), return_tensors="pt")["pixel_values"]}


def real_outputs(model, variant: Variant, files) -> dict:
    """What the published values are read from (see PublishedValues.output)."""
    cls = variant.config["model_class"]
    if cls == "PerceiverForMaskedLM":
        params = variant.inputs.params
        (a, b), (c, d) = params["mask"], params["hub_tokenizer_mask"]
        script = model(**_mlm_encoding(variant, False, (a, b))).logits
        logits = model(**real_input(variant, files)).logits
        return {"script_logits_corner": script[:, :3, :3].flatten(1), "script_masked_argmax": script[:, a:b].argmax(-1),
                "logits_corner": logits[:, :3, :3].flatten(1), "masked_argmax": logits[:, c:d].argmax(-1)}
    logits = model(**real_input(variant, files)).logits
    if cls == "PerceiverForOpticalFlow":
        return {"logits": logits, "logits_corner": logits[:, :3, :3, :3].flatten(1)}
    return {"logits": logits}


FAMILY = Family(
    name=NAME, variants=VARIANTS, tables=RULES,  # per HF class; flat Haiku "module/name", "state/module/name"
    hf_config=hf_config, hf_processor=hf_processor, real_input=real_input, real_outputs=real_outputs,
    known_divergences=KNOWN_DIVERGENCES, hub_config=HUB_CONFIG)
