"""Torch checkpoints, loaded through torch's own weights-only unpickler so that nothing
in the file runs.

What torch's unpickler already guarantees (torch/_weights_only_unpickler.py): only
allow-listed globals are resolved, BUILD and SETITEMS act only on tensors, Parameters,
plain dicts and allow-listed types (never on a function or a class), persistent ids
name storages only, and protocol-2 names (`__builtin__`, `copy_reg`) are read as their
Python 3 names.

What this module adds:
- the file's format is decided first: TorchScript archives and legacy tar files are
  refused by name, compressed zip records (which torch would inflate in memory) too;
- every global the pickle names is listed before loading: callables that only attack
  are refused by name; other unknown globals (training configs, optimizer classes,
  numpy arrays) are registered for this one load as inert stand-ins that record their
  arguments as data, so neither REDUCE nor BUILD can turn them into behaviour;
- legacy (non-zip) files are read by our own loop around torch's unpickler, so that a
  storage the file never fills is refused instead of handing out uninitialised memory;
- the state dict's tensors are checked: dense CPU tensors of numeric dtypes whose bytes
  lie inside their storage, with nothing attached.
"""
from __future__ import annotations

import builtins
import os
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import _weights_only_unpickler as weights_only

from .array_trees import MAX_NODES
from .errors import CheckpointError, shown
from .input_files import check_input_file

# Modules whose callables run commands, load code or reach the system or the file
# system. No checkpoint needs one: a pickle naming one is hostile or broken, and is
# refused even where other unknown objects become inert stand-ins.
HOSTILE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code", "codeop",
    "ctypes", "pickle", "_pickle", "marshal", "types", "operator", "functools", "webbrowser", "multiprocessing",
    "signal", "io", "_io", "pathlib", "tempfile", "posixpath", "ntpath", "glob", "inspect", "pdb", "timeit",
    "threading", "_thread", "asyncio", "http", "urllib", "ftplib", "smtplib", "telnetlib", "xmlrpc", "zipimport",
    "pkgutil", "site", "builtins", "__builtin__", "copyreg", "copy_reg", "gc", "resource", "mmap",
})
# builtins a data pickle may construct: plain containers and numbers.
DATA_BUILTINS = {name: getattr(builtins, name) for name in
                 ("frozenset", "slice", "range", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool")}
# torch names that reach files or compiled code; torch's unpickler does not allow
# them either, but a pickle naming one is an attack, not a training config.
HOSTILE_TORCH = ("torch.from_file", "torch.load", "torch.save", "torch.jit.", "torch.hub.", "torch.ops.",
                 "torch._C.", "torch.classes.", "torch.utils.cpp_extension", "torch.package.", "torch._dynamo.",
                 "torch.fx.", "torch.compile", "torch._ops.", "torch.library.", "torch.backends.")
# Tensor rebuilders torch allows that no dense checkpoint uses.
UNUSED_REBUILDERS = frozenset(f"torch._utils.{n}" for n in (
    "_rebuild_sparse_tensor", "_rebuild_nested_tensor", "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass", "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_qtensor")) | {"torch._tensor._rebuild_from_type_v2"}

NUMERIC_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool})

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_ZIP_MAGIC = b"PK\x03\x04"


# ---- inert stand-ins ----------------------------------------------------------------

class InertRecord:
    """What an unknown pickled object became: its global's name and whatever the pickle
    passed it, as plain data. Never imported, never called."""

    def __init__(self, qualified_name: str, args: tuple):
        self.qualified_name, self.args = qualified_name, args

    def __repr__(self) -> str:
        return f"<inert {shown(self.qualified_name)}>"


def _stand_in(qualified_name: str, made: dict[int, InertRecord]) -> type:
    """A class to register under `qualified_name` for one load. torch's unpickler
    calls it (REDUCE) or its __new__ (NEWOBJ); either way the result is a fresh
    OrderedDict, which is all SETITEMS (dict subclasses such as yacs' CfgNode) and BUILD
    may act on: items and attributes land in that one dict, nothing else changes."""

    def new(cls, *args, **kwargs):
        obj = OrderedDict()
        obj.pickled_args = args  # kept as data on this one dict, for whoever inspects it
        made[id(obj)] = InertRecord(qualified_name, args)
        return obj

    return type("Inert", (), {"__new__": new, "__qualname__": qualified_name})


