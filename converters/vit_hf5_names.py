"""The transformers 5.x names of a ViT-family layer (ViViT, ViT-MSN).

Both families write the transformers 4.x names (`encoder.layer.N.attention.attention.
query`, ...): the published checkpoints' names, what 4.57 loads, what 5.x renames on load
(conversion_mapping "ViTModel") and what 5.x's own save_pretrained writes back. For an
in-memory load_state_dict the installed line's names are needed: these.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch

from .rename import rename_keys, rules

# checked against 4.57.6 and 5.23.0
HF5_LAYER = rules(
    ("encoder.layer.{i}.attention.attention.query.{p}", "layers.{i}.attention.q_proj.{p}"),
    ("encoder.layer.{i}.attention.attention.key.{p}", "layers.{i}.attention.k_proj.{p}"),
    ("encoder.layer.{i}.attention.attention.value.{p}", "layers.{i}.attention.v_proj.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.attention.o_proj.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.mlp.fc1.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "layers.{i}.mlp.fc2.{p}"),
    ("encoder.layer.{i}.{norm}.{p}", "layers.{i}.{norm}.{p}"),  # layernorm_before/after
)


def to_hf5_names(state_dict: Mapping[str, torch.Tensor], base: str = "") -> dict[str, torch.Tensor]:
    """4.x names -> 5.x names; keys outside `<base>encoder.layer.` keep theirs."""
    layer = f"{base}encoder.layer."
    inner = [k.removeprefix(base) for k in state_dict if k.startswith(layer)]
    renamed = {base + k: base + new for k, (new,) in rename_keys(inner, HF5_LAYER).items()}
    return {renamed.get(k, k): v for k, v in state_dict.items()}


@functools.cache
def installed_uses_hf5_names(model_class: str) -> bool:
    """Whether the installed transformers names this model's layers the 5.x way
    (asked of the model itself, built on the meta device, not of a version string)."""
    import transformers

    cls = getattr(transformers, model_class)
    config = cls.config_class(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8)
    with torch.device("meta"):
        keys = cls(config).state_dict().keys()
    return not any(".encoder.layer.0." in f".{k}" for k in keys)


def installed_schema(model_class: str, base: str = ""):
    """A family's installed_schema: the 5.x names if the installed line uses them."""
    def schema(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_hf5_names(state_dict, base) if installed_uses_hf5_names(model_class) else dict(state_dict)
    return schema
