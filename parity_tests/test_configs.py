"""Full-size configs and processors against the originals' own numbers.

The tiny parity models force 2 heads and 2 layers, and the full-size structure check
builds both sides from the registry, so a wrong full-size number agrees with itself
there. Here every architecture field of the HF config the converter writes for each of
the 39 variants is compared with fixtures/original_hparams.py, which states each
number as the original repository does, with its source; and the processor's
constants with the original's evaluation preprocessing.
"""
from __future__ import annotations

import pytest

from converters import pipeline
from converters.registry import family
from fixtures import original_hparams as orig

# Config fields that do not describe the architecture: run-time flags, dropout rates
# (inert at eval), initialisation, bookkeeping. Everything else the config holds must
# be in the original's table.
NOT_ARCHITECTURE = {
    "transformers_version", "architectures", "output_hidden_states", "output_attentions", "return_dict", "dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "_name_or_path", "model_type",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "initializer_range",
    "initializer_factor", "prompt_attention_dropout", "prompt_projection_dropout",
    "id2label", "label2id",  # checked by test_labels_are_consistent
}
CLASS_IGNORES = {
    "timesformer": {"drop_path_rate": "stochastic depth, training only"},
    "vivit": {"pooler_output_size": "VivitForVideoClassification has no pooler",
              "pooler_act": "VivitForVideoClassification has no pooler"},
    "vit_msn": {},
    "xclip": {"logit_scale_init_value": "initial value of a learned parameter (the checkpoint holds it)",
              "text_config.pad_token_id": "token ids: the text model pools at argmax(input_ids) (legacy eos 2)",
              "text_config.bos_token_id": "token ids, as above", "text_config.eos_token_id": "token ids, as above",
              "num_labels": "X-CLIP has no classifier (labels are texts)",
              "text_config.num_labels": "no classifier", "vision_config.num_labels": "no classifier"},
}
# Perceiver: the config carries every class's fields; each class reads its own (the rest
# keep inert defaults). layer_norm_eps is not read: the HF modules build nn.LayerNorm with
# its default 1e-5, as the original's hk.LayerNorm does (perceiver.py:94-96).
_PERCEIVER_COMMON = {"num_latents", "d_latents", "d_model", "num_blocks", "num_self_attends_per_block",
                     "num_self_attention_heads", "num_cross_attention_heads", "qk_channels", "v_channels",
                     "self_attention_widening_factor", "cross_attention_widening_factor", "use_query_residual",
                     "cross_attention_shape_for_attention", "hidden_act"}

# Activations by the function they compute: the tanh GELU has three HF names.
ACTIVATION = {"gelu": "erf GELU", "gelu_pytorch_tanh": "tanh GELU", "gelu_new": "tanh GELU", "gelu_fast": "tanh GELU",
              "quick_gelu": "x * sigmoid(1.702 x)"}

TABLES = {
    "timesformer": lambda name: {**orig.TIMESFORMER_MODEL, **orig.TIMESFORMER_VARIANTS[name]},
    "xclip": lambda name: orig.XCLIP_VARIANTS[name],
    "vivit": lambda name: orig.VIVIT_VARIANTS[name],
    "vit_msn": lambda name: orig.MSN_VARIANTS[name],
    "perceiver": lambda name: orig.PERCEIVER_VARIANTS[name],
}


