"""Writing the converted model: the output directory, atomically, and safetensors streamed."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .errors import OutputExistsError


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
