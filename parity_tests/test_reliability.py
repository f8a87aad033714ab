"""The reliability catalogue: every bad input, for every container the project reads,
through the real command line.

Each container row is a tiny checkpoint written exactly as the original repo writes
it (fixtures.harness), converted with `convert-parity convert` while the variant's
config is shrunk to the tiny one. Each bad input must end in one error naming the
problem, exit code 1, no code from the file run, no output directory and nothing
left beside it; an existing output is never touched.
"""
from __future__ import annotations

import os
import pickle
import re
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from converters import array_trees, downloads, output_dir, cli, pipeline
from converters.registry import FAMILY_MODULES, get_variant
from fixtures import harness


@dataclass(frozen=True)
class Container:
    variant: str
    format: str  # how the original writes it: "torch", "flax" (msgpack) or "haiku" (pickle)
    leaf: str  # a LayerNorm bias, as the loader names it: the key removed or resized
    hf_key: str  # its converted name as written to disk, which the errors must name

    @property
    def installed_key(self) -> str:
        """hf_key as the installed transformers names it (ViViT and MSN renamed in 5.x)."""
        return next(iter(pipeline.for_installed_transformers(get_variant(self.variant), {self.hf_key: torch.empty(0)})))


CONTAINERS = {
    "torch-pyth": Container("timesformer-base-finetuned-k400", "torch", "blocks.1.norm1.bias",
                            "timesformer.encoder.layer.1.layernorm_before.bias"),
    "torch-training-config": Container("xclip-base-patch32", "torch", "prompts_generator.norm.bias",
                                       "prompts_generator.layernorm.bias"),
    "torch-target-encoder": Container("vit-msn-small", "torch", "blocks.0.norm1.bias",
                                      "encoder.layer.0.layernorm_before.bias"),
    "flax-msgpack": Container("vivit-b-16x2-kinetics400", "flax", "Transformer/encoderblock_0/LayerNorm_0/bias",
                              "vivit.encoder.layer.0.layernorm_before.bias"),
    "haiku-pickle": Container("language-perceiver", "haiku", "basic_decoder/cross_attention/layer_norm/offset",
                              "perceiver.decoder.decoding_cross_attention.attention.self.layernorm1.bias"),
}
UNREADABLE = {"torch": "is not a readable torch checkpoint", "flax": "is not a readable Flax msgpack checkpoint",
              "haiku": "is not a readable pickle"}
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


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    """Run the CLI against tiny checkpoints: the variant's config is the tiny one, the
    download cache is a fresh directory, nothing is fetched."""
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CONVERT_PARITY_OFFLINE", "1")

    def run(capsys, row: Container, *argv):
        monkeypatch.setattr(pipeline, "spec_of", lambda variant: dict(harness.case(row.variant).spec))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            code = cli.main(["convert", row.variant, *argv])
        err = capsys.readouterr().err  # the CLI prints each warning as one `warning:` line
        return code, err, [line.removeprefix("warning: ") for line in err.splitlines() if line.startswith("warning: ")]

    return run


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


@pytest.mark.parametrize("family", FAMILY_MODULES)
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
    (out / "mine.txt").write_text("keep")
    path, pattern, _ = wrong_shape(row, harness.case(row.variant).checkpoint, _scratch(tmp_path), None)
    code, err, _ = tiny_cli(capsys, row, "--checkpoint", str(path), "--out", str(out), "--overwrite")
    assert code == 1 and re.search(pattern, err), err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
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
        (out / "mine.txt").write_text("keep")
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
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
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
