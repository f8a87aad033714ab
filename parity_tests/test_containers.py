"""Every reference writes its checkpoint in the container its original's save call
writes: the same entries in the same order, the same pickled types and protocol (or,
for Flax, the same msgpack tree). The expected lists are read off the original save
code, cited per family; the tiny case of every container converts through the CLI.
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import flax.serialization
import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from converters import cli, pipeline
from converters.registry import get_variant
from fixtures import harness

# ---- reading a pickle without loading it -------------------------------------------------------

_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}


def pickle_bytes(path: Path) -> bytes:
    """The pickle inside a torch zip checkpoint (its data.pkl), or the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return path.read_bytes()


def pickle_protocol(data: bytes) -> int:
    op, arg, _ = next(pickletools.genops(data))
    return arg if op.name == "PROTO" else 0


def pickled_globals(data: bytes) -> set[str]:
    """Every `module.name` the pickle imports (GLOBAL, INST, and STACK_GLOBAL's two
    strings, which protocol 4 may fetch back from the memo)."""
    names, strings, memo, last = set(), [], {}, None
    for op, arg, _ in pickletools.genops(data):
        if op.name in _MEMO_PUTS:
            memo[len(memo) if op.name == "MEMOIZE" else arg] = last
            continue
        if op.name in _MEMO_GETS:
            last = memo.get(arg)
            strings.append(last)
            continue
        if "UNICODE" in op.name or op.name.endswith("STRING"):
            last = arg
            strings.append(arg)
            continue
        if op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name in ("GLOBAL", "INST"):
            names.add(arg.replace(" ", "."))
        last = None
    return names


def test_pickled_globals_reads_memoized_names():
    """Protocol 4 names a repeated module once and fetches it from the memo after."""
    data = __import__("pickle").dumps([OrderedDict(), OrderedDict, np.dtype("float32"), io.BytesIO], protocol=4)
    assert pickled_globals(data) == {"collections.OrderedDict", "numpy.dtype", "_io.BytesIO"}
    assert pickle_protocol(data) == 4


# ---- the containers, as the original save code writes them -------------------------------------
# torch.save's default pickle_protocol is 2 (torch/serialization.py DEFAULT_PROTOCOL = 2,
# torch 2.13.0), so builtins are named as Python 2 spelled them: __builtin__.set. Every
# original trained on GPUs and saved without moving to the CPU (fixtures/gpu_saved.py).
TORCH_TENSORS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}

TORCH_CONTAINERS = {
    # facebookresearch/TimeSformer timesformer/utils/checkpoint.py lines 126-131: epoch (an
    # int), the unwrapped model's state_dict (an OrderedDict, deep-copied by sub_to_normal_bn),
    # optimizer.state_dict() of torch SGD, cfg.dump() (a YAML str).
    ("timesformer-base-finetuned-k400", "model_state"): (
        {"epoch": int, "model_state": OrderedDict, "optimizer_state": dict, "cfg": str}, TORCH_TENSORS),
    # Released files seen with the weights alone (the converter's container_keys).
    ("timesformer-base-finetuned-k400", "model"): ({"model": OrderedDict}, TORCH_TENSORS),
    ("timesformer-base-finetuned-k400", "module"): ({"module": OrderedDict}, TORCH_TENSORS),
    # microsoft/VideoX X-CLIP/utils/tools.py epoch_saving lines 47-52: model.module's state_dict,
    # torch AdamW and timm CosineLRScheduler state dicts, max_accuracy (a float from
    # AverageMeter), epoch, and the yacs CfgNode main.py trains with (utils/config.py): every
    # CfgNode keeps its deprecated keys in a set (yacs.config.CfgNode.__init__).
    ("xclip-base-patch32", "model"): (
        {"model": OrderedDict, "optimizer": dict, "lr_scheduler": dict, "max_accuracy": float, "epoch": int,
         "config": "yacs.config.CfgNode"},
        TORCH_TENSORS | {"yacs.config.CfgNode", "__builtin__.set"}),
    # facebookresearch/msn src/msn_train.py save_checkpoint lines 284-295: both encoders through
    # DistributedDataParallel (module. prefix; batch-norm counters are int64), torch AdamW,
    # prototypes.data (a plain tensor), and plain numbers.
    ("vit-msn-small", "msn_train"): (
        {"encoder": OrderedDict, "opt": dict, "prototypes": torch.Tensor, "target_encoder": OrderedDict,
         "epoch": int, "loss": float, "batch_size": int, "world_size": int, "lr": float, "temperature": float},
        TORCH_TENSORS | {"torch.LongStorage"}),
}


