"""Haiku pickles and Flax msgpack files: only containers and arrays, parameter trees found and flattened.

Legitimate files of every pickle protocol (Haiku's own FlatMapping objects, numpy 1.x
and 2.x names, every numeric dtype, byte-swapped and Fortran-ordered arrays) load
bit-identically; every hostile file of parity_fixtures.hostile_trees ends in one
CheckpointError naming the file and the problem, with less memory than the attack
asks for; mutated files end in a load or a CheckpointError, nothing else.
"""
from __future__ import annotations

import pickle
import re
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from converters import array_trees, flax_files, haiku_files
from converters.errors import CheckpointError
from parity_fixtures import hostile_trees as hostile

FLAX_KEYS = ("optimizer/target", "params")


def test_restricted_pickle_reads_numpy_containers(tmp_path):
    params = {"encoder/~/linear": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)}}
    path = tmp_path / "params.pickle"
    path.write_bytes(pickle.dumps(params))
    loaded = haiku_files.load_pickle_restricted(path)
    np.testing.assert_array_equal(loaded["encoder/~/linear"]["w"], params["encoder/~/linear"]["w"])


def test_flax_msgpack_params_found_and_flattened(tmp_path):
    import flax.serialization

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


# ---- legitimate files, every protocol ---------------------------------------------------------

