"""Everything that touches files: safe loading, finding the state dict, the
download cache and writing the converted model. Converters never do I/O.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

log = logging.getLogger("convert_parity")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with what was found instead."""


class DownloadError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------

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


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")


def load_torch_checkpoint(path: str | os.PathLike, mmap: bool = True) -> Any:
    """torch.load without executing code from the file.

    Tensors load (memory-mapped when the zip format allows); any other pickled
    object (a training config, an argparse Namespace, a payload) becomes an inert
    stand-in that is never imported or called, and a warning names it.
    """
    path = Path(path)
    _check_file(path)
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


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """A plain pickle (Haiku params) holding only containers and numpy arrays.

    Anything else is refused with an error naming the object.
    """
    path = Path(path)
    _check_file(path)

    class Refusing(RestrictedUnpickler):
        policy = "refuse"

    try:
        with open(path, "rb") as fh:
            return Refusing(fh).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated/garbage pickles raise many types
        raise CheckpointError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------
# Finding the state dict inside a container
# --------------------------------------------------------------------------

DEFAULT_CONTAINER_KEYS = ("model_state", "state_dict", "model", "module", "target_encoder", "params")
DEFAULT_PREFIXES = ("model.", "module.")


def _is_weights(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:30]) + "}"
    return type(obj).__name__


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
                                  f"or at the top level; found {_describe(checkpoint)}")
    prefixes = (prefix,) if prefix else DEFAULT_PREFIXES
    for p in prefixes:
        if all(k.startswith(p) for k in found):
            return {k[len(p):]: v for k, v in found.items()}
    return dict(found)


def _flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten_tree(v, key + "/"))
        else:
            flat[key] = v
    return flat