def _type_name(value) -> object:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__.startswith("yacs") else cls


def _cases(pairs, extra=None):
    """(variant, container[, *extra[pair]]) params in the variant's xdist group, so the
    variant's cached case is reused."""
    return [pytest.param(v, c, *(extra or {}).get((v, c), ()), id=f"{v}-{c}", marks=pytest.mark.xdist_group(v))
            for v, c in pairs]


@pytest.mark.parametrize("name, container", _cases(TORCH_CONTAINERS))
def test_torch_container_as_the_original_saves_it(name, container):
    entries, expected_globals = TORCH_CONTAINERS[name, container]
    path = harness.case(name, container).checkpoint
    data = pickle_bytes(path)
    assert pickle_protocol(data) == 2
    assert pickled_globals(data) == expected_globals
    locations = []
    saved = torch.load(path, map_location=lambda storage, location: locations.append(location) or storage,
                       weights_only=False)  # our own file: a plain load is safe
    assert list(saved) == list(entries)
    assert {k: _type_name(v) for k, v in saved.items()} == entries
    assert locations and set(locations) == {"cuda:0"}, "the originals save from the GPU"


def test_xclip_config_is_xclips_cfgnode():
    """The tree of X-CLIP/utils/config.py merged with an experiment yaml and the README's
    training command, frozen, with yacs' own attributes on every node."""
    from yacs.config import CfgNode

    c = harness.case("xclip-base-patch32")
    config = torch.load(c.checkpoint, map_location="cpu", weights_only=False)["config"]
    assert list(config) == ["BASE", "DATA", "MODEL", "TRAIN", "AUG", "TEST", "OUTPUT", "SAVE_FREQ", "PRINT_FREQ",
                            "SEED", "LOCAL_RANK"]
    assert all(type(config[k]) is CfgNode for k in ("DATA", "MODEL", "TRAIN", "AUG", "TEST"))
    assert config.is_frozen() and config.DATA.is_frozen()
    assert config.__dict__[CfgNode.DEPRECATED_KEYS] == set()
    assert config.DATA.NUM_FRAMES == c.spec["num_frames"] and config.DATA.INPUT_SIZE == c.spec["image_size"]
    assert (config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.LR, config.MODEL.FIX_TEXT) == (4, 8e-6, True)
    assert config.MODEL.PRETRAINED is None and config.OUTPUT == "/PATH/TO/OUTPUT"


def test_timesformer_cfg_is_a_yaml_dump():
    import yaml

    c = harness.case("timesformer-base-finetuned-k400")
    cfg = yaml.safe_load(torch.load(c.checkpoint, map_location="cpu", weights_only=False)["cfg"])
    assert cfg["SOLVER"]["OPTIMIZING_METHOD"] == "sgd" and cfg["DATA"]["NUM_FRAMES"] == c.spec["num_frames"]
    assert cfg["MODEL"]["NUM_CLASSES"] == c.spec["num_labels"]


OPTIMIZER_ENTRY = {("timesformer-base-finetuned-k400", "model_state"): ("optimizer_state",),
                   ("xclip-base-patch32", "model"): ("optimizer",), ("vit-msn-small", "msn_train"): ("opt",)}


@pytest.mark.parametrize("name, container, optimizer", _cases(OPTIMIZER_ENTRY, OPTIMIZER_ENTRY))
def test_optimizer_state_is_a_real_torch_state_dict(name, container, optimizer):
    """The entry loads into the torch optimizer the original builds."""
    c = harness.case(name, container)
    state = torch.load(c.checkpoint, map_location="cpu", weights_only=False)[optimizer]
    n_params = sum(len(g["params"]) for g in state["param_groups"])
    params = [torch.zeros(1, requires_grad=True) for _ in range(n_params)]
    groups, i = [], 0
    for g in state["param_groups"]:
        groups.append({"params": params[i:i + len(g["params"])]})
        i += len(g["params"])
    kind = torch.optim.SGD if "momentum_buffer" in next(iter(state["state"].values())) else torch.optim.AdamW
    opt = kind(groups, lr=1.0)
    opt.load_state_dict(state)
    assert len(opt.state_dict()["state"]) == len(state["state"]) > 0


