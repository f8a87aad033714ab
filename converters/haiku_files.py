"""Haiku params pickles: plain containers and numeric arrays only.

A Haiku params pickle holds dicts (pickled as Haiku's FlatMapping or frozendict in
older releases), numpy arrays and numpy scalars, and so is all this unpickler makes.
Nothing from the file runs and no real function is handed to it: every global the file
names resolves to a stand-in made for this one load, callable with checked arguments
and nothing else (a real numpy function has attributes a BUILD could set, changing
later loads in the same process). Arrays are made here from the pickled shape, dtype
and bytes: numeric dtypes only, the data exactly shape x itemsize bytes, and no more
bytes allocated in all than the file holds. Anything else ends in one error naming
the file and the problem.

The unpickler is pickle's Python one (pickle._Unpickler: its opcode table is a dict
that can be amended; the C unpickler's cannot), run iteratively and with an opcode
budget, reading through a reader that never reads past the file's size.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from .array_trees import (Budget, TreeError, array_from_bytes, checked_shape, dtype_names,
                          flatten_tree, is_container, native_byte_order, numeric_dtypes, to_tensors, walk, where)
from .errors import CheckpointError, exception_text, shown
from .input_files import check_input_file

# Opcodes a Haiku params pickle runs: about 26 per array; the largest Perceiver IO
# (language, 457 arrays) takes 12 058 at protocol 4, 12 046 at 3 (measured on its
# full-size tree). Unbounded, each opcode of one or two bytes can leave a container or a
# stack entry of some 60-100 bytes, and pickle's Python unpickler spends a microsecond
# or more on each: 250 000 bounds both (about 25 MB, a few seconds).
MAX_OPS = 250_000


class _Unreadable(CheckpointError):
    """The bytes are not a well-formed pickle (truncated, corrupt, not a pickle)."""


class _StandIn:
    """What a global named by the file resolves to: a call with checked arguments, and no
    attributes that the file could set."""

    __slots__ = ("name", "_call", "_arity")

    def __init__(self, name: str, call=None, arity: tuple[int, int] = (0, 0)):
        self.name, self._call, self._arity = name, call, arity

    def __call__(self, *args):
        low, high = self._arity
        if self._call is None:
            raise CheckpointError(f"the pickle calls {self.name}, which numpy's pickles only pass as an argument")
        if not low <= len(args) <= high:
            raise CheckpointError(f"the pickle calls {self.name} with {len(args)} arguments; numpy's take "
                                  f"{low if low == high else f'{low} to {high}'}")
        return self._call(*args)


class _Unbuilt:
    """numpy's _reconstruct result: an array that BUILD gives shape, dtype and bytes."""

    __slots__ = ("memo_keys",)

    def __init__(self):
        self.memo_keys: list[Any] = []


class _DType:
    """A dtype as the pickle builds it: numpy.dtype(typecode), then BUILD with its byte order."""

    __slots__ = ("dtype", "swapped", "built")

    def __init__(self, dtype):
        self.dtype, self.swapped, self.built = dtype, False, False


class _Memo(dict):
    """pickle's memo, noting where an unbuilt array is stored, so that BUILD can put the
    finished array there too (numpy memoizes _reconstruct's result before its BUILD)."""

    def __setitem__(self, key, value):
        if type(value) is _Unbuilt:
            value.memo_keys.append(key)
        super().__setitem__(key, value)


class _Opcodes(dict):
    def __missing__(self, code: int):
        raise _Unreadable(f"byte {code:#04x} is no pickle opcode")


class _BoundedReader:
    """The file, read no further than the size it had when checked, so that no length
    in the file makes a read (and its buffer) larger than the file."""

    def __init__(self, fh, size: int):
        self._fh, self.size, self.left = fh, size, size

    def read(self, n: int) -> bytes:
        if n > self.left or n < 0:
            if self.left == 0:
                raise _Unreadable("it ends before its STOP opcode (truncated?)")
            raise _Unreadable(f"at byte {self.size - self.left} it declares {n} bytes, and only {self.left} "
                              f"remain (truncated or corrupt)")
        data = self._fh.read(n)
        self.left -= len(data)
        if len(data) != n:
            raise _Unreadable("the file became shorter while it was read")
        return data

    def readline(self) -> bytes:
        line = self._fh.readline(self.left)
        self.left -= len(line)
        return line