def _to_tensors(flat: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Arrays as tensors sharing their memory. Only read-only arrays (views of an
    immutable buffer) are copied, so that no tensor aliases memory it may not write."""
    import numpy as np

    bad = {k: type(v).__name__ for k, v in flat.items() if not isinstance(v, (np.ndarray, np.generic))}
    if bad:
        raise CheckpointError(f"{path}: expected only arrays in the parameter tree, found {dict(list(bad.items())[:10])}")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    return {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}


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


def _subtree(tree: Any, container_keys: tuple[str, ...]) -> Mapping | None:
    for key in container_keys:
        node = tree
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node:
            return node
    return None


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
    _check_file(path)
    try:
        skeleton = _unpack_msgpack(path, lambda n, data: _ArraySlot(n))
        found = _subtree(skeleton, container_keys)
        if found is None:
            raise CheckpointError(f"{path}: no parameter tree under {', '.join(container_keys)}; "
                                  f"found {_describe(skeleton)}")
        wanted = {v for v in _flatten_tree(found).values() if isinstance(v, _ArraySlot)}
        tree = _unpack_msgpack(path, lambda n, data: _decode_flax_array(data) if n in wanted else None)
        # flax splits arrays over 2 GiB into chunks; reassemble them
        params = serialization._unchunk_array_leaves_in_place(_subtree(tree, container_keys))
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable Flax msgpack checkpoint ({type(err).__name__}: {err})") from err
    return _to_tensors(_flatten_tree(params), path)


def load_haiku_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A Haiku params pickle ({module: {name: array}}, or {"params", "state"} for
    models with batch norm), read with the refusing unpickler, flattened as
    "module/name" and "state/module/name"."""
    obj = load_pickle_restricted(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of Haiku modules, found {type(obj).__name__}")
    params, state = (obj["params"], obj.get("state") or {}) if "params" in obj else (obj, {})
    flat = _flatten_tree(params)
    flat.update(_flatten_tree(state, "state/"))
    return _to_tensors(flat, Path(path))


# --------------------------------------------------------------------------
# Downloads through one cache
# --------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("CONVERT_PARITY_CACHE", Path.home() / ".cache" / "convert-parity"))


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("CONVERT_PARITY_OFFLINE", "HF_HUB_OFFLINE"))


def parse_hub_url(url: str) -> tuple[str, str, str, str] | None:
    """(repo_type, repo_id, revision, filename) for hf:// and huggingface.co URLs."""
    if url.startswith("hf://"):
        parts = url[5:].split("/")
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        return repo_type, "/".join(parts[:2]), "main", "/".join(parts[2:])
    m = re.match(r"https://huggingface\.co/(datasets/|spaces/)?([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)", url)
    if m:
        repo_type = m.group(1)[:-2] if m.group(1) else "model"
        return repo_type, m.group(2), m.group(3), m.group(4)
    return None


def parse_drive_id(url: str) -> str | None:
    m = re.search(r"drive\.google\.com/(?:.*?/)?(?:file/d/|(?:open|uc)\?(?:.*&)?id=)([\w-]+)", url)
    return m.group(1) if m else None


def cache_path_for(url: str, filename: str | None = None) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = filename or Path(urllib.parse.urlparse(url).path).name or "download"
    return cache_root() / digest / name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify_cached(path: Path, url: str, expected_sha256: str | None) -> Path:
    recorded = path.with_name(path.name + ".sha256")
    want = expected_sha256 or (recorded.read_text().split()[0] if recorded.exists() else None)
    if want:
        got = sha256_file(path)
        if got != want:
            raise DownloadError(f"cached file {path} for {url} has sha256 {got}, expected {want}; "
                                f"delete it to download again")
    return path


def _stream_url(url: str, dest: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _download_drive(file_id: str, dest: Path, progress: bool) -> None:
    import gdown

    if gdown.download(id=file_id, output=str(dest), quiet=not progress) is None:
        raise DownloadError(f"gdown could not download Google Drive file {file_id}")


def fetch(location: str | os.PathLike, *, filename: str | None = None, sha256: str | None = None,
          progress: bool = True, downloader: Callable[[str, Path, bool], None] | None = None) -> Path:
    """A local path for `location`: a file path, an hf:// or huggingface.co URL,
    a Google Drive link, or a plain http(s) URL.

    Downloads land in a temporary file beside their cache entry, are hashed and
    renamed into place only when complete; the sha256 is recorded next to the
    file and checked on every later use. Offline (HF_HUB_OFFLINE=1 or
    CONVERT_PARITY_OFFLINE=1) only cached files are used.
    """
    location = str(location)
    if "://" not in location:
        path = Path(location).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path

    hub = parse_hub_url(location)
    if hub is not None:
        return _fetch_hub(location, *hub)

    dest = cache_path_for(location, filename)
    if dest.exists():
        return _verify_cached(dest, location, sha256)
    if is_offline():
        raise DownloadError(f"offline and not cached: {location} (expected at {dest})")
    drive_id = parse_drive_id(location)
    if downloader is None:
        downloader = (lambda _u, d, p: _download_drive(drive_id, d, p)) if drive_id else _stream_url
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            downloader(location, tmp, progress)
        except DownloadError:
            raise
        except Exception as err:
            raise DownloadError(f"download failed for {location} (cache path {dest}): {err}") from err
        got = sha256_file(tmp)
        if sha256 and got != sha256:
            raise DownloadError(f"download of {location} has sha256 {got}, expected {sha256}")
        # The hash is recorded before the file appears: a cache entry never exists unverifiable.
        dest.with_name(dest.name + ".sha256").write_text(f"{got}  {dest.name}\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _fetch_hub(url: str, repo_type: str, repo_id: str, revision: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                    local_files_only=is_offline()))
    except Exception as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise DownloadError(f"could not get {url} ({'offline, ' if is_offline() else ''}hub cache {HF_HUB_CACHE}): "
                            f"{type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------
# Writing the converted model
# --------------------------------------------------------------------------

class OutputExistsError(FileExistsError):
    pass


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a non-empty output directory (or a file in its place) unless `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise OutputExistsError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace it")
    return out_dir


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces
    `out_dir` in one rename, on any error (or interrupt) it is removed.

    A non-empty `out_dir` is refused unless `overwrite`; an existing one is kept
    until the new one is complete.
    """
    out_dir = check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "previous")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """The safetensors format, streamed: one tensor in memory at a time, written from
    its own storage (memory-mapped input pages are read, never duplicated whole).

    safetensors' save_file first turns every tensor into bytes in memory, which
    doubles the peak for a large checkpoint.
    """
    import json

    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name in sorted(tensors):
            t = tensors[name].detach().contiguous()  # copies only tensors a reshape left strided
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, no copy


def save_converted(state_dict: Mapping[str, torch.Tensor], config, out_dir: str | os.PathLike, *,
                   processor=None, overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write what `from_pretrained` reads: config.json, model.safetensors, the
    processor config, without building a model (the converted tensors are the model)."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        write_safetensors(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        if processor is not None:
            processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)

