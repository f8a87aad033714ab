"""Nested parameter trees (Flax, Haiku): numeric arrays made from a file's bytes, walking,
flattening and turning arrays into tensors.

A loaded file decides the shape of everything here. Every walk is iterative and bounded:
a recursive walk of a deeply nested structure raises RecursionError, and a walk of a
shared one never ends (L = [L, L] forty levels deep is a 300-byte pickle with 2**40
paths). A parameter tree is a tree, so a node reached twice is refused.
"""
from __future__ import annotations

import functools
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .errors import CheckpointError, shown

MAX_DEPTH = 64  # Haiku params are 2 levels deep, Flax TrainStates about 8 (a chunked array adds 2)
MAX_NODES = 1_000_000  # the largest original checkpoint has a few thousand
MAX_RANK = 32  # numpy's limit before 2.0
SLACK = 1 << 20  # what a loader may allocate for arrays beyond the file's size


class TreeError(CheckpointError):
    """A loaded structure that is no parameter tree. The message names no file: the
    loader that read it adds the path."""


# ---- arrays from raw bytes -------------------------------------------------------------

@functools.cache
def numeric_dtypes() -> dict:
    """The dtypes a parameter array may have, by numpy name (the name Flax writes).
    Never object (its bytes are pointers), string, void or structured."""
    import numpy as np

    names = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64")
    dtypes = {name: np.dtype(name) for name in names}
    try:
        import ml_dtypes  # jax's bfloat16; installed with jax
    except ImportError:
        pass
    else:
        dtypes["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
    return dtypes


def dtype_names() -> str:
    return ", ".join(numeric_dtypes())


class Budget:
    """The bytes a loader may allocate for arrays. Every legitimate array's bytes are in
    the file once, so about the file's size: a tiny file cannot make a huge array, and
    one buffer referenced a thousand times cannot make a thousand arrays."""

    def __init__(self, file_size: int):
        self.file_size, self.left = file_size, file_size + SLACK

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise CheckpointError(f"{what} would need {nbytes} bytes, and the arrays made so far leave "
                                  f"{max(self.left, 0)} of the {self.file_size + SLACK} bytes a "
                                  f"{self.file_size}-byte file can hold")
        self.left -= nbytes


def checked_shape(shape: Any) -> tuple[int, ...]:
    """A shape read from a file: a tuple or list of at most MAX_RANK non-negative ints
    whose product numpy can represent."""
    if not isinstance(shape, (tuple, list)) or len(shape) > MAX_RANK:
        raise CheckpointError(f"an array shape that is {_kind(shape)}, not a tuple of at most {MAX_RANK} sizes")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"an array shape with an entry that is not a non-negative int: "
                              f"{shown([d if type(d) is int and abs(d) < 2**64 else _kind(d) for d in shape])}")
    if math.prod(max(d, 1) for d in shape) >= 2**48:
        raise CheckpointError(f"an array shape with more than 2**48 elements: {shape}")
    return tuple(shape)


def array_nbytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def array_from_bytes(buffer, dtype, shape: tuple[int, ...], budget: Budget, *, order: str = "C",
                     swapped: bool = False):
    """The array of `shape` and `dtype` (one of numeric_dtypes()) whose bytes are exactly
    `buffer`, in native byte order, writable. A bytearray buffer is viewed, not copied
    (the caller makes sure no two arrays view one buffer); anything else is copied, and
    the copy is taken from `budget`. `swapped`: the bytes are in the other byte order."""
    import numpy as np

    nbytes = array_nbytes(shape, dtype)
    if len(buffer) != nbytes:
        raise CheckpointError(f"an array of shape {shape} and dtype {dtype.name} takes {nbytes} bytes, "
                              f"and its data has {len(buffer)}")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
    if swapped and dtype.itemsize > 1:
        budget.take(nbytes, f"an array of shape {shape} in the other byte order")
        array = array.byteswap()  # a copy: byteswap works for every numeric dtype, bfloat16 too
    elif not (isinstance(buffer, bytearray) and array.flags.aligned):
        budget.take(nbytes, f"an array of shape {shape}")
        array = array.copy(order="K")
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise CheckpointError(f"a bool array of shape {shape} holding bytes other than 0 and 1")
    return array


# ---- walking -------------------------------------------------------------------------------

def _kind(obj: Any) -> str:
    return f"a {type(obj).__name__}"


def key_text(key: Any) -> str:
    """A key as an error shows it: strings quoted and escaped, other keys by type."""
    if isinstance(key, str):
        return shown(repr(key))
    if type(key) is int and abs(key) < 10**18:
        return str(key)
    return f"<{type(key).__name__}>"