def _flat(config_dict: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config_dict.items():
        if isinstance(value, dict) and key.endswith("_config"):
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def _written(variant) -> dict:
    config = family(variant.family).hf_config(pipeline.spec_of(variant))
    flat = _flat(config.to_dict())
    flat["num_labels"] = config.num_labels
    return flat


def _same(got, want) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return got is not None and want is not None and abs(got - want) <= 1e-12 * max(1.0, abs(want))
    return (list(got) if isinstance(got, tuple) else got) == (list(want) if isinstance(want, tuple) else want)


def test_every_field_matches_the_original(any_variant):
    """Heads, layers, widths, frames, image and patch size, eps, activation, vocabulary,
    labels: each written field equals the original's statement (its source in the message)."""
    table = TABLES[any_variant.family](any_variant.name)
    written = _written(any_variant)
    wrong = []
    for field, stated in table.items():
        got = written.get(field)
        if field == "hidden_act" or field.endswith(".hidden_act") or field == "prompt_hidden_act":
            if ACTIVATION.get(got) == ACTIVATION.get(stated.value):
                continue
        elif _same(got, stated.value):
            continue
        wrong.append(f"{field}: converter writes {got!r}, the original states {stated.value!r} ({stated.source})")
    assert not wrong, f"{any_variant.name}:\n" + "\n".join(wrong)


def test_every_architecture_field_is_in_the_table(any_variant):
    """Nothing the converter writes escapes the comparison: every field is in the original's
    table or is named here as not part of the architecture (or not read by the class)."""
    table = TABLES[any_variant.family](any_variant.name)
    written = _written(any_variant)
    ignored = set(NOT_ARCHITECTURE) | set(CLASS_IGNORES.get(any_variant.family, {}))
    ignored |= {f"{sub}.{k}" for sub in ("text_config", "vision_config") for k in NOT_ARCHITECTURE}
    if any_variant.family == "perceiver":
        read = _PERCEIVER_COMMON | set(table)
        ignored |= set(written) - read  # the other classes' fields and, without a classifier, num_labels: inert
    assert sorted(set(written) - set(table) - ignored) == []


def test_labels_are_consistent(any_variant):
    """num_labels as the original states it; id2label covers 0..n-1 and label2id is its exact
    inverse, with the default names and with names from a label file."""
    module = family(any_variant.family)
    table = TABLES[any_variant.family](any_variant.name)
    spec = pipeline.spec_of(any_variant)
    if "num_labels" not in table:
        pytest.skip(f"{any_variant.family} {spec.get('model_class', '')}: no classifier, no labels written")
    n = table["num_labels"].value
    for id2label in (None, {i: f"class {i:04d}" for i in range(n)}):
        config = module.hf_config(spec, id2label)
        assert config.num_labels == n, table["num_labels"].source
        assert sorted(config.id2label) == list(range(n))
        assert config.label2id == {label: i for i, label in config.id2label.items()}
        assert id2label is None or config.id2label == id2label


# ---- processors ------------------------------------------------------------------------------------

def image_processor(variant):
    """The image or video processor the converter writes beside the model (None: none)."""
    module = family(variant.family)
    spec = pipeline.spec_of(variant)
    if variant.family == "xclip":  # with a CLIP tokenizer from small files: nothing downloaded
        import tempfile
        from pathlib import Path

        from fixtures import parity_xclip

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = parity_xclip.write_tiny_clip_tokenizer(Path(tmp) / "tok", 512)
            return module.hf_processor(spec, tokenizer).image_processor
    processor = module.hf_processor(spec)
    return None if processor is None or not hasattr(processor, "image_mean") else processor


PREPROCESSING = {"timesformer": orig.TIMESFORMER_PREPROCESSING, "xclip": orig.XCLIP_PREPROCESSING,
                 "vivit": orig.VIVIT_PREPROCESSING, "vit_msn": orig.MSN_PREPROCESSING,
                 "perceiver": orig.PERCEIVER_PREPROCESSING}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's resampling filter numbers


def processor_constants(processor) -> dict:
    """The processor's settings in the original's terms (fixtures/original_hparams.py)."""
    d = processor.to_dict()
    crop = d["crop_size"]["height"]
    out = {"image_mean": tuple(d["image_mean"]), "image_std": tuple(d["image_std"]),
           "rescale_factor": d["rescale_factor"], "resample": RESAMPLE.get(int(d["resample"]), d["resample"])}
    if "shortest_edge" in d["size"]:
        out["shortest_edge_over_crop"] = d["size"]["shortest_edge"] / crop
    else:  # Perceiver: the crop is size / crop_size of the short side, then resized to size
        out["crop_fraction"] = d["size"]["height"] / crop
    if "offset" in d:  # ViViT: x * rescale_factor - 1 without normalisation
        out.update(offset=-1.0 if d["offset"] else 0.0, do_normalize=d["do_normalize"])
        if not d["do_normalize"]:
            del out["image_mean"], out["image_std"]
    return out


def test_processor_constants_are_the_originals(any_variant):
    """Mean, std, scale, resampling filter and the resize/crop ratio of the converted processor
    equal the original's evaluation preprocessing."""
    processor = image_processor(any_variant)
    if processor is None:
        if any_variant.config.get("model_class") == "PerceiverForMaskedLM":
            tokenizer = family("perceiver").hf_processor(pipeline.spec_of(any_variant))
            stated = orig.PERCEIVER_VARIANTS[any_variant.name]["max_position_embeddings"]
            assert tokenizer.model_max_length == stated.value, stated.source
            return
        pytest.skip(f"{any_variant.name}: the converter writes no image processor (the original feeds raw arrays)")
    got = processor_constants(processor)
    table = PREPROCESSING[any_variant.family]
    wrong = [f"{k}: {got[k]!r} vs the original's {table[k].value!r} ({table[k].source})"
             for k in got if k in table and not _same_tuple(got[k], table[k].value)]
    assert not wrong, "\n".join(wrong)
    assert set(got) <= set(table), f"constants not in the original's table: {sorted(set(got) - set(table))}"


def _same_tuple(got, want) -> bool:
    if isinstance(want, tuple):
        return len(got) == len(want) and all(abs(a - b) <= 1e-9 for a, b in zip(got, want))
    return _same(got, want)


def test_checkpoint_is_the_one_the_original_publishes(any_variant):
    """The source URL (or its share / Drive id) and the file name are the ones the original's README or
    colab gives, so a conversion reads the file the table's numbers describe."""
    (where, filename), source = orig.RELEASED_FILES[any_variant.name].value, orig.RELEASED_FILES[any_variant.name].source
    url = any_variant.source.url
    if where.startswith("http"):
        assert url == where, source
    elif any_variant.name == "timesformer-base-finetuned-k400":  # the Drive copy; the README's name
        assert "drive.google.com" in url, source
    else:
        assert f"{where}/" in url or f"id={where}&" in url, (url, source)
    if filename is not None:
        assert any_variant.source.filename == filename, source
