"""Haiku pickles and Flax msgpack files: only containers and arrays, parameter trees found and flattened."""
from __future__ import annotations

import pickle

import pytest
import torch

from converters import flax_files, haiku_files
from converters.errors import CheckpointError


def test_restricted_pickle_reads_numpy_containers(tmp_path):
    import numpy as np

    params = {"encoder/~/linear": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)}}
    path = tmp_path / "params.pickle"
    path.write_bytes(pickle.dumps(params))
    loaded = haiku_files.load_pickle_restricted(path)
    np.testing.assert_array_equal(loaded["encoder/~/linear"]["w"], params["encoder/~/linear"]["w"])


def test_flax_msgpack_params_found_and_flattened(tmp_path):
    import flax.serialization
    import numpy as np

    params = {"cls": np.ones((1, 1, 4), np.float32), "Transformer": {"encoder_norm": {"scale": np.arange(4.0)}}}
    legacy = tmp_path / "legacy"
    legacy.write_bytes(flax.serialization.msgpack_serialize({"optimizer": {"target": params, "state": {"step": 3}}}))
    newer = tmp_path / "newer"
    newer.write_bytes(flax.serialization.msgpack_serialize({"params": params, "global_step": 3}))
    for path in (legacy, newer):
        flat = flax_files.load_flax_msgpack(path, ("optimizer/target", "params"))
        assert sorted(flat) == ["Transformer/encoder_norm/scale", "cls"]
        assert torch.equal(flat["Transformer/encoder_norm/scale"], torch.arange(4.0, dtype=torch.float64))
    with pytest.raises(CheckpointError, match=r"no parameter tree under opt/target; found \{'global_step': int, 'params': dict\}"):
        flax_files.load_flax_msgpack(newer, ("opt/target",))
    newer.write_bytes(newer.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="not a readable Flax msgpack"):
        flax_files.load_flax_msgpack(newer, ("params",))


def test_haiku_pickle_params_and_state_flattened(tmp_path):
    import numpy as np

    params = {"encoder/~/linear": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}}
    state = {"encoder/~/batchnorm/~/mean_ema": {"average": np.ones(3, np.float32)}}
    path = tmp_path / "imagenet.pystate"
    path.write_bytes(pickle.dumps({"params": params, "state": state}))
    flat = haiku_files.load_haiku_pickle(path)
    assert sorted(flat) == ["encoder/~/linear/b", "encoder/~/linear/w", "state/encoder/~/batchnorm/~/mean_ema/average"]
    path.write_bytes(pickle.dumps(params))  # pickled directly (MLM, flow, multimodal)
    assert sorted(haiku_files.load_haiku_pickle(path)) == ["encoder/~/linear/b", "encoder/~/linear/w"]
    path.write_bytes(pickle.dumps({"encoder": {"w": "not an array"}}))
    with pytest.raises(CheckpointError, match="expected only arrays"):
        haiku_files.load_haiku_pickle(path)
