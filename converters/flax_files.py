"""Flax msgpack checkpoints, read as a stream: plain containers and numeric arrays only.

msgpack builds only maps, lists, strings and numbers; arrays are Flax's ext type 1,
(shape, dtype name, bytes) packed again (flax/serialization.py `_ndarray_to_bytes`).
Arrays are made here, not by flax: a numeric dtype by name, the data exactly
shape x itemsize bytes, and no more bytes allocated in all than the file holds.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .array_trees import (MAX_NODES, MAX_RANK, Budget, array_from_bytes, array_nbytes, checked_shape, describe, dtype_names,
                          flatten_tree, numeric_dtypes, subtree, to_tensors)
from .errors import CheckpointError, exception_text, shown
from .input_files import check_input_file

# flax.serialization._MsgpackExtType
_NDARRAY, _COMPLEX, _SCALAR = 1, 2, 3
# flax.serialization._chunk: arrays over MAX_CHUNK_SIZE (1 GiB) are stored as
# {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat part, ...}}
_CHUNKED = "__msgpack_chunked_array__"


def _array_payload(code: int, data: bytes):
    """(shape, dtype, bytes) of one ext value, checked; the bytes are not yet an array."""
    import msgpack

    if code not in (_NDARRAY, _SCALAR):
        raise CheckpointError("a complex number, not an array" if code == _COMPLEX
                              else f"msgpack ext type {code}, which flax does not write")
    try:  # the payload is (shape, dtype name, bytes): a shape of at most MAX_RANK ints
        payload = msgpack.unpackb(data, raw=True, max_array_len=MAX_RANK, max_map_len=0, max_str_len=64,
                                  max_bin_len=len(data), max_ext_len=0)
    except Exception as err:
        raise CheckpointError(f"an array whose header cannot be read ({exception_text(err)})") from None
    if not (isinstance(payload, list) and len(payload) == 3):
        raise CheckpointError("an array whose header is not flax's (shape, dtype, bytes)")
    shape, name, buffer = payload
    dtype = numeric_dtypes().get(name.decode("ascii", "replace")) if isinstance(name, bytes) else None
    if dtype is None:
        shown_name = shown(repr(name.decode("ascii", "backslashreplace"))) if isinstance(name, bytes) else \
            f"a {type(name).__name__}"
        raise CheckpointError(f"an array of dtype {shown_name}, which is not a numeric dtype ({dtype_names()})")
    shape = checked_shape(shape)
    if not isinstance(buffer, bytes):
        raise CheckpointError(f"an array whose data is a {type(buffer).__name__}, not bytes")
    if code == _SCALAR and shape != ():
        raise CheckpointError(f"a numpy scalar of shape {shape}")
    if len(buffer) != array_nbytes(shape, dtype):
        raise CheckpointError(f"an array of shape {shape} and dtype {dtype.name} takes "
                              f"{array_nbytes(shape, dtype)} bytes, and its data has {len(buffer)}")
    return shape, dtype, buffer


class _Ext:
    """One ext value as the first, skeleton-only pass saw it: its number in the file, its
    size, or what is wrong with it (raised only if it is under the parameter tree)."""

    __slots__ = ("n", "nbytes", "problem")

    def __init__(self, n: int, nbytes: int = 0, problem: str | None = None):
        self.n, self.nbytes, self.problem = n, nbytes, problem


def _skeleton_ext(n: int, code: int, data: bytes) -> _Ext:
    try:
        return _Ext(n, len(_array_payload(code, data)[2]))
    except CheckpointError as err:
        return _Ext(n, problem=str(err))


def _unpack_msgpack(path: Path, size: int, ext: Callable[[int, int, bytes], Any]) -> Any:
    """The msgpack tree of `path`, read as a stream; `ext(n, code, payload)` makes the n-th
    ext value. No length in the file may exceed the file, and no container may claim more
    entries than the file has bytes (msgpack allocates a list of the claimed length)."""
    import msgpack

    count = 0

    def ext_hook(code, data):
        nonlocal count
        count += 1
        return ext(count - 1, code, data)

    with open(path, "rb") as fh:
        unpacker = msgpack.Unpacker(fh, ext_hook=ext_hook, raw=False, strict_map_key=False,
                                    max_buffer_size=size, max_str_len=size, max_bin_len=size, max_ext_len=size,
                                    max_array_len=min(size, MAX_NODES), max_map_len=min(size // 2, MAX_NODES))
        tree = unpacker.unpack()
        if unpacker.tell() != size:
            raise ValueError(f"{size - unpacker.tell()} bytes of trailing data after the checkpoint")
    return tree


def _join_chunked(flat: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Flattened chunked arrays ("w/__msgpack_chunked_array__", "w/shape/0", "w/chunks/0")
    joined into one array "w"; one pass over the keys."""
    import numpy as np

    heads = {key[: -len(_CHUNKED)] for key in flat if key == _CHUNKED or key.endswith("/" + _CHUNKED)}
    if not heads:
        return flat
    if "" in heads:
        raise CheckpointError("the parameter tree is itself one chunked array")
    parts: dict[str, dict[str, dict[str, Any]]] = {h: {"shape": {}, "chunks": {}} for h in heads}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parent, _, last = key.rpartition("/")  # "w/shape", "0"
        head, _, group = parent.rpartition("/")  # "w", "shape"
        if last == _CHUNKED and parent + "/" in heads:
            continue
        if group in ("shape", "chunks") and head and head + "/" in heads:
            parts[head + "/"][group][last] = value
        else:
            out[key] = value
    for head, part in parts.items():
        name = head[:-1]
        shape = checked_shape(_as_tuple(part["shape"], name, "shape"))
        chunks = _as_tuple(part["chunks"], name, "chunks")
        if not chunks or not all(isinstance(c, np.ndarray) and c.ndim == 1 and c.dtype == chunks[0].dtype
                                 for c in chunks):
            raise CheckpointError(f"{shown(repr(name))}: a chunked array whose chunks are not flat arrays of one dtype")
        if sum(c.size for c in chunks) != math.prod(shape):
            raise CheckpointError(f"{shown(repr(name))}: a chunked array of shape {shape} whose chunks hold "
                                  f"{sum(c.size for c in chunks)} elements")
        budget.take(sum(c.nbytes for c in chunks), f"the chunked array {shown(repr(name))}")
        if name in out:
            raise CheckpointError(f"two entries flatten to the same name {shown(repr(name))}")
        out[name] = np.concatenate(chunks).reshape(shape)
    return out