def _arrays() -> dict:
    """One array of each kind a params file can hold, with values that show any byte slip."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    readonly = rng.standard_normal(5).astype(np.float32)
    readonly.flags.writeable = False
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(3),
        "f16": rng.standard_normal(4).astype(np.float16),
        "bf16": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
        "big_endian": rng.standard_normal((2, 3)).astype(">f4"),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2)).astype(np.float32)),
        "readonly": readonly,
        "i8": np.array([-(2**63), 2**63 - 1], np.int64),
        "u8": np.array([2**64 - 1, 0], np.uint64),
        "i1": np.array([-128, 127], np.int8),
        "bool": np.array([True, False, True]),
        "zero_d": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "counter": np.int32(7),  # a numpy scalar
    }


def _assert_same_array(loaded, expected, where):
    assert isinstance(loaded, (np.ndarray, np.generic)), f"{where}: {type(loaded)}"
    assert type(loaded) is type(expected) or isinstance(expected, np.ndarray), f"{where}: {type(loaded)}"
    assert loaded.dtype == expected.dtype.newbyteorder("="), f"{where}: {loaded.dtype} vs {expected.dtype}"
    assert loaded.dtype.isnative and np.shape(loaded) == np.shape(expected), where
    native = np.asarray(expected).astype(expected.dtype.newbyteorder("="))
    assert np.asarray(loaded).tobytes(order="A") == native.tobytes(order="A"), f"{where}: bytes differ"
    if isinstance(loaded, np.ndarray):
        assert loaded.flags.writeable, f"{where}: read-only"


@pytest.mark.parametrize("container", ["dict", "flatmapping"])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_legit_haiku_pickle_loads_bit_identically(protocol, container, tmp_path):
    """Haiku's params as the Perceiver IO scripts pickle them (numpy arrays from
    jax.device_get, in Haiku's own FlatMapping objects or plain dicts), at every
    protocol: numpy pickles arrays through _reconstruct up to 4 and _frombuffer at 5,
    bytes through _codecs.encode up to 2."""
    import haiku as hk
    import jax.numpy as jnp

    arrays = _arrays()
    arrays["from_jax"] = np.asarray(jnp.arange(6, dtype=jnp.float32).reshape(2, 3))
    params = {"encoder/~/linear": arrays, "decoder": {"b": np.ones(2, np.float32)}}
    payload = {"params": params, "state": {"bn/~/mean_ema": {"counter": np.zeros((), np.int32)}}}
    if container == "flatmapping":
        payload = {"params": hk.data_structures.to_immutable_dict(params), "state": payload["state"]}
        assert b"FlatMapping" in pickle.dumps(payload, protocol=protocol)
    path = tmp_path / "params.pystate"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    loaded = haiku_files.load_pickle_restricted(path)
    assert type(loaded["params"]) is dict and type(loaded["params"]["encoder/~/linear"]) is dict
    for name, expected in arrays.items():
        _assert_same_array(loaded["params"]["encoder/~/linear"][name], expected, name)
    tensors = haiku_files.load_haiku_pickle(path)
    assert tensors["encoder/~/linear/bf16"].dtype == torch.bfloat16
    assert tensors["encoder/~/linear/bf16"].view(torch.uint16).numpy().tobytes() == arrays["bf16"].tobytes()
    assert torch.equal(tensors["encoder/~/linear/big_endian"], torch.from_numpy(arrays["big_endian"].astype("<f4")))
    assert torch.equal(tensors["encoder/~/linear/fortran"], torch.from_numpy(np.ascontiguousarray(arrays["fortran"])))
    assert sorted(tensors) == sorted([f"encoder/~/linear/{n}" for n in arrays] + ["decoder/b",
                                                                                  "state/bn/~/mean_ema/counter"])


@pytest.mark.parametrize("numpy_core", ["numpy.core", "numpy._core"])
def test_numpy_1_and_2_names_load(numpy_core, tmp_path):
    """numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.* (files of 2021, like
    Perceiver IO's, carry the old names)."""
    data = np.arange(6, dtype=np.float32)
    value = hostile.p_dict({"a": hostile.p_array((2, 3), "f4", data.tobytes(), numpy_core=numpy_core),
                            "b": hostile.p_frombuffer((6,), "f4", data.tobytes(), numpy_core=numpy_core),
                            "s": hostile.p_scalar("i4", (5).to_bytes(4, "little"), numpy_core=numpy_core)})
    path = tmp_path / "old.pickle"
    path.write_bytes(hostile.PROTO4 + hostile.p_dict({"m": value}) + pickle.STOP)
    loaded = haiku_files.load_pickle_restricted(path)["m"]
    assert loaded["a"].tobytes() == data.tobytes() and loaded["a"].shape == (2, 3)
    assert loaded["b"].tobytes() == data.tobytes()
    assert type(loaded["s"]) is np.int32 and loaded["s"] == 5


def test_an_array_under_two_names_is_two_tensors(tmp_path):
    """One array object at two keys (pickle's memo) is a leaf reached twice, not a shared
    container: it loads, as two tensors on one memory."""
    w = np.ones(3, np.float32)
    path = tmp_path / "p.pickle"
    path.write_bytes(pickle.dumps({"m": {"w": w, "w_tied": w}}))
    flat = haiku_files.load_haiku_pickle(path)
    assert flat["m/w"].data_ptr() == flat["m/w_tied"].data_ptr()


# ---- hostile and broken files -------------------------------------------------------------------

def _load(container: str, path):
    if container == "haiku":
        return haiku_files.load_haiku_pickle(path)
    return flax_files.load_flax_msgpack(path, FLAX_KEYS)


def _traced(fn):
    """fn()'s outcome (result or exception) and the peak bytes Python and numpy allocated
    meanwhile (numpy reports its array buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    except Exception as err:  # noqa: BLE001 - the caller checks which
        return err, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("container, attack", [("haiku", n) for n in hostile.HAIKU] + [("flax", n) for n in hostile.FLAX])
def test_hostile_file_gives_one_clear_error(container, attack, tmp_path):
    """Each attack ends in one CheckpointError line naming the file, matching the expected
    problem, decided before anything large is allocated: at most 20x the file plus 4 MiB
    (the attacks ask for 2 GB and more, or a walk without end)."""
    data, pattern = (hostile.HAIKU if container == "haiku" else hostile.FLAX)[attack]
    path = tmp_path / f"{container}-{attack}"
    path.write_bytes(data)
    err, peak = _traced(lambda: _load(container, path))
    assert type(err) is CheckpointError, f"{type(err).__name__}: {err}"
    message = str(err)
    assert message.startswith(str(path)) and "\n" not in message and re.search(pattern, message), message
    assert "\x1b" not in message
    assert peak < 20 * len(data) + (4 << 20), f"peak {peak} bytes for a {len(data)}-byte file"


def test_too_many_opcodes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(haiku_files, "MAX_OPS", 1000)
    path = tmp_path / "ops.pickle"
    path.write_bytes(hostile.haiku_file(hostile.p_array((1,), "f4", b"\0" * 4)))
    assert haiku_files.load_haiku_pickle(path)["encoder/~/linear/w"].shape == (1,)  # some 30 opcodes
    path.write_bytes(hostile.PROTO4 + (pickle.NONE + pickle.POP) * 501 + pickle.EMPTY_DICT + pickle.STOP)
    with pytest.raises(CheckpointError, match="runs more than 1000 opcodes"):
        haiku_files.load_haiku_pickle(path)


@pytest.mark.parametrize("target", ["numpy._core.numeric _frombuffer", "numpy._core.multiarray _reconstruct",
                                    "haiku._src.data_structures FlatMapping"])
@pytest.mark.parametrize("state", ["dict", "slots"])
def test_no_real_function_is_reachable_by_build(target, state, tmp_path):
    """A BUILD on a global would set the real function's attributes (its __defaults__
    change every later call in the process) if the unpickler handed it out."""
    import numpy._core.multiarray
    import numpy._core.numeric

    real = {"numpy._core.numeric _frombuffer": numpy._core.numeric._frombuffer,
            "numpy._core.multiarray _reconstruct": numpy._core.multiarray._reconstruct}.get(target)
    before = (dict(getattr(real, "__dict__", {})), getattr(real, "__defaults__", None)) if real else None
    attrs = hostile.p_dict({"__defaults__": hostile.p_tuple(hostile.p_int(1)), "pwned": hostile.p_int(1)})
    build_state = attrs if state == "dict" else hostile.p_tuple(hostile.NONE, attrs)
    path = tmp_path / "build.pickle"
    path.write_bytes(hostile.PROTO4 + hostile.op_global(*target.split()) + build_state + pickle.BUILD + pickle.STOP)
    with pytest.raises(CheckpointError, match=rf"refusing BUILD on {re.escape(target.replace(' ', '.'))}"):
        haiku_files.load_pickle_restricted(path)
    if real is not None:
        assert (dict(getattr(real, "__dict__", {})), getattr(real, "__defaults__", None)) == before
    path.write_bytes(pickle.dumps({"m": {"w": np.arange(3.0)}}, protocol=5))  # later loads are unchanged
    assert haiku_files.load_pickle_restricted(path)["m"]["w"].tolist() == [0.0, 1.0, 2.0]


def test_object_array_is_refused_before_allocation(tmp_path):
    """The decision is the declared size against the file's, taken before numpy is asked
    for memory: numpy's own _reconstruct would allocate the 2 GB at once."""
    data, _ = hostile.HAIKU["object-array-reconstruct"]
    assert len(data) < 200 and hostile.OBJECT_ELEMENTS * 8 >= 2 * 10**9
    path = tmp_path / "object.pickle"
    path.write_bytes(data)
    err, peak = _traced(lambda: haiku_files.load_pickle_restricted(path))
    assert isinstance(err, CheckpointError) and peak < 1 << 20, (err, peak)


