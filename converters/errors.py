"""The errors every loader and writer raises (one line each, shown as `error: ...`),
and how text taken from a file is shown in them."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with what was found instead."""


class DownloadError(RuntimeError):
    pass


class OutputExistsError(FileExistsError):
    pass


class OutputPathError(ValueError):
    """An --out that would put the user's other files at risk, or cannot be written."""


class VerifyError(RuntimeError):
    """`convert --verify` could not reach a verdict (the output does not load, the original
    reference cannot take the checkpoint)."""


def shown(text: object, limit: int = 200) -> str:
    """`text` as it may appear in a message: anything taken from a file (a pickled
    global's name, a key, a dtype) could carry terminal escape sequences that erase
    the error line and print another. Every non-printable character is escaped the
    way repr() does, and long names are cut."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + f"...({len(s) - limit} more characters)"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def exception_text(err: BaseException) -> str:
    """A library's exception as a loader's message quotes it: its type and its escaped
    text (which may quote the file), or the type alone when it has no text."""
    return f"{type(err).__name__}: {shown(err)}" if str(err) else type(err).__name__


def one_line(err: BaseException, limit: int = 2000) -> str:
    """An exception's message as one shown line: newlines a library's message carries folded,
    text from files escaped (`shown`), its type's name when it says nothing."""
    text = " ".join(str(err).split())
    return shown(text if text else type(err).__name__, limit=limit)
