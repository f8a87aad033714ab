"""The conversion path shared by the CLI and the parity harness:
file -> original state dict -> HF state dict (+ config, processor) -> output dir.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from . import downloads, errors, flax_files, haiku_files, output_dir, state_dicts, torch_files
from .errors import shown
from .family import Variant
from .registry import family, hub_config_values

log = logging.getLogger("convert_parity")


def load_original_state_dict(path, variant: Variant) -> dict[str, torch.Tensor]:
    """Read the original checkpoint the way its repo saved it, safely, as a flat
    mapping of tensors: torch keys as saved (wrapper prefix removed), Flax and
    Haiku trees flattened with "/" (Haiku state entries under "state/")."""
    source = variant.source
    if source.container == "torch":
        checkpoint = torch_files.load_torch_checkpoint(path)
        weights = state_dicts.find_state_dict(checkpoint, source.container_keys, source.prefix or None)
        return torch_files.checked_tensors(weights, Path(path))
    if source.container == "flax_msgpack":
        return flax_files.load_flax_msgpack(path, source.container_keys)
    if source.container == "haiku_pickle":
        return haiku_files.load_haiku_pickle(path)
    raise errors.CheckpointError(f"{variant.family}: unknown container type {source.container!r}")


def hf_model_class(variant: Variant):
    import transformers

    return getattr(transformers, family(variant.family).model_class(variant.config))


def for_installed_transformers(variant: Variant, converted: Mapping) -> dict:
    """The converted state dict under the installed transformers' own key names.

    What is written to disk may follow another line's schema (from_pretrained
    renames on load); the family's `installed_schema` gives the installed line's names
    for in-memory `load_state_dict`.
    """
    return family(variant.family).installed_schema(converted)


def check_against_model(variant: Variant, converted: Mapping, config) -> None:
    """Refuse, before anything is written, weights that do not fit the HF model the
    config describes: missing or extra keys, or a tensor of the wrong shape (with
    both shapes). The model is built on the meta device: no memory, no init."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in hf_model_class(variant)(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in for_installed_transformers(variant, converted).items()}
    problems = []
    if missing := sorted(set(expected) - set(got)):
        problems.append(f"{len(missing)} key(s) missing: {missing[:10]}")
    if extra := sorted(set(got) - set(expected)):
        problems.append(f"{len(extra)} unexpected key(s): {extra[:10]}")
    if wrong := [f"{k}: checkpoint {got[k]}, model {expected[k]}" for k in sorted(set(got) & set(expected))
                 if got[k] != expected[k]]:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: " + "; ".join(wrong[:10]))
    if problems:
        raise errors.CheckpointError(f"the checkpoint does not fit {variant.name}: " + "; ".join(problems))


def spec_of(variant: Variant) -> dict:
    return dict(variant.config)


def load_label_names(variant: Variant) -> dict[int, str] | None:
    """id2label from the hub's label-files repo, if it can be had (cached, or online
    when the hub answers); else None, with one warning saying why: the config then
    carries LABEL_i."""
    label_file = variant.config.get("label_file")
    if not label_file:
        return None
    try:
        path = downloads.fetch(f"hf://datasets/huggingface/label-files/{label_file}")
    except errors.DownloadError as err:
        log.warning("label names not available (%s): writing LABEL_i", err)
        return None
    return {int(k): v for k, v in json.loads(Path(path).read_text()).items()}


def load_cached_checkpoint(path: Path, variant: Variant, from_cache: bool) -> dict[str, torch.Tensor]:
    """load_original_state_dict; a download cache entry that fails to load is removed, so
    that no later run reuses it, and the error says so (still one line)."""
    try:
        return load_original_state_dict(path, variant)
    except errors.CheckpointError as err:
        removed = downloads.discard_cached(path) if from_cache else None
        if removed is None:
            raise
        raise errors.CheckpointError(f"{err}; removed the cached copy {removed}, it will be downloaded again") from err


def convert_file(variant: Variant, checkpoint: str, out_dir, *, spec: Mapping | None = None,
                 overwrite: bool = False, hub_config: bool = False, progress=print,
                 verify: Callable | None = None) -> Path:
    """Convert one original checkpoint file (or URL) to a `from_pretrained` directory.
    hub_config: write the published hub config's values where they differ from the
    original's computation (registry.hub_config_values), not the original's.

    verify: `(staged_dir, checkpoint_path, state_dict_box, conversion_seconds, spec) -> {name: text}`,
    run on the written model before the output directory appears; the files it returns are
    written beside the model (parity.json, README.md). The box holds the original state
    dict the loader read, for the callee to take (the converted tensors are released first)."""
    fam = family(variant.family)
    spec = dict(spec or spec_of(variant))
    if hub_config:
        spec.update(hub_config_values(variant))
    local = () if downloads.is_url(checkpoint) else (checkpoint,)
    out = output_dir.check_output_dir(out_dir, overwrite, protected=local)  # before any slow work
    t0 = time.perf_counter()
    steps = 5 if verify else 4
    progress(f"[1/{steps}] fetching {shown(checkpoint)}")
    path = downloads.fetch(checkpoint, filename=variant.source.filename or None, sha256=variant.source.sha256,
                           container=variant.source.container)
    output_dir.check_output_dir(out, overwrite, protected=(path,))  # a download's cache entry counts too
    progress(f"[2/{steps}] loading {shown(path)} ({path.stat().st_size / 2**20:.1f} MiB)")
    original = load_cached_checkpoint(path, variant, from_cache=downloads.is_url(checkpoint))
    progress(f"[3/{steps}] converting {len(original)} tensors")
    try:
        converted = fam.convert(original, spec)
    except KeyError as err:  # a rename table meeting a key it has no rule for
        raise errors.CheckpointError(f"the checkpoint does not fit {variant.name}: {err}") from err
    labels = load_label_names(variant)
    config = fam.hf_config(spec, labels)
    check_against_model(variant, converted, config)
    count = len(converted)
    progress(f"[4/{steps}] writing {out}")
    box = [original]
    del original  # the box owns it now: `verify` takes it out, and nothing else keeps it alive
    with output_dir.atomic_output_dir(out, overwrite=overwrite, protected=(path,)) as staged:
        output_dir.write_model(staged, converted, config, fam.hf_processor(spec))
        del converted
        seconds = time.perf_counter() - t0
        if verify is not None:
            progress(f"[5/{steps}] verifying against the original model ({seconds:.1f} s so far)")
            output_dir.write_text_files(staged, verify(staged, path, box, seconds, spec))
    box.clear()
    for warning in fam.user_warnings(variant):  # port differences users must handle
        log.warning("%s: %s", variant.name, warning)
    unnamed = "; label names not available, the config has LABEL_i" if variant.config.get("label_file") and not labels else ""
    progress(f"done in {time.perf_counter() - t0:.1f} s: {count} tensors -> {out}{unnamed}")
    return out
