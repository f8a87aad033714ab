"""The real-checkpoint tier: the published checkpoint, converted by the same code,
must reproduce the values the original conversion published, with the config that
produced them (`convert --hub-config`: the published hub config).

By default only cached files are used (nothing is downloaded); `--real-checkpoints`
lets it download. When the checkpoint or the reference input cannot be had, the test
is skipped and the skip message says which URL and which cache path.
"""
from __future__ import annotations

import pytest
import torch

from converters import downloads, errors, pipeline
from converters.family import PublishedValues
from converters.registry import all_variants, family
from parity_fixtures import harness
from parity_harness.compare import assert_parity, compare

pytestmark = pytest.mark.real_checkpoint


def check_published(variant, allow_downloads, workdir, monkeypatch, record=lambda diffs: None):
    published = [p for p in variant.published if p.values is not None]
    if not published:
        pytest.skip(f"{variant.name}: {'; '.join(p.note for p in variant.published) or 'no published values'}")
    if not allow_downloads:
        monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        files = [downloads.fetch(f, progress=False) for f in variant.inputs.files]
        checkpoint = downloads.fetch(variant.source.url, filename=variant.source.filename,
                                         sha256=variant.source.sha256)
    except errors.DownloadError as err:
        how = "" if allow_downloads else " (cache only; pass --real-checkpoints to download)"
        pytest.skip(f"real checkpoint tier unavailable{how}: {err}")
    # The published values were computed with the hub config (Perceiver: exact GELU where the
    # default conversion writes the original's tanh GELU), so each is checked with it.
    out = pipeline.convert_file(variant, str(checkpoint), workdir / "hf", hub_config=True, progress=lambda _: None)
    model = pipeline.hf_model_class(variant).from_pretrained(out).eval()
    with torch.no_grad():
        outputs = family(variant.family).real_outputs(model, variant, files)
    diffs = [compare(p.output, torch.tensor(p.values), harness.select(outputs, p.output), p.atol, 0.0)
             for p in published]
    record(diffs)
    assert_parity(diffs, f"{variant.name} against its published values")