def where(path: tuple) -> str:
    if len(path) > 8:  # a deep path is shown by its ends
        return f"{where(path[:3])}/...({len(path) - 6} levels)/{where(path[-3:])}"
    return "/".join(key_text(k) for k in path) if path else "the top level"


def is_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping)


def is_container(obj: Any) -> bool:
    return isinstance(obj, (Mapping, list, tuple))


def _children(node: Any) -> list:
    return list(node.items()) if isinstance(node, Mapping) else list(enumerate(node))


def walk(tree: Any, descend: Callable[[Any], bool] = is_mapping, *, max_depth: int = MAX_DEPTH,
         max_nodes: int = MAX_NODES) -> Iterator[tuple[tuple, Any]]:
    """Every node of `tree` as (path of keys, node), parents before children, in order;
    descends the nodes `descend` accepts (default: mappings). Iterative. Refuses a
    container reached twice (a DAG or cycle), nesting deeper than max_depth and more
    than max_nodes nodes. A leaf may be reached twice (one array under two names is
    two tensors sharing memory)."""
    seen: set[int] = set()
    stack = [((), tree)]
    count = 0
    while stack:
        path, node = stack.pop()
        count += 1
        if count > max_nodes:
            raise TreeError(f"the tree has more than {max_nodes} nodes, far more than any checkpoint")
        inner = descend(node) and len(node) > 0  # () is one object everywhere: never "shared"
        if inner:
            if id(node) in seen:
                raise TreeError(f"the parameter tree shares a node (a DAG or cycle), which no checkpoint has: "
                                f"{where(path)} is reached a second time")
            seen.add(id(node))
            if len(path) >= max_depth:
                raise TreeError(f"the tree is nested deeper than {max_depth} levels at {where(path)}")
        yield path, node
        if inner:
            stack.extend(((*path, k), v) for k, v in reversed(_children(node)))


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """The leaves of a tree of mappings as {"outer/inner/name": leaf}; keys must be strings
    and no two leaves may flatten to the same name."""
    if not isinstance(tree, Mapping):
        raise TreeError(f"the parameter tree is {_kind(tree)}, not a mapping")
    flat: dict[str, Any] = {}
    for path, node in walk(tree):
        if path and not isinstance(path[-1], str):
            raise TreeError(f"a key of type {type(path[-1]).__name__} at {where(path[:-1])}; "
                            f"parameter names are strings")
        if path and not isinstance(node, Mapping):
            key = prefix + "/".join(path)
            if key in flat:
                raise TreeError(f"two entries flatten to the same name {shown(repr(key))}")
            flat[key] = node
    return flat


def describe(obj: Any) -> str:
    """The top level of a loaded structure for an error: keys and their value types."""
    if isinstance(obj, Mapping):
        items = itertools.islice(obj.items(), 30)
        more = ", ..." if len(obj) > 30 else ""
        return "{" + ", ".join(f"{key_text(k)}: {type(v).__name__}" for k, v in items) + more + "}"
    return type(obj).__name__


def subtree(tree: Any, container_keys: tuple[str, ...]) -> Mapping | None:
    for key in container_keys:
        node = tree
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node:
            return node
    return None


def to_tensors(flat: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Arrays as tensors sharing their memory. Only read-only arrays (views of an
    immutable buffer) are copied, so that no tensor aliases memory it may not write.
    bfloat16 (ml_dtypes, which torch.from_numpy does not know) goes through its bits."""
    import numpy as np

    allowed = set(numeric_dtypes().values())
    bad = {k: type(v).__name__ if not isinstance(v, (np.ndarray, np.generic)) else f"array of dtype {v.dtype}"
           for k, v in flat.items() if not isinstance(v, (np.ndarray, np.generic)) or v.dtype not in allowed}
    if bad:
        shown_bad = ", ".join(f"{shown(repr(k))}: {shown(v)}" for k, v in itertools.islice(bad.items(), 10))
        raise CheckpointError(f"{path}: expected only arrays of {dtype_names()} in the parameter tree, "
                              f"found {{{shown_bad}}}" + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    tensors = {}
    for k, v in flat.items():
        a = np.asarray(v)
        a = a if a.flags.writeable else a.copy()
        if a.dtype.name == "bfloat16":
            tensors[k] = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        else:
            tensors[k] = torch.from_numpy(a)
    return tensors


def native_byte_order(byteorder: str) -> bool:
    """Whether numpy's byte order character means this machine's order."""
    return byteorder in "=|" or byteorder == {"little": "<", "big": ">"}[sys.byteorder]
