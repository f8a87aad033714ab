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
from converters.registry import PublishedValues, family_module
from fixtures import harness
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
        outputs = family_module(variant.family).real_outputs(model, variant, files)
    diffs = [compare(p.output, torch.tensor(p.values), harness.select(outputs, p.output), p.atol, 0.0)
             for p in published]
    record(diffs)
    assert_parity(diffs, f"{variant.name} against its published values")


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
    cached = downloads.cache_path_for(variant.source.url, variant.source.filename)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(c.checkpoint.read_bytes())

    family = family_module(variant.family)
    tiny = dataclasses.replace(variant, config=c.spec, inputs=inputs, published=())
    hf_input = family.real_input(tiny, [downloads.fetch(f) for f in variant.inputs.files])
    reference = c.original.forward(c.original.build(c.spec, harness.SEED),
                                            hf_input["pixel_values"].transpose(1, 2))
    expected = [PublishedValues(p.output, tuple(harness.select(reference, p.output).flatten().tolist()), 1e-4)
                for p in variant.published if p.values is not None] or [
        PublishedValues("logits[0, :3]", tuple(reference["logits"][0, :3].tolist()), 1e-4)]
    check_published(dataclasses.replace(tiny, published=tuple(expected)), False, tmp_path, monkeypatch)