def test_budget_bounds_what_a_file_makes():
    budget = array_trees.Budget(1000)
    budget.take(1000 + array_trees.SLACK, "all of it")
    with pytest.raises(CheckpointError, match=r"one more byte would need 1 bytes, .* leave 0 of the 1049576 bytes a "
                                              r"1000-byte file can hold"):
        budget.take(1, "one more byte")


# ---- legitimate Flax files ----------------------------------------------------------------------

def test_legit_flax_file_loads_bit_identically(tmp_path, monkeypatch):
    """Every numeric dtype, numpy scalars and an array over flax's chunk size (lowered
    here to 64 bytes) load as flax's own restore reads them."""
    import flax.serialization

    arrays = {k: v for k, v in _arrays().items() if k not in ("big_endian", "fortran")}  # flax writes C order, by name
    arrays["big"] = np.arange(100, dtype=np.float32).reshape(4, 25)
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 64)
    data = flax.serialization.msgpack_serialize({"optimizer": {"target": {"m": arrays}, "state": {"step": 1}}})
    assert b"__msgpack_chunked_array__" in data
    path = tmp_path / "checkpoint"
    path.write_bytes(data)
    restored = flax.serialization.msgpack_restore(data)["optimizer"]["target"]["m"]
    flat = flax_files.load_flax_msgpack(path, FLAX_KEYS)
    assert sorted(flat) == sorted(f"m/{k}" for k in arrays)
    for name, expected in restored.items():
        got = flat[f"m/{name}"]
        if expected.dtype.name == "bfloat16":
            assert got.dtype == torch.bfloat16 and got.view(torch.uint16).numpy().tobytes() == expected.tobytes()
        else:
            assert got.numpy().dtype == expected.dtype and got.numpy().tobytes() == np.asarray(expected).tobytes(), name
            assert tuple(got.shape) == np.shape(expected), name


