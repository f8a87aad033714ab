"""Torch checkpoints (zip and legacy formats), loaded without running code from the file."""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import CheckpointError
from .input_files import check_input_file


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


class _RestrictedPickleModule:
    """What torch.load wants as `pickle_module`: our Unpickler, pickle's load API."""

    Unpickler = RestrictedUnpickler
    __name__ = "convert_parity_restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def _find_inert(obj: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, InertObject):
        yield path or "<root>", obj.qualified_name
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _find_inert(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _find_inert(v, f"{path}[{i}]")


def load_torch_checkpoint(path: str | os.PathLike, mmap: bool = True) -> Any:
    """torch.load without executing code from the file.

    Tensors load (memory-mapped when the zip format allows); any other pickled
    object (a training config, an argparse Namespace, a payload) becomes an inert
    stand-in that is never imported or called, and a warning names it.
    """
    path = Path(path)
    check_input_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap,
                         pickle_module=_RestrictedPickleModule)
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # legacy (non-zip) format cannot be mapped
            return load_torch_checkpoint(path, mmap=False)
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {err}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError, IndexError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    inert = list(_find_inert(obj))
    if inert:
        names = ", ".join(f"{where} ({name})" for where, name in inert)
        warnings.warn(f"{path.name}: skipped pickled object(s) that are not tensors, kept as inert data: {names}",
                      stacklevel=2)
    return obj