class NumpyDtype:
    """A numpy dtype as the pickle describes it: numpy pickles one as `numpy.dtype(name)`
    followed by BUILD with its byte order, and BUILD may act only on types registered
    for the load, so this stands in for numpy's own class. Only numeric dtypes are ever
    decoded; any other (object, string) is kept as its name."""

    def __init__(self, name, align=False, copy=False):
        import numpy as np

        self.name = name
        numeric = isinstance(name, str) and name[:1] in "fiub" and name[1:].isdigit() and name[1:] in "1248"
        self.dtype = np.dtype(name) if numeric else None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=")):
            raise CheckpointError("a numpy dtype in the file has a malformed state")
        if self.dtype is not None and state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(made: dict[int, InertRecord]):
    """numpy scalars (an epoch, a best accuracy) as Python numbers, decoded from exactly
    their dtype's bytes; a scalar of any other dtype stays an inert record."""
    import numpy as np

    def scalar(dtype, data=b""):
        if not isinstance(dtype, NumpyDtype):
            raise CheckpointError("a numpy scalar in the file has no dtype")
        if dtype.dtype is None:
            return _stand_in(f"numpy scalar of dtype {dtype.name}", made)()
        if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
            raise CheckpointError("a numpy scalar in the file does not match its dtype")
        return np.frombuffer(data, dtype.dtype)[0].item()

    return scalar


def _inert_array(qualified_name: str, made: dict[int, InertRecord]) -> type:
    """numpy arrays stay inert (no weight of these families is stored as one), so no
    array of a declared size is ever allocated: the stand-in takes the BUILD state numpy
    pickles (a tuple holding shape, dtype and data) and keeps none of it."""

    class InertArray:
        def __init__(self, *args, **kwargs):
            made[id(self)] = InertRecord(qualified_name, ())

        def __setstate__(self, state):
            pass

    return InertArray


def _numpy_stand_ins(made: dict[int, InertRecord]) -> dict[str, Any]:
    """numpy scalars decoded as numbers, numpy arrays inert."""
    names: dict[str, Any] = {"numpy.dtype": NumpyDtype, "numpy.ndarray": _inert_array("numpy.ndarray", made)}
    for core in ("numpy.core", "numpy._core"):
        names[f"{core}.multiarray.scalar"] = _numpy_scalar(made)
        for array_fn in ("multiarray._reconstruct", "numeric._frombuffer"):
            names[f"{core}.{array_fn}"] = _inert_array(f"{core}.{array_fn}", made)
    return names


def _is_hostile(qualified: str) -> bool:
    if not qualified.isprintable():
        return True  # no Python name holds control characters; terminal escapes do
    module = qualified.rpartition(".")[0]
    if module.split(".")[0] in HOSTILE_MODULES and not (module == "builtins" and qualified[9:] in DATA_BUILTINS):
        return True
    return qualified.startswith(HOSTILE_TORCH) or qualified in UNUSED_REBUILDERS


def _safe_globals_for(names: list[str], made: dict[int, InertRecord]) -> list[tuple[Any, str]]:
    """(replacement, name) pairs for torch.serialization.safe_globals: every global the
    file names that torch does not allow already."""
    for name in sorted(names):
        if _is_hostile(name):
            raise CheckpointError(f"refusing to unpickle {shown(name)}: the file would call it while loading, "
                                  f"which no checkpoint needs (hostile or corrupt file); nothing was run")
    numpy_names = _numpy_stand_ins(made) if any(n.startswith("numpy") for n in names) else {}
    pairs = []
    for name in names:
        if name.startswith("builtins."):
            pairs.append((DATA_BUILTINS[name[9:]], name))
        else:
            pairs.append((numpy_names.get(name) or _stand_in(name, made), name))
    # classes whose instances BUILD may act on (torch checks the type against these)
    pairs += [(v, f"convert_parity.{v.__qualname__}.{i}") for i, v in enumerate(numpy_names.values())
              if isinstance(v, type)]
    return pairs


# ---- the file's format --------------------------------------------------------------