def _put_in_cache(url: str, data: bytes, filename: str | None = None) -> None:
    """Where downloads.fetch looks for `url` offline (the tests' CONVERT_PARITY_CACHE)."""
    path = downloads.cache_path_for(url, filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_published_values(variant, allow_downloads, tmp_path, monkeypatch, record_diffs):
    check_published(variant, allow_downloads, tmp_path, monkeypatch, record_diffs)


def test_tier_runs_end_to_end_from_caches(timesformer_variant, tmp_path, monkeypatch, offline_hub_cache):
    """The tier's own path (cached checkpoint and video, convert_file, from_pretrained,
    the published recipe, the value check) on a tiny stand-in: the checkpoint is the
    tiny reference's, the published values are the reference's own outputs on the
    processed video. A wrong rename, recipe or slice makes it fail."""
    import dataclasses
    import io

    import numpy as np

    variant = timesformer_variant
    c = harness.case(variant.name)
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))
    inputs = dataclasses.replace(variant.inputs, params={**variant.inputs.params, "frames": c.spec["num_frames"],
                                                         "image_size": c.spec["image_size"]})
    video = np.random.default_rng(0).integers(0, 256, (max(16, c.spec["num_frames"]), 40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, video)
    for url in variant.inputs.files:
        offline_hub_cache(url, buffer.getvalue())
    _put_in_cache(variant.source.url, c.checkpoint.read_bytes(), variant.source.filename)

    tiny = dataclasses.replace(variant, config=c.spec, inputs=inputs, published=())
    hf_input = family(variant.family).real_input(tiny, [downloads.fetch(f) for f in variant.inputs.files])
    reference = c.original.forward(c.original.build(c.spec, harness.SEED),
                                            hf_input["pixel_values"].transpose(1, 2))
    expected = [PublishedValues(p.output, tuple(harness.select(reference, p.output).flatten().tolist()), 1e-4)
                for p in variant.published if p.values is not None] or [
        PublishedValues("logits[0, :3]", tuple(reference["logits"][0, :3].tolist()), 1e-4)]
    check_published(dataclasses.replace(tiny, published=tuple(expected)), False, tmp_path, monkeypatch)


# ---- Perceiver: the tier's input and output code, offline ---------------------------------
# What each published Perceiver value means, stated from the upstream integration test and
# conversion script (see converters/perceiver.py _MODELS), rebuilt here independently of
# perceiver.real_input / real_outputs: byte tokens as the original's bytes_tokenizer makes
# them, the flow model's top-left crop scaled to [-1, 1] with the reference's own 3x3
# patches, the image processor's constant-colour output computed by the original's
# preprocessing (a constant image makes resize and crop exact, so the two pipelines agree
# to float rounding; test_processors.py compares them on real images).

_PERCEIVER_TIER = [pytest.param(v, id=v.name, marks=pytest.mark.xdist_group(v.name))
                   for v in all_variants()
                   if v.family == "perceiver" and any(p.values is not None for p in v.published)]
# deepmind-research perceiver/bytes_tokenizer.py: 6 reserved ids (pad 0, bos 1, eos 2, mask 3,
# cls 4, sep 5), then each UTF-8 byte + 6. The hub tokenizer wraps a text in [CLS] ... [SEP].
_PAD, _MASK, _CLS, _SEP, _RESERVED = 0, 3, 4, 5, 6


def _byte_tokens(text: str, length: int, mask: tuple[int, int], wrapped: bool):
    import numpy as np

    ids = [b + _RESERVED for b in text.encode()]
    ids = [_CLS, *ids, _SEP] if wrapped else ids
    row = np.full((1, length), _PAD, np.int32)
    row[0, :len(ids)] = ids
    attended = (row != _PAD).astype(np.int32)
    row[0, mask[0]:mask[1]] = _MASK
    return {"inputs": row, "input_mask": attended}


def _perceiver_stand_in(variant):
    """(the tiny variant whose published values are the original's on the files the test made,
    the files' URLs -> bytes).

    The published values came from the port with the hub config, whose GELU is the exact one
    (the original's is tanh): the stand-in's values are the original network's with the port's
    structure and that GELU (hub_numerics_hparams), so the comparison measures the tier's code
    and not the known differences."""
    import dataclasses
    import io

    import numpy as np
    from PIL import Image

    from converters.registry import hub_config_values
    from parity_fixtures import original_preprocessing
    from parity_fixtures import parity_perceiver as pp
    from parity_fixtures import perceiver_original as orig

    c = harness.case(variant.name)
    spec, arch = c.spec, pp.arch_of(c.spec)
    built = c.original.build(spec, harness.SEED)
    hp = {**pp.port_structure_hparams({**built["hp"], "batch_size": 1}, arch),  # the values are the port's
          **pp.hub_numerics_hparams(hub_config_values(variant))}

    def run(inputs):
        return orig.forward(arch.original, hp, built["params"], built["state"], inputs)["logits"]

    params, files, values = dict(variant.inputs.params), {}, {}
    if arch.original == "mlm":
        length, text = spec["max_position_embeddings"], params["text"]
        (a, b), (c0, d) = params["mask"], params["hub_tokenizer_mask"]
        script = run(_byte_tokens(text, length, (a, b), wrapped=False))
        hub = run(_byte_tokens(text, length, (c0, d), wrapped=True))
        values = {"script_logits_corner[0]": script[0, :3, :3].ravel(), "script_masked_argmax[0]": script[0, a:b].argmax(-1),
                  "logits_corner[0]": hub[0, :3, :3].ravel(), "masked_argmax[0]": hub[0, c0:d].argmax(-1)}
        params["max_length"] = length
    elif arch.original == "optical_flow":
        h, w = spec["train_height"], spec["train_width"]
        frames = [np.random.default_rng(i).integers(0, 256, (h + 5, w + 7, 3), dtype=np.uint8) for i in (1, 2)]
        image = frames[0][:h, :w].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        flow = run({"images": np.stack([image, image])[None]})  # the integration test's frame 0 twice
        values = {"logits_corner[0]": flow[0, :3, :3, :3].ravel()}
        params["train_size"] = (h, w)
        for url, frame in zip(variant.inputs.files, frames):
            files[url] = frame
    else:
        size = spec["image_size"]
        colour = np.array([200, 30, 90], np.uint8)
        image = np.broadcast_to(colour, (size + 13, size + 21, 3)).copy()
        pixels = original_preprocessing.perceiver(image, size=size)  # (3, size, size)
        values = {"logits[0, :3]": run({"images": pixels.transpose(1, 2, 0)[None].astype(np.float32)})[0, :3]}
        params["image_size"] = size
        files[variant.inputs.files[0]] = image
    encoded = {}
    for url, frame in files.items():
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        encoded[url] = buffer.getvalue()
    published = tuple(PublishedValues(p.output, tuple(float(x) for x in np.ravel(values[p.output])), p.atol)
                      for p in variant.published if p.values is not None)
    assert {p.output for p in published} == set(values), "a published value the stand-in does not rebuild"
    tiny = dataclasses.replace(variant, config=spec, published=published,
                               inputs=dataclasses.replace(variant.inputs, params=params),
                               source=dataclasses.replace(variant.source, sha256=None))
    return tiny, c.checkpoint, encoded


@pytest.mark.parametrize("tier_variant", _PERCEIVER_TIER)
def test_perceiver_tier_runs_end_to_end_from_caches(tier_variant, tmp_path, monkeypatch):
    """The Perceiver tier's own path (cached checkpoint and input files, convert_file with the
    hub config, from_pretrained, perceiver.real_input / real_outputs, the value check) on a
    tiny stand-in whose published values are the original network's on the same files. A
    wrong token offset or mask, crop, patch layout, scale or output slice makes it fail."""
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))
    tiny, checkpoint, files = _perceiver_stand_in(tier_variant)
    _put_in_cache(tiny.source.url, checkpoint.read_bytes(), tiny.source.filename)
    for url, data in files.items():
        _put_in_cache(url, data)
    try:
        check_published(tiny, False, tmp_path, monkeypatch)
    except pytest.skip.Exception as skipped:  # the stand-in made every file: a skip is a failure here
        pytest.fail(f"the tier skipped its own stand-in: {skipped}")
