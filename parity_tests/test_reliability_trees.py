"""The reliability catalogue for Haiku pickles and Flax msgpack files: one attack of each
class through the real command line (`convert-parity convert`), as the catalogue in
test_reliability.py runs its bad inputs. Each must end in exit code 1, exactly one
`error:` line naming the file and the problem, and no output directory.

The hostile files are parity_fixtures.hostile_trees'; test_tree_files.py runs every one of them
through the loaders and bounds the memory each takes.
"""
from __future__ import annotations

import re

import pytest

from parity_fixtures import hostile_trees as hostile
from parity_fixtures.catalogue import CONTAINERS

# attack class -> the attack of parity_fixtures.hostile_trees that stands for it
HAIKU_CLASSES = {
    "object-array": "object-array-reconstruct",
    "array-larger-than-its-data": "huge-shape-small-buffer",
    "data-of-the-wrong-length": "wrong-buffer-length",
    "non-numeric-dtype": "string-dtype",
    "shared-structure": "shared-lists",
    "shared-modules": "shared-dicts",
    "cycle": "cycle",
    "deep-nesting": "deep-dicts",
    "build-on-a-function": "build-on-function",
    "reduce-on-a-non-function": "reduce-on-str",
    "object-building-opcode": "inst-opcode",
    "length-beyond-the-file": "bytearray-length-beyond-file",
    "memory-amplification": "encode-amplified",
    "too-many-opcodes": "many-opcodes",
    "params-not-a-mapping": "params-not-a-dict",
    "non-string-key": "int-key",
    "escape-sequences-in-a-name": "global-with-escapes",
    "not-a-pickle": "not-a-pickle",
}
FLAX_CLASSES = {
    "broadcast-buffer": "broadcast-buffer",
    "data-of-the-wrong-length": "wrong-buffer-length",
    "non-numeric-dtype": "object-dtype",
    "bad-shape": "negative-shape",
    "non-array-ext": "complex-leaf",
    "non-string-key": "int-key",
    "params-not-a-mapping": "params-not-a-dict",
    "deep-nesting": "deep-maps",
    "deeper-than-msgpack": "deeper-than-msgpack",
    "container-header-beyond-the-file": "huge-array-header",
    "trailing-data": "trailing-data",
    "escape-sequences-in-a-key": "key-with-escapes",
}
ROWS = [("haiku-pickle", c, hostile.HAIKU[a]) for c, a in HAIKU_CLASSES.items()] + \
       [("flax-msgpack", c, hostile.FLAX[a]) for c, a in FLAX_CLASSES.items()]


@pytest.mark.parametrize("container, attack, case", [
    pytest.param(container, attack, case, id=f"{container}-{attack}",
                 marks=pytest.mark.xdist_group(CONTAINERS[container].variant))  # the worker that built its case
    for container, attack, case in ROWS])
def test_hostile_tree_file_gives_one_clear_error(container, attack, case, tiny_cli, tmp_path, capsys):
    data, pattern = case
    row = CONTAINERS[container]
    path = tmp_path / "in" / "checkpoint"
    path.parent.mkdir()
    path.write_bytes(data)
    # --verify too: the original reference only ever reads what the safe loader returned
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "work" / "hf"), "--verify")
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}") and re.search(pattern, errors[0]), err
    assert "Traceback" not in err and "\x1b" not in err, err
    assert not (tmp_path / "work").exists(), "output (or a temporary directory) was left"