def _format_of(head: bytes) -> str:
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80":
        return "legacy"
    if len(head) >= 512 and _tar_checksum_ok(head[:512]):
        return "tar"  # a pre-POSIX tar header has no magic, only its checksum
    return "unknown"


def _tar_checksum_ok(block: bytes) -> bool:
    try:
        recorded = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return recorded == sum(block[:148]) + 8 * 32 + sum(block[156:512])


def _check_zip(path: Path, size: int) -> None:
    """What the zip holds, read from its central directory alone (no record is
    inflated): a torch.save archive, not TorchScript, every record stored uncompressed
    and inside the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (a damaged zip: {shown(err)})") from None
    names = [i.filename for i in infos]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), which runs code when loaded; "
                              f"export a plain state dict instead: torch.save(model.state_dict(), path)")
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no data.pkl among "
                              f"{len(names)} records)")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{path}: record {shown(info.filename)} is compressed; torch.save never "
                                  f"compresses, and inflating it could take far more memory than the file's size")
        if info.header_offset + info.file_size > size:
            raise CheckpointError(f"{path}: record {shown(info.filename)} lies beyond the end of the file")


# ---- loading --------------------------------------------------------------------------

def load_torch_checkpoint(path: str | os.PathLike, mmap: bool = True) -> Any:
    """The object a torch checkpoint holds, loaded without running anything from it.

    Tensors load memory-mapped (zip format); unknown pickled objects come back as
    OrderedDicts of their data and are named in one warning.
    """
    path = Path(path)
    size = check_input_file(path)
    with open(path, "rb") as fh:
        head = fh.read(512)
    fmt = _format_of(head)
    if fmt == "tar":
        raise CheckpointError(f"{path} is a tar archive (torch's legacy tar format from before 0.4, or no "
                              f"checkpoint at all), which this tool does not read: extracting one can create links "
                              f"and devices; re-save the weights with a current torch.save(model.state_dict(), path)")
    if fmt == "unknown":
        raise CheckpointError(f"{path} is not a readable torch checkpoint (neither a torch zip archive nor a "
                              f"legacy torch file: starts with {shown(head[:8])})")
    made: dict[int, InertRecord] = {}
    try:
        if fmt == "zip":
            _check_zip(path, size)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            with torch.serialization.safe_globals(_safe_globals_for(names, made)):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        else:
            obj = _load_legacy(path, size, made)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            EOFError, struct.error, OverflowError, UnicodeDecodeError, AssertionError, MemoryError,
            RecursionError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({_first_line(err)})") from None
    inert = list(_find_inert(obj, made))
    if inert:
        listed = ", ".join(f"{shown(where)} ({shown(name)})" for where, name in inert[:20])
        more = f" and {len(inert) - 20} more" if len(inert) > 20 else ""
        warnings.warn(f"{path.name}: skipped pickled object(s) that are not tensors, kept as inert data: "
                      f"{listed}{more}", stacklevel=2)
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err)
    # torch wraps its unpickler's reason in a long explanation (and a suggestion to
    # load with weights_only=False, which is exactly what must not be done here).
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation of torch.load")[0]
    return f"{type(err).__name__}: {shown(' '.join(text.split()))}"


# ---- the legacy (non-zip) format ------------------------------------------------------

def _load_legacy(path: Path, size: int, made: dict[int, InertRecord]) -> Any:
    """torch's legacy layout: pickles of the magic number, the protocol version and the
    system info, then the object (storages as persistent ids), then the list of storage
    keys, then each storage's bytes in that order. Each storage is allocated zeroed,
    only after its declared size fits in what is left of the file, and must be filled
    exactly once: a storage the file never fills would otherwise hand out whatever was
    in memory."""
    storages: dict[str, tuple[torch.UntypedStorage, int]] = {}  # key -> (storage, element size)
    declared = 0

    def persistent_load(pid):
        nonlocal declared
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unexpected persistent id in a legacy checkpoint")
        _, storage_type, key, _location, numel, view = pid
        dtype = getattr(storage_type, "dtype", None)
        if dtype not in NUMERIC_DTYPES or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{path}: a storage of the legacy checkpoint is malformed")
        if key not in storages:
            element = torch._utils._element_size(dtype)
            declared += numel * element
            if declared > size:
                raise CheckpointError(f"{path}: its storages declare {declared} bytes, more than the file's "
                                      f"{size} bytes could fill")
            storages[key] = (torch.zeros(numel * element, dtype=torch.uint8).untyped_storage(), element)
        storage = storages[key][0]
        if view is not None:
            raise CheckpointError(f"{path}: legacy storage views (torch < 0.4) are not supported")
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    with open(path, "rb") as fh:
        def next_pickle():
            start = fh.tell()
            names = [n for n in weights_only.get_globals_in_pkl(fh) if n not in weights_only._get_allowed_globals()]
            fh.seek(start)
            unpickler = weights_only.Unpickler(fh, encoding="utf-8")
            unpickler.persistent_load = persistent_load
            with torch.serialization.safe_globals(_safe_globals_for(names, made)):
                return unpickler.load()

        if next_pickle() != _LEGACY_MAGIC:
            raise CheckpointError(f"{path} is not a readable torch checkpoint (a pickle, but not torch.save's)")
        next_pickle()  # protocol version
        sys_info = next_pickle()
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise CheckpointError(f"{path}: only little-endian legacy checkpoints are supported")
        obj = next_pickle()
        keys = next_pickle()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise CheckpointError(f"{path}: the file fills {len(keys) if isinstance(keys, list) else 0} "
                                  f"storage(s) but its tensors use {len(storages)}: a storage it does not fill "
                                  f"would hold uninitialised memory")
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{path}: the file fills a storage twice")
        for key in keys:
            storage, element = storages[key]
            (count,) = struct.unpack("<q", fh.read(8).ljust(8, b"\0"))
            if count * element != storage.nbytes():
                raise CheckpointError(f"{path}: storage {shown(key)} has {count} elements in the file, "
                                      f"{storage.nbytes() // element} in its tensors")
            buffer = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            if storage.nbytes() and fh.readinto(buffer) != storage.nbytes():
                raise CheckpointError(f"{path}: the file ends inside storage {shown(key)}")
    return obj


# ---- walking what was loaded ----------------------------------------------------------


def _find_inert(obj: Any, made: Mapping[int, InertRecord]) -> Iterator[tuple[str, str]]:
    """(where, global) for every stand-in in the loaded object: iterative, each
    container visited once (a pickle of shared references is a DAG whose naive walk
    never ends), and bounded."""
    if not made:
        return
    seen, stack, visited = set(), [("", obj)], 0
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        visited += 1
        if visited > MAX_NODES:
            raise CheckpointError(f"the checkpoint holds more than {MAX_NODES} objects")
        if id(node) in made:
            yield path or "<root>", made[id(node)].qualified_name
        if isinstance(node, Mapping):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node))))


def checked_tensors(weights: Mapping[str, Any], path: Path, size: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict's tensors as plain dense CPU tensors, each one's bytes inside
    its storage (a stride-0 view of one element cannot stand for a billion), their
    total bounded by the file's size, nothing attached (hooks, metadata, subclasses)."""
    size = size if size is not None else os.path.getsize(path)
    out, total, seen = {}, 0, set()
    for key, t in weights.items():
        where = f"{path}: tensor {shown(key)}"
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"{where} is a {shown(type(t).__name__)}, not a plain tensor")
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.dtype not in NUMERIC_DTYPES:
            raise CheckpointError(f"{where} is not a dense CPU tensor of a numeric dtype "
                                  f"({t.layout}, {t.device}, {t.dtype})")
        storage = t.untyped_storage()
        extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n) + 1 if t.numel() else 0
        if t.numel() * t.element_size() > storage.nbytes() or extent * t.element_size() > storage.nbytes():
            raise CheckpointError(f"{where} of shape {tuple(t.shape)} claims more bytes than its storage holds "
                                  f"({storage.nbytes()})")
        if (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()) not in seen:
            seen.add((storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()))
            total += t.numel() * t.element_size()
        if total > 2 * size + (1 << 20):
            raise CheckpointError(f"{path}: its tensors would take {total} bytes, far more than the file's {size}")
        out[key] = t.detach().resolve_conj().resolve_neg()  # detach: a plain Tensor, no hooks
    return out
