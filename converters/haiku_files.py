"""Haiku params pickles: containers and numeric arrays only."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .array_trees import flatten_tree, to_tensors
from .errors import CheckpointError
from .input_files import check_input_file


# Interim: the unpickler that lived in checkpoint_io, until Haiku files get their own.
class InertObject:
    """Stands in for a pickled object of a class the loader does not trust.

    Holds whatever the pickle passed as plain data; nothing is imported or called.
    """

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # pickled dict subclasses (yacs CfgNode) set items
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):  # and list subclasses append
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def _inert_class(qualified_name: str) -> type:
    return type("Inert", (InertObject,), {"qualified_name": qualified_name})


# Callables a legitimate tensor/numpy checkpoint needs, and nothing else.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    # numpy pickles arrays through _frombuffer(buffer, dtype, shape, order) at protocol 5
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


def _plain_mapping(items=(), /) -> dict:
    """Stands in for Haiku's mapping classes, whose pickles call the class with one
    dict of their items: the same items as a plain dict, Haiku never imported."""
    return dict(items)


# Haiku params pickled 2020-08..2021-12 (Perceiver IO's release) hold FlatMapping
# objects, frozendict before that.
_MAPPING_STANDINS = {
    ("haiku._src.data_structures", "FlatMapping"): _plain_mapping,
    ("haiku._src.data_structures", "frozendict"): _plain_mapping,
}
_TORCH_DTYPES = {str(t).removeprefix("torch.") for t in vars(torch).values() if isinstance(t, torch.dtype)}
_NUMPY_DTYPE_CLASS = re.compile(r"numpy(\._core|\.core)?(\.multiarray)?|numpy\.dtypes")


def _resolve_safe(module: str, name: str):
    import importlib

    if (module, name) in _MAPPING_STANDINS:
        return _MAPPING_STANDINS[(module, name)]
    if (module, name) in _SAFE_GLOBALS or (module == "torch" and name in _TORCH_DTYPES):
        return getattr(importlib.import_module(module), name)
    if module == "numpy.dtypes" and name.endswith("DType"):  # numpy>=2 pickles dtype classes
        return getattr(importlib.import_module(module), name)
    return None


# Modules whose functions run commands, load code or reach the system. No checkpoint
# needs them; a pickle naming one is hostile or broken, and is refused loudly even
# where other unknown objects (training configs) become inert stand-ins.
_HOSTILE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "socket",
                    "importlib", "runpy", "pty", "code", "ctypes", "pickle", "marshal", "types", "operator",
                    "functools", "webbrowser", "multiprocessing", "signal", "io", "pathlib", "tempfile"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_SAFE_GLOBALS`; a global from `_HOSTILE_MODULES`
    is refused; any other becomes an inert stand-in (policy "inert") or is refused
    (policy "refuse")."""

    policy = "inert"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.untrusted: list[str] = []

    def find_class(self, module: str, name: str):
        obj = _resolve_safe(module, name)
        if obj is not None:
            return obj
        qualified = f"{module}.{name}"
        if module.split(".")[0] in _HOSTILE_MODULES:
            raise CheckpointError(f"refusing to unpickle {qualified}: the file would call it while loading, "
                                  f"which no checkpoint needs (hostile or corrupt file); nothing was run")
        if self.policy == "refuse":
            raise CheckpointError(f"refusing to unpickle {qualified}: not an array or a container type")
        self.untrusted.append(qualified)
        return _inert_class(qualified)



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