def _refused_opcode(name: str):
    def load(self):
        raise CheckpointError(f"refusing pickle opcode {name}: it builds objects or fetches data "
                              f"outside the file, and a Haiku params pickle holds only dicts, lists, numbers "
                              f"and numpy arrays; nothing was run")
    return load


def _counted(load):
    def counted(self):
        self.ops += 1
        if self.ops > MAX_OPS:
            raise CheckpointError(f"the pickle runs more than {MAX_OPS} opcodes, far more than any Haiku params "
                                  f"pickle (about 26 per array)")
        load(self)
    return counted


class _HaikuUnpickler(pickle._Unpickler):
    def __init__(self, reader: _BoundedReader):
        super().__init__(reader)
        self.memo = _Memo()
        self.reader = reader
        self.budget = Budget(reader.size)
        self.ops = 0
        self._typecodes = {d.str[1:]: d for name, d in numeric_dtypes().items() if name != "bfloat16"}
        ndarray = _StandIn("numpy.ndarray")
        self._ndarray = ndarray
        self._bfloat16 = _StandIn("ml_dtypes.bfloat16")
        self._globals = {("numpy", "ndarray"): ndarray, ("numpy", "dtype"): _StandIn("numpy.dtype", self._dtype, (1, 3)),
                         ("_codecs", "encode"): _StandIn("_codecs.encode", self._encode, (2, 2))}
        for builtins in ("__builtin__", "builtins"):  # protocols 0-2 write b"" as bytes(), in Python 2's name
            self._globals[(builtins, "bytes")] = _StandIn(f"{builtins}.bytes", bytearray, (0, 0))
        if "bfloat16" in numeric_dtypes():
            self._globals[("ml_dtypes", "bfloat16")] = self._bfloat16
        for numpy_core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x names
            self._globals[(f"{numpy_core}.multiarray", "_reconstruct")] = _StandIn(
                f"{numpy_core}.multiarray._reconstruct", self._reconstruct, (3, 3))
            self._globals[(f"{numpy_core}.multiarray", "scalar")] = _StandIn(
                f"{numpy_core}.multiarray.scalar", self._scalar, (2, 2))
            self._globals[(f"{numpy_core}.numeric", "_frombuffer")] = _StandIn(
                f"{numpy_core}.numeric._frombuffer", self._frombuffer, (4, 4))
        # Haiku params pickled 2020-08..2021-12 (Perceiver IO's release) hold FlatMapping
        # objects, frozendict before that; both pickle as the class called with one dict.
        for name in ("FlatMapping", "frozendict"):
            self._globals[("haiku._src.data_structures", name)] = _StandIn(
                f"haiku._src.data_structures.{name}", self._mapping, (0, 1))

    def find_class(self, module: str, name: str):
        found = self._globals.get((module, name))
        if found is None:
            raise CheckpointError(f"refusing to unpickle {shown(f'{module}.{name}')}: the file would call it while "
                                  f"loading, and a Haiku params pickle holds only dicts, lists, numbers and numpy "
                                  f"arrays; nothing was run")
        return found

    # ---- the stand-ins' calls ------------------------------------------------------------

    def _dtype(self, typecode, align=False, copy=True) -> _DType:
        if typecode is self._bfloat16:
            dtype = numeric_dtypes()["bfloat16"]
        else:
            dtype = self._typecodes.get(typecode) if isinstance(typecode, str) else None
        if dtype is None:
            shown_code = shown(repr(typecode)) if isinstance(typecode, str) else f"a {type(typecode).__name__}"
            raise CheckpointError(f"an array of dtype {shown_code}, which is not a numeric dtype ({dtype_names()})")
        if align is not False:
            raise CheckpointError("an aligned (structured) dtype")
        return _DType(dtype)

    def _built_dtype(self, spec) -> _DType:
        if type(spec) is not _DType:
            raise CheckpointError(f"an array whose dtype is a {type(spec).__name__}, not a numpy dtype")
        return spec

    def _reconstruct(self, subtype, shape, typecode) -> _Unbuilt:
        # numpy writes _reconstruct(ndarray, (0,), b'b') and gives the real shape in BUILD;
        # anything else (another shape, a subclass) is not numpy's pickle
        if subtype is not self._ndarray or shape != (0,) or not (typecode == b"b" or typecode == "b"):
            raise CheckpointError("numpy's _reconstruct called with arguments numpy never writes "
                                  "(it writes ndarray, (0,), b'b')")
        return _Unbuilt()

    def _frombuffer(self, buffer, spec, shape, order):
        if order not in ("C", "F"):
            raise CheckpointError(f"an array of order {shown(repr(order))}")
        return self._array(buffer, self._built_dtype(spec), shape, order)

    def _scalar(self, spec, data):
        spec = self._built_dtype(spec)
        if not isinstance(data, (bytes, bytearray)):
            raise CheckpointError(f"a numpy scalar whose data is a {type(data).__name__}")
        return array_from_bytes(data, spec.dtype, (), self.budget, swapped=spec.swapped)[()]

    def _encode(self, text, encoding):
        # pickle protocols 0-2 write bytes as _codecs.encode(str, 'latin1')
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise CheckpointError("_codecs.encode called with arguments pickle never writes (it writes a str, 'latin1')")
        self.budget.take(len(text), "a byte string")
        return bytearray(text, "latin1")

    def _mapping(self, items=None) -> dict:
        if items is None:
            return {}
        if type(items) not in (dict, list, tuple):
            raise CheckpointError(f"a Haiku mapping made from a {type(items).__name__}")
        return dict(items)

    def _array(self, buffer, spec: _DType, shape, order: str):
        if not isinstance(buffer, (bytes, bytearray)):
            raise CheckpointError(f"an array whose data is a {type(buffer).__name__}, not bytes")
        return array_from_bytes(buffer, spec.dtype, checked_shape(shape), self.budget, order=order,
                                swapped=spec.swapped)

    def _array_from_state(self, state):
        # ndarray.__reduce__'s state: (version 1, shape, dtype, is_fortran, data); 4-tuples predate the version
        if type(state) is not tuple or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise CheckpointError(f"an array state that is {_shape_of(state)}, not numpy's (1, shape, dtype, "
                                  f"fortran, data)")
        shape, spec, fortran, data = state[-4:]
        if type(fortran) is not bool:
            raise CheckpointError(f"an array state whose Fortran flag is a {type(fortran).__name__}")
        return self._array(data, self._built_dtype(spec), shape, "F" if fortran else "C")

    # ---- opcodes whose behaviour is narrowed ---------------------------------------------

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is _Unbuilt:
            array = self._array_from_state(state)
            self.stack[-1] = array
            for key in target.memo_keys:
                if self.memo.get(key) is target:
                    self.memo[key] = array
        elif type(target) is _DType and not target.built:
            target.swapped = not native_byte_order(_dtype_state_byteorder(state))
            target.built = True
        else:
            what = target.name if type(target) is _StandIn else f"a {type(target).__name__}"
            raise CheckpointError(f"refusing BUILD on {what}: a Haiku params pickle sets the state of numpy "
                                  f"arrays and dtypes only; nothing was run")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if type(func) is not _StandIn:
            raise CheckpointError(f"refusing REDUCE on a {type(func).__name__}: a Haiku params pickle calls "
                                  f"nothing but numpy's array and dtype constructors; nothing was run")
        if type(args) is not tuple:
            raise _Unreadable(f"REDUCE's arguments are a {type(args).__name__}, not a tuple")
        self.stack[-1] = func(*args)

    def _new_bytes(self, n: int):
        """BINBYTES as a bytearray read from the file: an array can view it, and needs
        no second copy of its bytes (the tensor shares that memory). No length larger
        than the file is allocated."""
        if n > self.reader.size:
            raise _Unreadable(f"it declares a {n}-byte string, more than the whole file")
        buffer = bytearray(n)
        self.readinto(buffer)
        if len(buffer) != n:
            raise _Unreadable("it ends inside a byte string (truncated)")
        self.append(buffer)

    def load_binbytes(self):
        self._new_bytes(int.from_bytes(self.read(4), "little"))

    def load_short_binbytes(self):
        self._new_bytes(self.read(1)[0])

    def load_binbytes8(self):
        self._new_bytes(int.from_bytes(self.read(8), "little"))

    def load_bytearray8(self):  # pickle's own allocates the declared length before reading
        self._new_bytes(int.from_bytes(self.read(8), "little"))

    def _target(self, kind: type, opcode: str):
        target = self.stack[-1]
        if type(target) is not kind:
            raise CheckpointError(f"refusing {opcode} on a {type(target).__name__}: in a Haiku params pickle "
                                  f"only {kind.__name__}s take it; nothing was run")
        return target

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict, "SETITEM")[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target(dict, "SETITEMS")
        if len(items) % 2:
            raise _Unreadable("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    dispatch = _Opcodes({code: _counted(load) for code, load in pickle._Unpickler.dispatch.items()})
    for _name, _load in (("BUILD", load_build), ("REDUCE", load_reduce), ("BINBYTES", load_binbytes),
                         ("SHORT_BINBYTES", load_short_binbytes), ("BINBYTES8", load_binbytes8),
                         ("BYTEARRAY8", load_bytearray8),
                         ("SETITEM", load_setitem), ("SETITEMS", load_setitems), ("APPEND", load_append),
                         ("APPENDS", load_appends)):
        dispatch[getattr(pickle, _name)[0]] = _counted(_load)
    # objects built by calling a class, extension registry entries, persistent ids and
    # out-of-band buffers: none of them in a Haiku params pickle
    for _name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID",
                  "NEXT_BUFFER", "READONLY_BUFFER"):
        dispatch[getattr(pickle, _name)[0]] = _refused_opcode(_name)
    del _name, _load


def _shape_of(obj: Any) -> str:
    return f"a {len(obj)}-tuple" if type(obj) is tuple else f"a {type(obj).__name__}"


def _dtype_state_byteorder(state) -> str:
    """The byte order in numpy's dtype state (version 3 or 4, byte order, subarray,
    names, fields, itemsize, alignment, flags[, metadata]); numeric dtypes have no
    subarray, names or fields."""
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise CheckpointError(f"a dtype state that is {_shape_of(state)}, not numpy's (3, byte order, ...)")
    if state[1] not in ("<", ">", "|", "=") or state[2:5] != (None, None, None):
        raise CheckpointError("a dtype state with a byte order or fields that no numeric dtype has")
    return state[1]


_LEAF_TYPES = (str, int, float, bool, type(None), bytes, bytearray)


def _check_loaded(obj: Any) -> None:
    """The unpickled structure: a tree (no node reached twice, bounded depth and size) of
    containers, plain values and finished arrays; none of the loader's own objects."""
    import numpy as np

    for path, node in walk(obj, is_container):
        if not is_container(node) and not isinstance(node, (*_LEAF_TYPES, np.ndarray, np.generic)):
            what = {_Unbuilt: "an array that never got its data (no BUILD)", _DType: "a bare numpy dtype",
                    _StandIn: f"a bare reference to {getattr(node, 'name', '?')}"}.get(type(node), _shape_of(node))
            raise CheckpointError(f"{what} at {where(path)}, where a Haiku params pickle has arrays or values")


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """A plain pickle (Haiku params) holding only containers, numbers, strings and numpy
    arrays; anything else is refused with one error naming the file and the object."""
    path = Path(path)
    size = check_input_file(path)
    try:
        with open(path, "rb") as fh:
            obj = _HaikuUnpickler(_BoundedReader(fh, size)).load()
        _check_loaded(obj)
        return obj
    except _Unreadable as err:
        raise CheckpointError(f"{path} is not a readable pickle: {err}") from err
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except Exception as err:  # truncated or garbage pickles raise many types
        raise CheckpointError(f"{path} is not a readable pickle ({exception_text(err)})") from err


def load_haiku_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A Haiku params pickle ({module: {name: array}}, or {"params", "state"} for
    models with batch norm), read with the refusing unpickler, flattened as
    "module/name" and "state/module/name"."""
    obj = load_pickle_restricted(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of Haiku modules, found a {type(obj).__name__}")
    # key test, not isinstance: the ImageNet files are {"params", "state"}, the others the params themselves
    params, state = (obj["params"], obj.get("state")) if "params" in obj else (obj, None)
    for name, tree in (("params", params), ("state", state)):
        if tree is not None and not isinstance(tree, Mapping):
            raise CheckpointError(f"{path}: the Haiku {name} entry is a {type(tree).__name__}, not a mapping of "
                                  f"modules")
    try:
        flat = flatten_tree(params)
        if state:
            flat_state = flatten_tree(state, "state/")
            if clash := next(iter(flat.keys() & flat_state.keys()), None):
                raise TreeError(f"params and state both hold {shown(repr(clash))}")
            flat.update(flat_state)
    except TreeError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return to_tensors(flat, path)
