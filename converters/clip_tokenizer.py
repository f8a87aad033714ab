"""The CLIP tokenizer X-CLIP uses, built offline from OpenAI CLIP's own BPE file.

`data/bpe_simple_vocab_16e6.txt.gz` ships with the package (provenance, sha256 and
licence in `data/bpe_simple_vocab_16e6.txt.gz.json`). The vocabulary is derived from
it the way openai/CLIP's `clip/simple_tokenizer.py` (SimpleTokenizer.__init__) derives
its own: the 256 byte symbols, the same symbols with the word-end marker `</w>`, one
token per merge (its two halves joined) for the first 48894 merges after the header
line, then the start and end tokens: 256 + 256 + 48894 + 2 = 49408 ids. Those become
the two files Hugging Face's CLIPTokenizer reads (vocab.json: token -> id; merges.txt:
a `#version` header, then one merge per line in rank order), and the tokenizer is
loaded from them. Nothing is fetched from the hub.
"""
from __future__ import annotations

import gzip
import json
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

from . import downloads

DATA_DIR = Path(__file__).parent / "data"
BPE_FILE = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # as recorded in the sidecar
# openai/CLIP simple_tokenizer.py keeps merges lines [1 : 49152 - 256 - 2 + 1]: a 49152-entry BPE
# budget less the 256 byte symbols and the 2 special tokens (49408 ids in all, the text
# models' vocab_size; XCLIPTextConfig's default too).
MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + MERGES + 2
WORD_END = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's context length: openai/CLIP and X-CLIP clip/clip.py tokenize(context_length=77);
# transformers' CLIP tokenizer files map openai/clip-vit-base-patch32 to 77 positions
# (tokenization_clip_fast.py PRETRAINED_POSITIONAL_EMBEDDINGS_SIZES in the 4.x line).
MODEL_MAX_LENGTH = 77
# Special tokens as transformers' CLIPTokenizer defaults them (tokenization_clip.py, 4.x
# and 5.x): the end token also stands for unknown and padding, as in the hub's
# openai/clip-vit-base-patch32 files the upstream X-CLIP conversion loaded.
SPECIAL_TOKENS = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
PROBE = ("playing sports", [BOS, "playing" + WORD_END, "sports" + WORD_END, EOS])  # both words are vocabulary tokens


class VocabularyError(ValueError):
    """The shipped BPE file is missing, altered or does not make CLIP's vocabulary."""


def byte_symbols() -> list[str]:
    """One printable character per byte value, in CLIP's (and GPT-2's) vocabulary order:
    the bytes that are printable Latin-1 characters stand for themselves (! to ~, ¡ to ¬,
    ® to ÿ), then the other 68 bytes in increasing order take U+0100, U+0101, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = sorted(set(range(256)) - set(printable))
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def read_merges(path: Path | None = None, sha256: str = BPE_SHA256) -> tuple[tuple[str, str], ...]:
    """CLIP's merges from the gzipped BPE file (default: the shipped one), after checking its sha256."""
    path = Path(path or BPE_FILE)
    try:
        got = downloads.sha256_file(path)
    except OSError as err:
        raise VocabularyError(f"CLIP BPE file {path} cannot be read: {err.strerror or err}") from None
    if got != sha256:
        raise VocabularyError(f"CLIP BPE file {path} has sha256 {got}, expected {sha256}")
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise VocabularyError(f"CLIP BPE file {path} is not gzipped UTF-8 text: {err}") from None
    merges = tuple(tuple(line.split()) for line in lines[1:MERGES + 1])  # line 0 is the header
    if len(merges) != MERGES or any(len(m) != 2 for m in merges):
        raise VocabularyError(f"CLIP BPE file {path} does not hold {MERGES} merges of two symbols each")
    return merges


def vocabulary(merges) -> dict[str, int]:
    """token -> id, in SimpleTokenizer's order."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + WORD_END for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise VocabularyError(f"the CLIP merges give {len(tokens) - len(vocab)} duplicate token(s)")
    return vocab


def hf_vocab_files(merges) -> dict[str, str]:
    """The two files Hugging Face's CLIP tokenizer is loaded from, as text."""
    return {"vocab.json": json.dumps(vocabulary(merges), ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}


def check_tokenizer(tokenizer) -> None:
    """Refuse anything but CLIP's vocabulary: 49408 ids, and the probe text in real tokens
    (a tokenizer without merges gives unknown tokens, which CLIP spells as the end token)."""
    if len(tokenizer) != VOCAB_SIZE:
        raise VocabularyError(f"the tokenizer has {len(tokenizer)} ids, CLIP's vocabulary has {VOCAB_SIZE}")
    text, expected = PROBE
    got = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    if got != expected:
        raise VocabularyError(f"the tokenizer reads {text!r} as {got}, CLIP as {expected}")


@lru_cache(maxsize=4)
def _vocab_files(path: Path, sha256: str) -> tuple[tuple[str, str], ...]:
    """Read, checked and derived once per process and file (the matrix builds one
    processor per X-CLIP variant); a file changed after its first read is not seen."""
    return tuple(hf_vocab_files(read_merges(path, sha256)).items())


def tokenizer_from_files(files) -> object:
    """Hugging Face's CLIP tokenizer loaded from the texts of vocab.json and merges.txt
    (not checked). On transformers 4.x the fast class, which the upstream conversion put
    in XCLIPProcessor; 5.x has one class."""
    import transformers

    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        for name, text in dict(files).items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return cls.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH, local_files_only=True, **SPECIAL_TOKENS)


def clip_tokenizer(path: Path | None = None, sha256: str = BPE_SHA256):
    """A new Hugging Face CLIP tokenizer from the BPE file (default: the shipped one),
    checked to be CLIP's; VocabularyError if it cannot be."""
    tokenizer = tokenizer_from_files(_vocab_files(Path(path or BPE_FILE), sha256))
    check_tokenizer(tokenizer)
    return tokenizer
