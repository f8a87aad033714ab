"""What `convert --verify` leaves beside the model: parity.json (the numbers) and a model
card (README.md, with card metadata) stating them."""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Mapping

from .family import Variant
from .registry import family

PIPELINE_TAGS = {"timesformer": "video-classification", "xclip": "zero-shot-classification",
                 "vivit": "video-classification", "vit_msn": "image-feature-extraction"}
PERCEIVER_TAGS = {"PerceiverForMaskedLM": "fill-mask", "PerceiverForOpticalFlow": "image-to-image",
                  "PerceiverForMultimodalAutoencoding": None}  # the other classes classify images
_VERSIONED = ("convert-parity", "transformers", "torch", "numpy", "safetensors", "jax", "flax", "dm-haiku")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def converter_version(variant: Variant, spec: Mapping) -> dict:
    """The package version and a digest of the rule table the conversion applied: the
    digest changes exactly when the mapping does."""
    rows = [[r.source, list(r.targets), r.op.name if r.op else None] for r in family(variant.family).table(spec)]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"package": metadata.version("convert-parity"), "family": variant.family,
            "model_class": family(variant.family).model_class(spec), "rule_table_sha256": digest,
            "rules": len(rows)}


def _diff(d) -> dict:
    return {"output": d.key, "max_abs": d.max_abs, "max_rel": d.max_rel, "index": list(d.index),
            "out_of_tolerance": d.mismatched, "elements": d.total, "non_finite": d.nonfinite, "within": d.ok}


def parity_record(verdict, variant: Variant, spec: Mapping, checkpoint: Mapping, hub_config: bool,
                  conversion_seconds: float) -> dict:
    """parity.json: everything needed to judge and replay the verdict."""
    used = verdict.input
    return {
        "variant": variant.name, "hub_id": variant.hub_id, "family": variant.family,
        "outcome": verdict.outcome, "exit_code": verdict.exit_code,
        "compared_against": f"the project's re-implementation of the original {variant.family} model in the "
                            f"original framework, carrying this checkpoint's weights",
        "tolerance": {"scale_rtol": 0.0, **verdict.tolerance,
                      "rule": "|hf - original| <= atol + rtol * |original| + scale_rtol * max |original| (per output)"},
        "input": {"kind": used.kind, "description": used.description, "seed": used.seed,
                  "files": [{"url": u, "sha256": h} for u, h in used.files],
                  "why_not_recipe": used.why_not_recipe or None},
        "outputs": [_diff(d) for d in verdict.outputs],
        "known_divergences": [{"name": d.name, "source": d.source, "detail": d.detail} for d in verdict.divergences],
        "weights_check": [_diff(d) for d in verdict.weights_check],
        "localisation": verdict.localisation.record() if verdict.localisation is not None else None,
        "localisation_error": verdict.localisation_error or None,
        "checkpoint": dict(checkpoint),
        "config": {"hub_config": hub_config, "spec": {k: v for k, v in spec.items()}},
        "converter": converter_version(variant, spec),
        "versions": versions(),
        "seconds": {"conversion": conversion_seconds, **verdict.seconds},
    }


def _card_metadata(variant: Variant, spec: Mapping, verdict) -> str:
    from huggingface_hub import ModelCardData

    tag = (PERCEIVER_TAGS.get(spec.get("model_class"), "image-classification") if variant.family == "perceiver"
           else PIPELINE_TAGS.get(variant.family))
    data = ModelCardData(library_name="transformers", pipeline_tag=tag,
                         tags=["convert-parity", variant.family, f"parity-{verdict.outcome}"])
    return data.to_yaml()


def model_card(record: Mapping, variant: Variant, spec: Mapping, verdict) -> str:
    """README.md: card metadata, then the verdict and its numbers in words and a table."""
    tol = record["tolerance"]
    lines = [f"---\n{_card_metadata(variant, spec, verdict)}\n---", "",
             f"# {variant.hub_id}, converted by convert-parity", "",
             f"Converted from the original checkpoint (sha256 `{record['checkpoint']['sha256']}`) with "
             f"convert-parity {record['converter']['package']} (rule table "
             f"`{record['converter']['rule_table_sha256'][:16]}`, {record['converter']['rules']} rules).", "",
             "## Parity with the original", "",
             {"pass": "**Verified**: on the same input, every output of this model is within the family tolerance "
                      "of the original model carrying the same weights.",
              "fail": "**FAILED**: this model does not reproduce the original model carrying the same weights. "
                      "Do not use it; parity.json holds the numbers and the first diverging layer.",
              "known-divergence": "**Known divergence**: the weights are converted right (the original run with "
                                  "the HF side's structure matches), but this model computes something else than "
                                  "the original: " + "; ".join(f"{d['name']} ({d['source']})"
                                                               for d in record["known_divergences"]) + "."
              }[verdict.outcome], "",
             f"- compared against: {record['compared_against']}",
             f"- input: {verdict.input.describe()}",
             f"- tolerance: atol {tol['atol']:g}, rtol {tol['rtol']:g}, scale_rtol {tol['scale_rtol']:g} "
             f"({tol['rule']})",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()), "",
             "| output | max abs | max rel | out of tolerance | index of max abs |",
             "|---|---|---|---|---|"]
    lines += [f"| {o['output']} | {o['max_abs']:.3g} | {o['max_rel']:.3g} | {o['out_of_tolerance']}/{o['elements']} "
              f"| {tuple(o['index'])} |" for o in record["outputs"]]
    if record["weights_check"]:
        lines += ["", "Weights check (the original run with the HF side's structure):", "",
                  "| output | max abs | max rel | out of tolerance |", "|---|---|---|---|"]
        lines += [f"| {o['output']} | {o['max_abs']:.3g} | {o['max_rel']:.3g} | {o['out_of_tolerance']}/{o['elements']} |"
                  for o in record["weights_check"]]
    if verdict.localisation is not None:
        lines += ["", "First diverging layer:", "", "```", verdict.localisation.describe(), "```"]
    return "\n".join(lines) + "\n"


def evidence_files(verdict, variant: Variant, spec: Mapping, checkpoint: Mapping, hub_config: bool,
                   conversion_seconds: float) -> dict[str, str]:
    record = parity_record(verdict, variant, spec, checkpoint, hub_config, conversion_seconds)
    return {"parity.json": json.dumps(record, indent=2, default=str) + "\n",
            "README.md": model_card(record, variant, spec, verdict)}
