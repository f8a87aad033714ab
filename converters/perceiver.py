"""Perceiver IO (google-deepmind/deepmind-research, Haiku) -> the HF Perceiver classes.

Data only: the converter comes with its family issue. The HF class differs per
architecture, so each variant's config names it as "model_class".
"""
from __future__ import annotations

from .registry import InputRecipe, PublishedValues, Source, Variant

FAMILY = "perceiver"
MODEL_CLASS = None  # per variant: config["model_class"]

_GCS = "https://storage.googleapis.com/perceiver_io/"
# Every original uses jax.nn.gelu (tanh approximation) and LayerNorm eps 1e-5.
_ORIGINAL_NUMERICS = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)
_NUMERICS_NOTE = ("the original's jax.nn.gelu is the tanh approximation; upstream's config keeps hidden_act "
                  "'gelu' (exact, pointwise gap up to 4.7e-4) and the published values were computed with it. "
                  "The config follows the original. PerceiverConfig.layer_norm_eps is 1e-12, but the HF modules "
                  "build nn.LayerNorm with its default 1e-5, the original's (checked in transformers 5.23)")
_IMAGENET = dict(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                 num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224,
                 decoder_num_channels=1024, num_labels=1000, label_file="imagenet-1k-id2label.json")
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

_MLM_TEXT = "This is an incomplete sentence where some words are missing."
_MISSING = (38.0, 115.0, 111.0, 121.0, 121.0, 111.0, 116.0, 109.0, 52.0)  # byte tokens of " missing."

