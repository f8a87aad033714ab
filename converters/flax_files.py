"""Flax msgpack checkpoints, read as a stream."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .array_trees import describe, flatten_tree, subtree, to_tensors
from .errors import CheckpointError
from .input_files import check_input_file


_FLAX_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray


def _decode_flax_array(data: bytes):
    """One array of flax's msgpack ext encoding, in a writable buffer of its own (flax
    returns a read-only view of the payload, which would need a second copy)."""
    import msgpack
    import numpy as np
    from flax import serialization

    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    array = np.empty(shape, dtype=serialization._dtype_from_name(dtype_name))
    array.reshape(-1).view(np.uint8)[:] = np.frombuffer(buffer, np.uint8)
    return array


class _ArraySlot(int):
    """Stands for the n-th array of a msgpack file in the first, skeleton-only pass."""


def _unpack_msgpack(path: Path, decode_array) -> Any:
    """The msgpack tree of `path`, read as a stream; `decode_array(n, payload)` makes
    the n-th array. Other ext types (numpy scalars, complex) go through flax's decoder."""
    import msgpack
    from flax import serialization

    count = 0

    def ext_hook(code, data):
        nonlocal count
        if code != _FLAX_NDARRAY_EXT:
            return serialization._msgpack_ext_unpack(code, data)
        count += 1
        return decode_array(count - 1, data)

    size = path.stat().st_size
    with open(path, "rb") as fh:
        unpacker = msgpack.Unpacker(fh, ext_hook=ext_hook, raw=False, strict_map_key=False,
                                    max_buffer_size=max(size, 1 << 20))
        tree = unpacker.unpack()
        if unpacker.tell() != size:
            raise ValueError(f"{size - unpacker.tell()} bytes of trailing data after the checkpoint")
    return tree


def load_flax_msgpack(path: str | os.PathLike, container_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A Flax msgpack checkpoint (msgpack builds only dicts and arrays, no code runs),
    its parameter tree found under the first of `container_keys` present
    ("optimizer/target" in legacy TrainStates, "params" in newer ones), flattened
    with "/".

    Two streamed passes instead of flax's msgpack_restore, which wants the whole file
    as one bytes object and decodes every array, the optimizer's moments too (2.0x
    the file at the peak, measured): the first reads the tree's skeleton, the second
    decodes only the arrays under the parameter tree.
    """
    from flax import serialization

    path = Path(path)
    check_input_file(path)
    try:
        skeleton = _unpack_msgpack(path, lambda n, data: _ArraySlot(n))
        found = subtree(skeleton, container_keys)
        if found is None:
            raise CheckpointError(f"{path}: no parameter tree under {', '.join(container_keys)}; "
                                  f"found {describe(skeleton)}")
        wanted = {v for v in flatten_tree(found).values() if isinstance(v, _ArraySlot)}
        tree = _unpack_msgpack(path, lambda n, data: _decode_flax_array(data) if n in wanted else None)
        # flax splits arrays over 2 GiB into chunks; reassemble them
        params = serialization._unchunk_array_leaves_in_place(subtree(tree, container_keys))
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable Flax msgpack checkpoint ({type(err).__name__}: {err})") from err
    return to_tensors(flatten_tree(params), path)