@pytest.mark.parametrize("change, pattern", [
    (lambda d: d.update(shape={"0": 5}), r"a chunked array of shape \(5,\) whose chunks hold 100 elements"),
    (lambda d: d["chunks"].pop("1"), r"a chunked array whose chunks is not numbered 0..n-1"),
    (lambda d: d["chunks"].update({"0": 3}), r"a chunked array whose chunks are not flat arrays of one dtype"),
], ids=["wrong-shape", "missing-chunk", "chunk-not-array"])
def test_broken_chunked_array_is_refused(change, pattern, tmp_path, monkeypatch):
    import flax.serialization

    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 128)
    tree = {"params": {"w": np.arange(100, dtype=np.float32)}}
    flax.serialization._chunk_array_leaves_in_place(tree["params"])
    change(tree["params"]["w"])
    path = tmp_path / "checkpoint"
    path.write_bytes(flax.serialization.msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: 'w': {pattern}"):
        flax_files.load_flax_msgpack(path, ("params",))


# ---- tree walks --------------------------------------------------------------------------------

def test_walks_are_iterative_and_refuse_shared_nodes():
    deep: dict = {"w": np.ones(1)}
    for _ in range(10_000):  # ten times Python's recursion limit
        deep = {"m": deep}
    with pytest.raises(array_trees.TreeError, match="nested deeper than 64 levels"):
        array_trees.flatten_tree(deep)
    shared: dict = {"w": np.ones(1)}
    for _ in range(60):  # 2**60 paths: a recursive walk never ends
        shared = {"a": shared, "b": shared}
    with pytest.raises(array_trees.TreeError, match=r"shares a node \(a DAG or cycle\).*'a'/'a'/'a'/.*'b' is reached"):
        array_trees.flatten_tree(shared)
    with pytest.raises(array_trees.TreeError, match=r"two entries flatten to the same name 'a/b'"):
        array_trees.flatten_tree({"a/b": 1, "a": {"b": 2}})
    wide = {str(i): i for i in range(11)}
    assert len(array_trees.flatten_tree(wide)) == 11
    with pytest.raises(array_trees.TreeError, match="more than 10 nodes"):
        list(array_trees.walk(wide, max_nodes=10))
    assert array_trees.flatten_tree({"a": (), "b": (), "c": {}}) == {"a": (), "b": ()}  # () is one object


def test_describe_escapes_keys():
    text = array_trees.describe({"\x1b[2Jx": 1, 7: [], 10**5000: None})
    assert text == r"{'\x1b[2Jx': int, 7: list, <int>: NoneType}"


# ---- mutated files ---------------------------------------------------------------------------------

def _good_haiku(protocol: int) -> bytes:
    import haiku as hk

    params = {"encoder/~/linear": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)},
              "embed": {"embeddings": np.arange(4, dtype=np.float16), "count": np.int32(3)}}
    return pickle.dumps(hk.data_structures.to_immutable_dict(params), protocol=protocol)


def _good_flax() -> bytes:
    import flax.serialization

    params = {"Transformer": {"encoder_norm": {"scale": np.arange(4, dtype=np.float32)}},
              "cls": np.ones((1, 1, 2), np.float32), "step": np.int32(3)}
    return flax.serialization.msgpack_serialize({"optimizer": {"target": params, "state": {"step": 3}}})


GOOD = {"haiku-p2": _good_haiku(2), "haiku-p4": _good_haiku(4), "haiku-p5": _good_haiku(5), "flax": _good_flax()}

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 9)),
    st.tuples(st.just("overwrite"), st.integers(0, 2**16), st.binary(min_size=1, max_size=9)),
)


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, at, *arg in mutations:
        at %= len(out) + 1
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << arg[0]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = arg[0]
        elif kind == "delete":
            del out[at:at + arg[0]]
        elif kind == "overwrite":
            out[at:at + len(arg[0])] = arg[0]
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("good", GOOD)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_file_loads_or_fails_cleanly(good, mutations, fuzz_dir):
    """Byte flips, truncations, insertions and deletions of a good small file: a load or
    one CheckpointError, never another exception, within 20x the file plus 4 MiB."""
    data = _mutate(GOOD[good], mutations)
    path = fuzz_dir / f"{good}.bin"
    path.write_bytes(data)
    outcome, peak = _traced(lambda: _load(good.split("-")[0], path))
    if isinstance(outcome, Exception):
        event(re.sub(r"\d+|'[^']*'", "N", str(outcome).replace(str(path), "FILE"))[:60])  # --hypothesis-show-statistics
        assert type(outcome) is CheckpointError, f"{type(outcome).__name__}: {outcome}"
        assert "\n" not in str(outcome) and str(path) in str(outcome), str(outcome)
    else:
        event("loaded")
        assert all(isinstance(t, torch.Tensor) for t in outcome.values())
    assert peak < 20 * len(data) + (4 << 20), f"peak {peak} bytes for a {len(data)}-byte file"
