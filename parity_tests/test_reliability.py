"""The reliability catalogue: every bad input, for every container the project reads,
through the real command line.

Each container row is a tiny checkpoint written exactly as the original repo writes
it (parity_fixtures.harness), converted with `convert-parity convert` while the variant's
config is shrunk to the tiny one. Each bad input must end in one error naming the
problem, exit code 1, no code from the file run, no output directory and nothing
left beside it; an existing output is never touched.
"""
from __future__ import annotations

import os
import pickle
import re
import signal
from pathlib import Path

import pytest
import torch

from converters import array_trees, downloads, output_dir, cli
from converters.registry import FAMILY_NAMES, get_variant
from parity_fixtures import harness, hostile_files
from parity_fixtures.catalogue import CONTAINERS, UNREADABLE, Container


HOSTILE = r"refusing to unpickle (posix|nt)\.system: the file would call it while loading"


class RunsCommand:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


CONSTRUCTED: list[str] = []


def _build_config(items):
    CONSTRUCTED.append("built")
    return dict(items)


class TrainingConfig(dict):
    """Like a yacs CfgNode: unpickling it calls code of the training repo."""

    def __reduce__(self):
        return (_build_config, (dict(self),))


# ---- reading and rewriting a container (our own files: plain loads are safe here) ----------

def _read(path: Path, fmt: str):
    if fmt == "torch":
        return torch.load(path, map_location="cpu", weights_only=False)  # saved from cuda:0
    if fmt == "flax":
        import flax.serialization

        return flax.serialization.msgpack_restore(path.read_bytes())
    return pickle.loads(path.read_bytes())


def _write(payload, path: Path, fmt: str) -> Path:
    if fmt == "torch":
        torch.save(payload, path)
    elif fmt == "flax":
        import flax.serialization

        path.write_bytes(flax.serialization.msgpack_serialize(payload))
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def _parent_of_leaf(payload, row: Container):
    """(mapping, key) holding `row.leaf` inside the payload."""
    variant = get_variant(row.variant)
    if row.format == "torch":
        weights = next(payload[k] for k in variant.source.container_keys if k in payload)
        return weights, next(k for k in weights if k == row.leaf or k.endswith("." + row.leaf))
    *parents, leaf = row.leaf.split("/")
    if row.format == "haiku":  # {module path: {name: array}}, under "params" when there is state
        return payload.get("params", payload)["/".join(parents)], leaf
    return _walk(array_trees.subtree(payload, variant.source.container_keys), parents), leaf


def _walk(node, parts):
    for part in parts:
        node = node.get(part) if isinstance(node, dict) else None
    return node


# ---- the bad inputs ------------------------------------------------------------------------
# Each takes (row, the good tiny file, a scratch dir, a marker path) and returns
# (the bad file, the pattern its error must match).

def hostile_pickle(row, good, tmp, marker):
    if row.format == "flax":  # msgpack holds no objects: a hostile pickle in its place
        return tmp / "checkpoint", UNREADABLE["flax"], pickle.dumps({"params": RunsCommand(marker)})
    payload = _read(good, row.format)
    mapping, _ = _parent_of_leaf(payload, row)
    mapping["payload"] = RunsCommand(marker)  # among the weights, which the loader must read
    return _write(payload, tmp / good.name, row.format), HOSTILE, None


