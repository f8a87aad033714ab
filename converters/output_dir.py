"""Writing the converted model: the output directory, atomically, and safetensors streamed."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .errors import OutputExistsError, OutputPathError, shown


# What a conversion writes (transformers' save_pretrained names). --overwrite replaces a
# directory only if it holds nothing else: a previous output, never a folder of the
# user's files or checkpoints.
OUTPUT_FILES = frozenset({
    "config.json", "model.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "README.md", "parity.json",
    "generation_config.json", "chat_template.jinja", "TOKENIZER_MISSING.md"})


def _os_error(what: str, path: Path, err: OSError) -> OutputPathError:
    return OutputPathError(f"{what} {shown(path)}: {err.strerror or err}")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                     protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """The output directory as an absolute path, refused where writing it could cost
    the user anything: a non-empty directory without `overwrite`, with `overwrite` one
    that holds anything a conversion does not write, a symbolic link (replacing it
    would leave its target as it was and the link gone), the working directory or one
    of its ancestors, and the directory of any `protected` file (the checkpoint) or an
    ancestor of it."""
    out = Path(os.path.abspath(out_dir))
    try:
        if out.is_symlink():
            raise OutputPathError(f"--out {shown(out_dir)} is a symbolic link; pass the directory it points to "
                                  f"({shown(os.path.realpath(out))}) or a new path")
        real = Path(os.path.realpath(out))
        cwd = Path(os.path.realpath(os.getcwd()))
        if real == cwd or real in cwd.parents:
            raise OutputPathError(f"--out {shown(out_dir)} is the working directory or contains it; "
                                  f"pass a new directory for the converted model")
        for item in protected:
            home = Path(os.path.realpath(item)).parent
            if real == home or real in home.parents:
                raise OutputPathError(f"--out {shown(out_dir)} holds the checkpoint {shown(item)}; "
                                      f"pass a new directory for the converted model")
        if not out.exists():
            for parent in out.parents:
                if parent.exists():
                    if not parent.is_dir():
                        raise OutputPathError(f"cannot create --out {shown(out_dir)}: {shown(parent)} is not a directory")
                    break
            return out
        if not out.is_dir():
            raise OutputExistsError(f"--out {shown(out_dir)} exists and is not a directory")
        entries = list(out.iterdir())
    except OSError as err:
        raise _os_error("cannot use --out", out, err) from None
    if entries and not overwrite:
        raise OutputExistsError(f"output directory {shown(out_dir)} exists and is not empty; "
                                f"pass --overwrite to replace it")
    foreign = sorted(p.name for p in entries if p.is_symlink() or not p.is_file() or p.name not in OUTPUT_FILES)
    if foreign:
        raise OutputExistsError(f"output directory {shown(out_dir)} holds files a conversion does not write "
                                f"({', '.join(shown(n) for n in foreign[:5])}); refusing to replace it, "
                                f"--overwrite replaces only a previous output")
    return out


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                      protected: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces
    `out_dir` in one rename, on any error (or interrupt) it is removed, and so are the
    parent directories this call created.

    `out_dir` is checked as `check_output_dir` does; an existing one is kept until the
    new one is complete.
    """
    out_dir = check_output_dir(out_dir, overwrite, protected)
    created = [p for p in reversed(out_dir.parents) if not p.exists()]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name[:100]}.tmp-"))
    except OSError as err:
        _remove_created(created)
        raise _os_error("cannot write the output next to", out_dir, err) from None
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name[:100]}.old-"))
            os.replace(out_dir, old / "previous")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break


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


def write_model(directory: Path, state_dict: Mapping[str, torch.Tensor], config, processor=None) -> None:
    """What `from_pretrained` reads, into `directory`: config.json, model.safetensors, the
    processor config, without building a model (the converted tensors are the model)."""
    config.save_pretrained(directory)
    write_safetensors(state_dict, directory / "model.safetensors", metadata={"format": "pt"})
    if processor is not None:
        processor.save_pretrained(directory)


def write_text_files(directory: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        if name not in OUTPUT_FILES:  # --overwrite must recognise every file a conversion writes
            raise ValueError(f"{name} is not one of the output files (output_dir.OUTPUT_FILES)")
        (directory / name).write_text(text)


def save_converted(state_dict: Mapping[str, torch.Tensor], config, out_dir: str | os.PathLike, *,
                   processor=None, overwrite: bool = False, extra_files: Mapping[str, str] | None = None,
                   protected: tuple[str | os.PathLike, ...] = ()) -> Path:
    """`write_model` into `out_dir`, atomically."""
    with atomic_output_dir(out_dir, overwrite=overwrite, protected=protected) as tmp:
        write_model(tmp, state_dict, config, processor)
        write_text_files(tmp, extra_files or {})
    return Path(out_dir)
