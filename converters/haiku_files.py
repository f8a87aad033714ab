"""Haiku params pickles: containers and numeric arrays only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .array_trees import flatten_tree, to_tensors
from .errors import CheckpointError
from .input_files import check_input_file
from .torch_files import RestrictedUnpickler


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """A plain pickle (Haiku params) holding only containers and numpy arrays.

    Anything else is refused with an error naming the object.
    """
    path = Path(path)
    check_input_file(path)

    class Refusing(RestrictedUnpickler):
        policy = "refuse"

    try:
        with open(path, "rb") as fh:
            return Refusing(fh).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated/garbage pickles raise many types
        raise CheckpointError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from err


def load_haiku_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A Haiku params pickle ({module: {name: array}}, or {"params", "state"} for
    models with batch norm), read with the refusing unpickler, flattened as
    "module/name" and "state/module/name"."""
    obj = load_pickle_restricted(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of Haiku modules, found {type(obj).__name__}")
    params, state = (obj["params"], obj.get("state") or {}) if "params" in obj else (obj, {})
    flat = flatten_tree(params)
    flat.update(flatten_tree(state, "state/"))
    return to_tensors(flat, Path(path))
