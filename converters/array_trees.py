"""Nested parameter trees (Flax, Haiku): walking, flattening and turning arrays into tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError


def describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:30]) + "}"
    return type(obj).__name__


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_tree(v, key + "/"))
        else:
            flat[key] = v
    return flat


def to_tensors(flat: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Arrays as tensors sharing their memory. Only read-only arrays (views of an
    immutable buffer) are copied, so that no tensor aliases memory it may not write."""
    import numpy as np

    bad = {k: type(v).__name__ for k, v in flat.items() if not isinstance(v, (np.ndarray, np.generic))}
    if bad:
        raise CheckpointError(f"{path}: expected only arrays in the parameter tree, found {dict(list(bad.items())[:10])}")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    return {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}


def subtree(tree: Any, container_keys: tuple[str, ...]) -> Mapping | None:
    for key in container_keys:
        node = tree
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node:
            return node
    return None
