"""Finding the weights inside a loaded torch container and removing wrapper prefixes."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .array_trees import describe
from .errors import CheckpointError

DEFAULT_CONTAINER_KEYS = ("model_state", "state_dict", "model", "module", "target_encoder", "params")
DEFAULT_PREFIXES = ("model.", "module.")


def _is_weights(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def find_state_dict(checkpoint: Any, container_keys: tuple[str, ...] = (), prefix: str | None = None) -> dict:
    """The tensor mapping inside a loaded checkpoint, with its wrapper prefix removed.

    `container_keys` are tried first (a variant knows where its weights are),
    then the usual ones; the checkpoint itself counts if it is already flat. The
    prefix (`model.`, `module.`) is removed only if every key carries it.
    """
    if _is_weights(checkpoint):
        found = checkpoint
    else:
        found = None
        if isinstance(checkpoint, Mapping):
            for key in dict.fromkeys((*container_keys, *DEFAULT_CONTAINER_KEYS)):
                if key in checkpoint and _is_weights(checkpoint[key]):
                    found = checkpoint[key]
                    break
        if found is None:
            wanted = ", ".join(dict.fromkeys((*container_keys, *DEFAULT_CONTAINER_KEYS)))
            raise CheckpointError(f"no state dict found: looked for a tensor mapping under {wanted} "
                                  f"or at the top level; found {describe(checkpoint)}")
    prefixes = (prefix,) if prefix else DEFAULT_PREFIXES
    for p in prefixes:
        if all(k.startswith(p) for k in found):
            return {k[len(p):]: v for k, v in found.items()}
    return dict(found)