# ---- Flax (msgpack) and Haiku (pickle) -----------------------------------------------------------

def _msgpack_leaves(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _msgpack_leaves(v, (*path, k))
    else:
        yield "/".join(path), tree


def test_vivit_legacy_train_state_as_scenic_saves_it():
    """scenic/train_lib/train_utils.py TrainState as of 9f05da5^ (lines 45-57) through
    flax's to_bytes (flax/optim/base.py: the optimizer as {target, state: {step,
    param_states}}); flax's msgpack_serialize copies the tree with jax.tree_util, which
    orders every mapping by key."""
    c = harness.case("vivit-b-16x2-kinetics400", "optimizer_target")
    raw = msgpack.unpackb(c.checkpoint.read_bytes(), strict_map_key=False, raw=False)
    assert list(raw) == ["accum_train_time", "global_step", "model_state", "optimizer", "rng"]
    assert list(raw["optimizer"]) == ["state", "target"] and list(raw["optimizer"]["state"]) == ["param_states", "step"]
    assert raw["model_state"] == {}
    state = flax.serialization.msgpack_restore(c.checkpoint.read_bytes())
    scalars = {k: (state[k].dtype, state[k].shape) for k in ("global_step", "accum_train_time")}
    assert scalars == {"global_step": (np.int32, ()), "accum_train_time": (np.int32, ())}
    assert (state["optimizer"]["state"]["step"].dtype, state["rng"].dtype, state["rng"].shape) == (np.int32, np.uint32, (2,))
    targets = dict(_msgpack_leaves(state["optimizer"]["target"]))
    momenta = dict(_msgpack_leaves(state["optimizer"]["state"]["param_states"]))
    assert {f"{k}/momentum" for k in targets} == set(momenta)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in (*targets.values(), *momenta.values()))


# Haiku: a plain pickle.dump of what hk.transform(...).init returned (numpy arrays after
# jax.device_get; a 2021 jax DeviceArray pickled as its numpy value either way), wrapped as
# {'params', 'state'} for the ImageNet models (perceiver/colabs/imagenet_classification.ipynb
# reads ckpt['params'], ckpt['state']). Written in 2021, by numpy 1.x: its array rebuilder
# was numpy.core.multiarray._reconstruct.
NUMPY_ARRAYS = {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
HAIKU_CONTAINERS = {
    ("language-perceiver", "dict"): NUMPY_ARRAYS,
    ("language-perceiver", "flatmapping"): NUMPY_ARRAYS | {"haiku._src.data_structures.FlatMapping"},
    ("vision-perceiver-conv", "dict"): NUMPY_ARRAYS,
    ("vision-perceiver-conv", "flatmapping"): NUMPY_ARRAYS | {"haiku._src.data_structures.FlatMapping"},
}


@pytest.mark.parametrize("name, container", _cases(HAIKU_CONTAINERS))
def test_haiku_pickle_as_the_original_saves_it(name, container):
    data = harness.case(name, container).checkpoint.read_bytes()
    assert pickle_protocol(data) == 4  # pickle.DEFAULT_PROTOCOL on Python 3.8-3.13
    assert pickled_globals(data) == HAIKU_CONTAINERS[name, container]


# ---- every tiny container converts through the command line ---------------------------------------

ALL_CONTAINERS = [(v, c) for v in ("timesformer-base-finetuned-k400", "xclip-base-patch32", "vit-msn-small",
                                   "vivit-b-16x2-kinetics400", "language-perceiver", "vision-perceiver-conv")
                  for c in harness.original(get_variant(v).family).containers]


@pytest.mark.parametrize("name, container", _cases(ALL_CONTAINERS))
def test_tiny_container_converts_through_the_cli(name, container, monkeypatch, tmp_path, capsys):
    case = harness.case(name, container)
    monkeypatch.setattr(pipeline, "spec_of", lambda v: dict(case.spec))
    monkeypatch.setenv("CONVERT_PARITY_CACHE", str(tmp_path / "cache"))
    code = cli.main(["convert", name, "--checkpoint", str(case.checkpoint), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 0, err
    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert written.keys() == case.converted.keys()
    assert all(torch.equal(written[k], case.converted[k]) for k in written)