def truncated(row, good, tmp, marker):
    return tmp / good.name, UNREADABLE[row.format], good.read_bytes()[: good.stat().st_size // 2]


def empty(row, good, tmp, marker):
    return tmp / good.name, r"is empty \(0 bytes\)", b""


def wrong_container(row, good, tmp, marker):
    """Another original's valid file under this variant's name."""
    other = "flax-msgpack" if row.format != "flax" else "torch-pyth"
    return tmp / good.name, UNREADABLE[row.format], harness.case(CONTAINERS[other].variant).checkpoint.read_bytes()


def missing_key(row, good, tmp, marker):
    payload = _read(good, row.format)
    mapping, key = _parent_of_leaf(payload, row)
    del mapping[key]
    return _write(payload, tmp / good.name, row.format), rf"1 key\(s\) missing: \['{row.installed_key}'\]", None


def wrong_shape(row, good, tmp, marker):
    payload = _read(good, row.format)
    mapping, key = _parent_of_leaf(payload, row)
    n = mapping[key].shape[0]
    mapping[key] = mapping[key][:1].repeat(n + 1)  # torch and numpy alike: shape (n + 1,)
    return (_write(payload, tmp / good.name, row.format),
            rf"{row.installed_key}: checkpoint \({n + 1},\), model \({n},\)", None)


def unknown_key(row, good, tmp, marker):
    payload = _read(good, row.format)
    mapping, key = _parent_of_leaf(payload, row)
    mapping[key + "_extra"] = mapping[key]
    # Torch tables rename it like its neighbour, then the HF model has no such key; the
    # Flax and Haiku tables name every leaf, so no rule matches it.
    return (_write(payload, tmp / good.name, row.format),
            r"1 (unexpected key\(s\)|key\(s\) match no rename rule): \[.*_extra'\]", None)


BAD_INPUTS = [hostile_pickle, truncated, empty, wrong_container, missing_key, wrong_shape, unknown_key]


def _scratch(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    return tmp_path / "in"


@pytest.mark.parametrize("bad_input", BAD_INPUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("container", CONTAINERS)
def test_bad_input_gives_one_clear_error(container, bad_input, tiny_cli, tmp_path, capsys):
    row = CONTAINERS[container]
    good, marker = harness.case(row.variant).checkpoint, tmp_path / "pwned"
    path, pattern, raw = bad_input(row, good, _scratch(tmp_path), marker)
    if raw is not None:
        path.write_bytes(raw)
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "work" / "hf"))
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err
    assert not marker.exists(), "code from the file ran"
    assert not (tmp_path / "work").exists(), "output (or a temporary directory) was left"


@pytest.mark.parametrize("container", [c for c, row in CONTAINERS.items() if row.format == "torch"])
def test_training_config_object_is_never_built(container, tiny_cli, tmp_path, capsys):
    """Torch containers hold the training repo's config objects; they stay inert data,
    a warning names them, and the weights convert."""
    row = CONTAINERS[container]
    payload = _read(harness.case(row.variant).checkpoint, "torch")
    payload["config"] = TrainingConfig(lr=0.1)
    path = _write(payload, _scratch(tmp_path) / "ckpt.pth", "torch")
    CONSTRUCTED.clear()
    code, err, messages = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert CONSTRUCTED == [], "the pickled config's code ran on load"
    assert any(f"config ({_build_config.__module__}._build_config)" in m for m in messages), messages


def test_haiku_pickle_refuses_any_object(tiny_cli, tmp_path, capsys):
    """Haiku files are dicts of arrays: any other object is refused by name."""
    row = CONTAINERS["haiku-pickle"]
    payload = _read(harness.case(row.variant).checkpoint, "haiku")
    payload["config"] = TrainingConfig(lr=0.1)
    path = _write(payload, _scratch(tmp_path) / "ckpt.pickle", "haiku")
    CONSTRUCTED.clear()
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "hf"))
    assert code == 1 and f"refusing to unpickle {_build_config.__module__}._build_config" in err, err
    assert CONSTRUCTED == [] and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("container", CONTAINERS)