# name: (model_class, checkpoint file, container_keys, config, inputs, published, notes)
_MODELS = {
    "language-perceiver": (
        "PerceiverForMaskedLM", "language_perceiver_io_bytes.pickle", (),
        dict(num_latents=256, d_latents=1280, d_model=768, num_blocks=1, num_self_attends_per_block=26,
             num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280,
             vocab_size=262, max_position_embeddings=2048,
             decoder_qk_channels=256, decoder_v_channels=768, decoder_num_heads=8),
        InputRecipe(
            description="the script's sentence, padded to max_length 2048, tokens 51:60 (' missing.') set to the "
                        "mask token; the script's tokenizer (a local path) adds no leading token, like the "
                        "original colab's raw UTF-8 bytes; the hub tokenizer prepends [CLS], shifting the mask "
                        "to 52:61 (inferred)",
            params=dict(text=_MLM_TEXT, padding="max_length", max_length=2048, mask=(51, 60),
                        hub_tokenizer="deepmind/language-perceiver", hub_tokenizer_mask=(52, 61))),
        (PublishedValues("logits[0, :3, :3]", (-11.8336, -11.6850, -11.8483, -12.8149, -12.5863, -12.7904,
                                               -12.8440, -12.6410, -12.8646), 1e-4,
                         "upstream convert_perceiver_haiku_to_pytorch.py, mask 51:60, no leading token; the "
                         "script uses torch.allclose defaults (rtol 1e-5, atol 1e-8) on 4-decimal values, older "
                         "script/test versions atol 1e-4; 3x3 flattened row-major"),
         PublishedValues("logits[0, 51:60].argmax(-1)", _MISSING, 0.0,
                         "upstream conversion script: greedy token ids, exact (decode to ' missing.')"),
         PublishedValues("logits[0, :3, :3]", (-10.8609, -10.7651, -10.9187, -12.1689, -11.9389, -12.1479,
                                               -12.1518, -11.9707, -12.2073), 1e-4,
                         "upstream integration test (rtol=atol=1e-4): hub tokenizer with [CLS], mask 52:61, so "
                         "position 0 differs from the script's input; 3x3 flattened row-major"),
         PublishedValues("logits[0, 52:61].argmax(-1)", _MISSING, 0.0,
                         "upstream integration test: greedy token ids with the hub tokenizer, exact")),
        "the original colab's decoder: 2048 trainable queries, qk 256, v 768, 8 heads, no final projection, "
        "no query residual"),
    "vision-perceiver-learned": (
        "PerceiverForImageClassificationLearned", "imagenet_learned_position_encoding.pystate", ("params",),
        dict(d_model=512, preprocessor="conv1x1", preprocessor_channels=256, position_encoding="trainable",
             position_channels=256, decoder_use_query_residual=False, **_IMAGENET),
        _IMAGE_INPUTS,
        (PublishedValues("logits[0, :3]", (-1.1652, -0.1992, -0.7520), 1e-4, _IMAGE_TEST),),
        "d_model 512 = 256 conv1x1 channels + 256 projected trainable position channels (init 0.02)"),
    "vision-perceiver-fourier": (
        "PerceiverForImageClassificationFourier", "imagenet_fourier_position_encoding.pystate", ("params",),
        dict(d_model=261, preprocessor="pixels", position_encoding="fourier", num_frequency_bands=64,
             max_resolution=(224, 224), decoder_use_query_residual=True, **_IMAGENET),
        _IMAGE_INPUTS,
        (PublishedValues("logits[0, :3]", (-1.1295, -0.2832, 0.3226), 1e-4, _IMAGE_TEST),),
        "d_model 261 = 3 pixels + 2 x (2 x 64 + 1) fourier features (sine_only False, concat_pos)"),
    "vision-perceiver-conv": (
        "PerceiverForImageClassificationConvProcessing", "imagenet_conv_preprocessing.pystate", ("params",),
        dict(d_model=322, preprocessor="conv", preprocessor_channels=64, position_encoding="fourier",
             num_frequency_bands=64, max_resolution=(56, 56), decoder_use_query_residual=True, **_IMAGENET),
        _IMAGE_INPUTS,
        (PublishedValues("logits[0, :3]", (-1.1186, 0.0554, 0.0897), 1e-4, _IMAGE_TEST),),
        "d_model 322 = 64 conv channels + 258 fourier features; 7x7 conv without bias, batch norm (its EMAs in "
        "the pickle's 'state'), max-pool; padding and kernel-axis hazards in upstream-hazards.md"),
    "optical-flow-perceiver": (
        "PerceiverForOpticalFlow", "optical_flow_checkpoint.pystate", (),
        dict(num_latents=2048, d_latents=512, d_model=322, num_blocks=1, num_self_attends_per_block=24,
             num_self_attention_heads=16, num_cross_attention_heads=1, train_size=(368, 496),
             num_frames=2, patch_size=3, patch_channels=64, num_frequency_bands=64, output_channels=2,
             flow_rescale_factor=100.0),
        InputRecipe(
            description="the upstream integration test: hf-internal-testing/fixtures_sintel (load_dataset, split "
                        "test), img / 255 * 2 - 1, cropped to 368x496, 3x3 patches with TF SAME padding -> "
                        "(1, 2, 27, 368, 496); the test's copy-paste bug feeds image 0 as BOTH frames (zero "
                        "motion), which a reproduction must copy. The listed files are the original colab's "
                        "Sintel frames (whether the fixture holds the same images is not known); the conversion "
                        "script fed unseeded torch.randn",
            files=(_GCS + "sintel_frame1.png", _GCS + "sintel_frame2.png"),
            params=dict(dataset="hf-internal-testing/fixtures_sintel", split="test", frames=(0, 0),
                        train_size=(368, 496), patch_size=3, padding="SAME", scale=2 / 255, offset=-1.0)),
        (PublishedValues("logits[0, :3, :3, :3]",
                         (0.0025, -0.0050, 0.0025, -0.0049, 0.0025, -0.0048, 0.0026, -0.0049, 0.0026, -0.0048,
                          0.0026, -0.0047, 0.0026, -0.0049, 0.0026, -0.0048, 0.0026, -0.0046), 1e-4,
                         "upstream integration test (rtol=atol=1e-4), both frames = frame 1 (copy-paste bug); "
                         "shape (1, 368, 496, 2); 3x3x2 flattened row-major; the script has no numeric check"),),
        "the original divides the decoder output by 100 and the colab then multiplies by FLOW_SCALE_FACTOR 20; "
        "whether HF applies the x20 is not known"),
    "multimodal-perceiver": (
        "PerceiverForMultimodalAutoencoding", "video_autoencoding_checkpoint.pystate", (),
        dict(num_latents=784, d_latents=512, d_model=704, num_blocks=1, num_self_attends_per_block=8,
             num_self_attention_heads=8, num_cross_attention_heads=1, num_frames=16, image_size=224,
             audio_samples_per_frame=1920, samples_per_patch=16, output_shape=(1, 16, 224, 224),
             output_num_channels=512, decoder_num_z_channels=1024, label_trainable_num_channels=1024,
             image_num_frequency_bands=32, image_spatial_downsample=4, audio_num_frequency_bands=192,
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
        "the original's mask_probs: image 0.0, audio 0.0, label 1.0; the script sets the label file after "
        "building the model"),
}


def _variant(name: str) -> Variant:
    model_class, filename, keys, config, inputs, published, notes = _MODELS[name]
    return Variant(
        name=name,
        family=FAMILY,
        hub_id=f"deepmind/{name}",
        config=dict(model_class=model_class, **config, **_ORIGINAL_NUMERICS),
        source=Source(url=_GCS + filename, filename=filename, container="haiku_pickle", container_keys=keys),
        inputs=inputs,
        published=published,
        notes=f"{notes}; {_NUMERICS_NOTE}; checkpoint URL from the deepmind colab (the script reads a local "
              "pickle); unpickling can run code",
    )


VARIANTS = tuple(_variant(name) for name in _MODELS)