def _as_tuple(numbered: dict[str, Any], name: str, what: str) -> tuple:
    """flax's _dict_to_tuple: {"0": a, "1": b} -> (a, b), the keys exactly 0..n-1."""
    if sorted(numbered) != sorted(str(i) for i in range(len(numbered))):
        raise CheckpointError(f"{shown(repr(name))}: a chunked array whose {what} is not numbered 0..n-1")
    return tuple(numbered[str(i)] for i in range(len(numbered)))


def load_flax_msgpack(path: str | os.PathLike, container_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A Flax msgpack checkpoint (msgpack builds only dicts and arrays, no code runs),
    its parameter tree found under the first of `container_keys` present
    ("optimizer/target" in legacy TrainStates, "params" in newer ones), flattened
    with "/".

    Two streamed passes instead of flax's msgpack_restore, which wants the whole file
    as one bytes object and decodes every array, the optimizer's moments too (2.0x
    the file at the peak, measured): the first reads the tree's skeleton and checks
    every array under the parameter tree (dtype, shape, data length) before anything
    is allocated, the second decodes only those arrays.
    """
    path = Path(path)
    size = check_input_file(path)
    try:
        skeleton = _unpack_msgpack(path, size, _skeleton_ext)
        found = subtree(skeleton, container_keys)
        if found is None:
            raise CheckpointError(f"no parameter tree under {', '.join(container_keys)}; "
                                  f"found {describe(skeleton)}")
        slots = {key: leaf for key, leaf in flatten_tree(found).items() if isinstance(leaf, _Ext)}
        if bad := next((key for key, slot in slots.items() if slot.problem), None):
            raise CheckpointError(f"{shown(repr(bad))} is {slots[bad].problem}")
        wanted = {slot.n: key for key, slot in slots.items()}
        declared = sum(slot.nbytes for slot in slots.values())
        if declared > size:  # each array's bytes are in the file: only a file changed under us gets here
            raise CheckpointError(f"its arrays declare {declared} bytes, more than the file's {size}")
        budget = Budget(size)

        def decode(n: int, code: int, data: bytes):
            if n not in wanted:
                return None
            try:
                shape, dtype, buffer = _array_payload(code, data)
                array = array_from_bytes(buffer, dtype, shape, budget)
            except CheckpointError as err:  # the file changed since the first pass
                raise CheckpointError(f"{shown(repr(wanted[n]))} is {err}") from None
            return array[()] if code == _SCALAR else array

        tree = _unpack_msgpack(path, size, decode)
        params = _join_chunked(flatten_tree(subtree(tree, container_keys)), budget)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except Exception as err:  # msgpack's own errors (truncated, trailing data, too deep) and the like
        raise CheckpointError(f"{path} is not a readable Flax msgpack checkpoint "
                              f"({exception_text(err)})") from err
    return to_tensors(params, path)