def test_cache_entry_with_wrong_hash_is_refused(container, tiny_cli, tmp_path, capsys):
    """A cached download whose bytes no longer match their recorded sha256."""
    row = CONTAINERS[container]
    good = harness.case(row.variant).checkpoint
    url = f"https://example.invalid/{good.name}"
    entry = downloads.cache_path_for(url, get_variant(row.variant).source.filename or None)
    entry.parent.mkdir(parents=True)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed on disk
    entry.write_bytes(bytes(data))
    entry.with_name(entry.name + ".sha256").write_text(f"{downloads.sha256_file(good)}  {entry.name}\n")
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", url, "--out", str(tmp_path / "hf"))
    assert code == 1 and f"cached file {entry} for {url} has sha256" in err and "expected" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unknown_variant_names_the_closest(family, capsys, tmp_path):
    typo = {"timesformer": "timesformer-base-k400", "xclip": "xclip-base-patch-32", "vivit": "vivit-b16x2-kinetics400",
            "vit_msn": "vit-msn-smal", "perceiver": "language-perciever"}[family]
    code = cli.main(["convert", typo, "--checkpoint", "x", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and f"unknown variant '{typo}'; closest: " in err, err
    closest = err.split("closest: ")[1].split(" (")[0].split(", ")
    assert get_variant(closest[0]).family == family, closest
    assert not (tmp_path / "hf").exists()


def test_non_empty_output_is_refused_and_kept(tiny_cli, tmp_path, capsys):
    row = CONTAINERS["torch-pyth"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(harness.case(row.variant).checkpoint), "--out", str(out))
    assert code == 1 and "exists and is not empty; pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_failed_overwrite_keeps_the_existing_output(tiny_cli, tmp_path, capsys):
    row = CONTAINERS["torch-pyth"]
    out = tmp_path / "work" / "hf"
    out.mkdir(parents=True)
    (out / "config.json").write_text("keep")  # a previous output, which --overwrite may replace
    path, pattern, _ = wrong_shape(row, harness.case(row.variant).checkpoint, _scratch(tmp_path), None)
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(out), "--overwrite")
    assert code == 1 and re.search(pattern, err), err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "keep"
    assert [p.name for p in out.parent.iterdir()] == ["hf"], "temporary directories were left"


# ---- interrupts ------------------------------------------------------------------------------

@pytest.fixture
def default_signal_handlers():
    """What a user's terminal gives the CLI (xdist workers may ignore SIGINT)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "overwrite"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_write_leaves_no_output(sig, existing, tiny_cli, tmp_path, capsys, monkeypatch,
                                                  default_signal_handlers):
    """The signal arrives with half the tensors on disk. The real process-level handler
    (Ctrl-C, or the CLI's SIGTERM handler) unwinds; nothing is left, nothing replaced."""
    row = CONTAINERS["torch-pyth"]
    out = tmp_path / "work" / "hf"
    if existing:
        out.mkdir(parents=True)
        (out / "config.json").write_text("keep")
    real_write, on_disk = output_dir.write_safetensors, []

    def write_then_signal(tensors, path, metadata=None):
        real_write(dict(list(tensors.items())[: len(tensors) // 2]), path, metadata)
        on_disk.append(Path(path).stat().st_size)
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not interrupt the write")

    monkeypatch.setattr(output_dir, "write_safetensors", write_then_signal)
    argv = ["--checkpoint", str(harness.case(row.variant).checkpoint), "--out", str(out)]
    if sig == signal.SIGTERM:
        with pytest.raises(SystemExit) as exit_info:
            tiny_cli(capsys, row, *argv, *(["--overwrite"] if existing else []))
        code = exit_info.value.code
    else:
        code, err, _ = tiny_cli(capsys, row, *argv, *(["--overwrite"] if existing else []))
        assert "interrupted: nothing was written" in err
    assert code == 128 + sig
    assert on_disk and on_disk[0] > 0, "the signal came before any tensor was written"
    remaining = sorted(p.name for p in (tmp_path / "work").iterdir()) if (tmp_path / "work").exists() else []
    assert remaining == (["hf"] if existing else []), f"left behind: {remaining}"
    if existing:
        assert [p.name for p in out.iterdir()] == ["config.json"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the CLI did not restore the SIGTERM handler"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_download_leaves_no_cache_entry(sig, tiny_cli, tmp_path, capsys, monkeypatch,
                                                        default_signal_handlers):
    row = CONTAINERS["torch-pyth"]
    good = harness.case(row.variant).checkpoint
    for var in ("CONVERT_PARITY_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "0")

    def half_then_signal(url, dest, progress):  # stands in for the HTTP stream
        Path(dest).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not interrupt the download")

    monkeypatch.setattr(downloads, "_stream_url", half_then_signal)
    argv = ["--checkpoint", f"https://example.invalid/{good.name}", "--out", str(tmp_path / "hf")]
    if sig == signal.SIGTERM:
        with pytest.raises(SystemExit):
            tiny_cli(capsys, row, *argv)
    else:
        code, _, _ = tiny_cli(capsys, row, *argv)
        assert code == 130
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached == [], f"cache entries left: {cached}"
    assert not (tmp_path / "hf").exists()


# ---- torch files: formats and pickles that attack the loader ----------------------------------
# Each builder takes (the good tiny file, a scratch dir, a marker dir) and returns the bad
# file and the pattern of its one error line. The marker dir is where the attack would
# leave its trace (a file written, a .patch, a changed mode); it must stay as it was.

TORCH_CONTAINERS = [c for c, row in CONTAINERS.items() if row.format == "torch"]
CONTAINER_KEYS = ("model_state", "model", "target_encoder")  # where each torch original keeps its weights


def torchscript_archive(good, tmp, marker_dir):
    return (hostile_files.torchscript_archive(tmp / good.name, marker_dir / "written-on-load"),
            "is a TorchScript archive .*runs code when loaded; export a plain state dict")


def legacy_unfilled_storages(good, tmp, marker_dir):
    """The storage-key list is empty: torch's own legacy loader would hand out the
    storages it allocated, uninitialised (heap bytes in model.safetensors)."""
    payload = _read(good, "torch")
    return (hostile_files.legacy_file(tmp / good.name, payload, keys=[]),
            r"the file fills 0 storage\(s\) but its tensors use \d+: a storage it does not fill would hold "
            r"uninitialised memory")


def legacy_storages_beyond_the_file(good, tmp, marker_dir):
    payload = _read(good, "torch")
    return (hostile_files.legacy_file(tmp / good.name, payload, keys=[], drop_records=True),
            r"its storages declare \d+ bytes, more than the file's \d+ bytes could fill")


def legacy_module_persistent_id(good, tmp, marker_dir):
    return (hostile_files.legacy_with_module_id(tmp / good.name, str(marker_dir / "patched")),
            "not a readable torch checkpoint .*Can only build Tensor.*but got <class 'function'>")


def legacy_tar_hard_link(good, tmp, marker_dir):
    return hostile_files.legacy_tar(tmp / good.name, "storages", marker_dir / "victim"), "is a tar archive"


def legacy_tar_fifo(good, tmp, marker_dir):
    return hostile_files.legacy_tar(tmp / good.name, "storages"), "is a tar archive"


def plain_tar(good, tmp, marker_dir):
    return hostile_files.plain_tar(tmp / good.name), "is a tar archive"


def compressed_record(good, tmp, marker_dir):
    return (hostile_files.compressed_zip(tmp / good.name, zeros_mib=64),
            r"record .*data/0 is compressed; torch.save never compresses")


def build_on_torch_function(good, tmp, marker_dir):
    return (hostile_files.torch_zip_with_pickle(tmp / good.name, hostile_files.defaults_poisoning()),
            "not a readable torch checkpoint .*but got <class 'function'>")


def escape_sequence_in_name(good, tmp, marker_dir):
    pkl = hostile_files.reduce_call("yacs\x1b[2K\rdone", "CfgNode", "x")
    return (hostile_files.torch_zip_with_pickle(tmp / good.name, pkl),
            r"refusing to unpickle yacs\\x1b\[2K\\rdone.CfgNode")


def deep_nesting(good, tmp, marker_dir):
    return (hostile_files.torch_zip_with_pickle(tmp / good.name, hostile_files.deep_lists(200_000)),
            "no state dict found")


def broadcast_tensor(good, tmp, marker_dir):
    """A stride-0 view of one element standing for 6e8 of them (2.4 GB once copied)."""
    payload = _read(good, "torch")
    weights = next(payload[k] for k in CONTAINER_KEYS if k in payload)
    weights[next(iter(weights))] = torch.ones(1).expand(600_000_000)
    return _write(payload, tmp / good.name, "torch"), r"of shape \(600000000,\) claims more bytes than its storage"


def sparse_zeros(good, tmp, marker_dir):
    path = tmp / good.name
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
    return path, r"is not a readable torch checkpoint \(neither a torch zip archive nor a legacy torch file"


TORCH_ATTACKS = [torchscript_archive, legacy_unfilled_storages, legacy_storages_beyond_the_file, legacy_module_persistent_id, legacy_tar_hard_link,
                 legacy_tar_fifo, plain_tar, compressed_record, build_on_torch_function, escape_sequence_in_name,
                 deep_nesting, broadcast_tensor, sparse_zeros]


def _marker_dir(tmp_path) -> Path:
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    (marker_dir / "victim").write_text("victim")
    os.chmod(marker_dir / "victim", 0o644)
    return marker_dir


def _assert_untouched(marker_dir: Path) -> None:
    assert sorted(p.name for p in marker_dir.iterdir()) == ["victim"], "the file wrote outside --out"
    assert (marker_dir / "victim").stat().st_mode & 0o7777 == 0o644 and (marker_dir / "victim").read_text() == "victim"


def _one_error(code: int, err: str, pattern: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and re.search(pattern, errors[0]), err
    assert "Traceback" not in err and "\x1b" not in err, err


@pytest.mark.parametrize("attack", TORCH_ATTACKS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("container", TORCH_CONTAINERS)
def test_torch_attack_gives_one_clear_error(container, attack, tiny_cli, tmp_path, capsys, monkeypatch):
    row = CONTAINERS[container]
    marker_dir = _marker_dir(tmp_path)
    monkeypatch.chdir(marker_dir)  # torch's old loader wrote .patch files to the working directory
    path, pattern = attack(harness.case(row.variant).checkpoint, _scratch(tmp_path), marker_dir)
    # --verify too: the original reference only ever reads what the safe loader returned
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "work" / "hf"), "--verify")
    _one_error(code, err, pattern)
    _assert_untouched(marker_dir)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("container", TORCH_CONTAINERS)
def test_shared_references_convert_in_bounded_time(container, tiny_cli, tmp_path, capsys):
    """`L = [L, L]` forty levels deep (2**40 paths, 300 bytes) beside an inert config:
    the walk that names inert objects visits each container once."""
    row = CONTAINERS[container]
    payload = _read(harness.case(row.variant).checkpoint, "torch")
    dag: list = []
    for _ in range(40):
        dag = [dag, dag]
    payload["extra"] = {"dag": dag, "config": TrainingConfig(lr=0.1)}
    path = _write(payload, _scratch(tmp_path) / "ckpt.pth", "torch")
    code, err, messages = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert any("extra.config" in m for m in messages), messages


@pytest.mark.parametrize("container", TORCH_CONTAINERS)
def test_numpy_object_array_is_never_allocated(container, tiny_cli, tmp_path, capsys):
    """A numpy object array declaring 2.5e8 elements (2 GB of None) beside the weights:
    numpy arrays in a torch file stay inert records, nothing is allocated."""
    import numpy as np

    row = CONTAINERS[container]
    payload = _read(harness.case(row.variant).checkpoint, "torch")
    payload["stats"] = np.empty(3, dtype=object)
    path = _write(payload, _scratch(tmp_path) / "ckpt.pth", "torch")
    # the pickled shape (3,) becomes (250000000,)
    path = hostile_files.replace_records(path, {"data.pkl": _declare_shape(_zip_record(path, "data.pkl"), 3, 250_000_000)})
    code, err, messages = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert any("stats (numpy" in m for m in messages), messages


def _zip_record(path: Path, suffix: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/" + suffix)))


def _declare_shape(pkl: bytes, old: int, new: int) -> bytes:
    """numpy pickles an array's shape as a tuple of BININT1/BININT: swap the first
    `(old,)` for `(new,)` (the shape follows the ndarray's _reconstruct call)."""
    import struct

    at = pkl.index(b"K" + bytes([old]) + b"\x85")
    return pkl[:at] + b"J" + struct.pack("<i", new) + pkl[at + 2:]


def test_protocol_2_set_in_a_yacs_config_converts(tiny_cli, tmp_path, capsys):
    """torch.save writes protocol 2, where a set is `__builtin__.set`: X-CLIP's real
    training config (a yacs CfgNode holding one) loads as inert data."""
    import yacs.config

    row = CONTAINERS["torch-training-config"]
    payload = _read(harness.case(row.variant).checkpoint, "torch")
    config = yacs.config.CfgNode({"MODEL": {"ARCH": "ViT-B/32"}, "TRAIN": {"LR": 8e-6}})
    config.register_deprecated_key("MODEL.OLD")  # yacs keeps these in a set
    payload["config"] = config
    path = _write(payload, _scratch(tmp_path) / "ckpt.pth", "torch")
    assert b"c__builtin__\nset\n" in _zip_record(path, "data.pkl")
    code, err, messages = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert any("config (yacs.config.CfgNode)" in m for m in messages), messages


def test_hostile_file_cannot_change_how_the_next_loads(tmp_path):
    """A file that BUILDs on torch's rebuild function (its __defaults__), then a good one,
    in one process: the good file's tensors are bit-identical to a fresh process's."""
    import subprocess
    import sys

    good = harness.case(CONTAINERS["torch-pyth"].variant).checkpoint
    hostile = hostile_files.torch_zip_with_pickle(tmp_path / "hostile.pth", hostile_files.defaults_poisoning())
    script = ("import sys, hashlib, torch\n"
              "from converters import torch_files\n"
              "for p in sys.argv[1:-1]:\n"
              "    try: torch_files.load_torch_checkpoint(p)\n"
              "    except Exception as e: print(type(e).__name__)\n"
              "sd = torch_files.load_torch_checkpoint(sys.argv[-1])['model_state']\n"
              "print(hashlib.sha256(b''.join(v.numpy().tobytes() for k, v in sorted(sd.items()))).hexdigest())\n")
    run = lambda *files: subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True,
                                        text=True, check=True, cwd=Path(__file__).parent.parent).stdout.split()
    after_hostile, fresh = run(hostile, hostile, good), run(good)
    assert after_hostile[:2] == ["CheckpointError", "CheckpointError"] and after_hostile[-1] == fresh[-1]


# ---- what --checkpoint may name -----------------------------------------------------------------

def _fifo(tmp):
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


CHECKPOINT_PATHS = {
    "directory": (lambda tmp: tmp, "is a directory, not a checkpoint file"),
    "dev-zero": (lambda tmp: Path("/dev/zero"), "is a character device, not a checkpoint file"),
    "dev-urandom": (lambda tmp: Path("/dev/urandom"), "is a character device, not a checkpoint file"),
    "fifo": (_fifo, "is a FIFO, not a checkpoint file"),
    "name-too-long": (lambda tmp: tmp / ("x" * 300), "cannot be read: File name too long"),
}


@pytest.mark.parametrize("kind", CHECKPOINT_PATHS)
def test_odd_checkpoint_path_gives_one_error_line(kind, tiny_cli, tmp_path, capsys):
    make, pattern = CHECKPOINT_PATHS[kind]
    code, err, _ = tiny_cli(capsys, CONTAINERS["torch-pyth"], "--checkpoint", str(make(_scratch(tmp_path))),
                            "--out", str(tmp_path / "work" / "hf"))
    _one_error(code, err, pattern)
    assert not (tmp_path / "work").exists()


# ---- what --out may name -------------------------------------------------------------------------
# Each returns (argv after the checkpoint, pattern). The checkpoint sits in tmp/in with
# a neighbour; neither may change.

def _out_cases(tmp: Path, ckpt: Path) -> dict:
    (tmp / "regular-file").write_text("x")
    (tmp / "target").mkdir()
    (tmp / "target" / "mine.txt").write_text("mine")
    os.symlink(tmp / "target", tmp / "link")
    return {
        "checkpoint-directory": (["--out", str(ckpt.parent), "--overwrite"], "holds the checkpoint"),
        "ancestor-of-checkpoint": (["--out", str(tmp), "--overwrite"], "holds the checkpoint"),
        "working-directory": (["--out", ".", "--overwrite"], "is the working directory or contains it"),
        "ancestor-of-working-directory": (["--out", "..", "--overwrite"], "is the working directory or contains it"),
        "symlink": (["--out", str(tmp / "link"), "--overwrite"], "is a symbolic link"),
        "parent-is-a-file": (["--out", str(tmp / "regular-file" / "hf")], "is not a directory"),
        "name-too-long": (["--out", str(tmp / ("x" * 300))], "File name too long"),
        "unwritable-parent": (["--out", "/proc/convert-parity-out"], "cannot write the output next to"),
        "user-files-with-overwrite": (["--out", str(tmp / "target"), "--overwrite"],
                                      r"holds files a conversion does not write \(.*\); refusing to replace it"),
    }


OUT_CASES = [
    "checkpoint-directory", "ancestor-of-checkpoint", "working-directory", "ancestor-of-working-directory", "symlink", "parent-is-a-file",
    "name-too-long", "unwritable-parent", "user-files-with-overwrite"]


@pytest.mark.parametrize("kind", OUT_CASES)
def test_odd_output_path_gives_one_error_line(kind, tiny_cli, tmp_path, tmp_path_factory, capsys, monkeypatch):
    row = CONTAINERS["torch-pyth"]
    scratch = _scratch(tmp_path)
    ckpt = scratch / "ckpt.pyth"
    ckpt.write_bytes(harness.case(row.variant).checkpoint.read_bytes())
    (scratch / "neighbour.txt").write_text("neighbour")
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    argv, pattern = _out_cases(tmp_path, ckpt)[kind]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(ckpt), *argv)
    _one_error(code, err, pattern)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before, "something outside --out changed"
    assert ckpt.read_bytes() == harness.case(row.variant).checkpoint.read_bytes()
    assert (tmp_path / "target" / "mine.txt").read_text() == "mine"
