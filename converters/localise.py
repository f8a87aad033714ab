"""Where a converted model first departs from the original: per-module outputs of both
sides, paired through the family's rename table, compared in the original's execution order.

`convert --verify` (#16) calls `localise` when the outputs miss: the original's module
outputs come from its `Original.activations` (fixtures/harness.py), the HF model's from
forward hooks here. An original module is paired with the HF module(s) its parameters
are renamed to (a fused q/k/v Linear with the three HF projections, whose outputs are
then concatenated on the last axis in target order). The two sides may lay a tensor out
differently (sequence-first, channels-last, heads as their own axis): a pair is compared
under the axis permutation (with consecutive axes merged) that makes the shapes agree and
gives the smallest difference; a pair no layout fits is counted as not comparable and
skipped, never reported as a divergence.

HF outputs are compared as the hooks see them and dropped, and the original's outputs
are kept only for paired modules, so a full-size model's activations are held once.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from parity_harness.compare import Diff, compare

from .family import Variant
from .registry import family
from .rename import match_rules

MAX_PERMUTED_AXES = 6  # 720 permutations; more axes are compared as laid out only


# ---- pairing through the rename table ---------------------------------------------------

@dataclass(frozen=True)
class Pair:
    original: str  # the original's module, named as the loader names its parameters (without the parameter)
    hf: tuple[str, ...]  # the HF module(s), installed names; several: outputs concatenated on the last axis

    @property
    def layer(self) -> str:
        """The HF block the pair belongs to: the path through its first numbered component
        (`timesformer.encoder.layer.3`, `perceiver.encoder.self_attends.0`), else the HF
        module's first two components (`perceiver.decoder`, `vivit.embeddings`)."""
        return block_of(self.hf[0])


def block_of(hf_module: str) -> str:
    parts = hf_module.split(".")
    numbered = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[: numbered + 1] if numbered is not None else parts[:2])


def _module_and_param(key: str, sep: str) -> tuple[str, str]:
    module, _, param = key.rpartition(sep)
    return module, param


def installed_names(variant: Variant, converted_keys: Iterable[str]) -> dict[str, str]:
    """On-disk (converted) parameter name -> the installed transformers' name."""
    keys = list(converted_keys)
    renamed = family(variant.family).installed_schema({k: k for k in keys})
    return {on_disk: installed for installed, on_disk in renamed.items()}


def pairs(variant: Variant, spec: Mapping, original_keys: Iterable[str]) -> list[Pair]:
    """Every original module with parameters -> the HF module(s) its parameters land in.

    Torch originals name modules with ".", Flax and Haiku ones with "/" (as the loader
    flattens them); parameters on the model's root (a module path of "") are not a layer's
    and are left out, and so are Haiku state entries ("state/..."), which no call reads."""
    sep = "." if variant.source.container == "torch" else "/"
    matched = match_rules(original_keys, family(variant.family).table(spec))
    installed = installed_names(variant, (t for _, targets in matched.values() for t in targets))
    grouped: dict[str, set[tuple[str, ...]]] = {}
    for key, (_, targets) in matched.items():
        module, _ = _module_and_param(key, sep)
        if not targets or not module or key.startswith("state/"):
            continue
        grouped.setdefault(module, set()).add(tuple(_module_and_param(installed[t], ".")[0] for t in targets))
    # A module whose parameters land in several unrelated HF modules (a model part holding
    # an embedding and a projection directly) has no one HF counterpart: left unpaired.
    return [Pair(module, hf) for module, (hf, *others) in grouped.items() if not others and all(hf)]


# ---- capture ------------------------------------------------------------------------------

def as_array(value) -> np.ndarray | None:
    """A module output as a float32 array: the first tensor of a tuple or model output;
    None when there is none (a module returning nothing comparable)."""
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if v is not None and hasattr(v, "shape")), None)
    elif isinstance(value, Mapping):
        value = next((v for v in value.values() if hasattr(v, "shape")), None)
    if value is None or not hasattr(value, "shape"):
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def torch_module_outputs(model: torch.nn.Module, run: Callable[[], object],
                         keep: Callable[[str], bool] | None = None, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """The outputs of `model`'s modules that own parameters, in call order, during `run()`,
    named by module path (minus `prefix`). nn.MultiheadAttention computes its fused
    in-projection and out_proj functionally (no submodule call): it gives two entries, its
    in-projection of the query (`<name>`, the module owning in_proj_weight) and its output
    (`<name>.out_proj`)."""
    out: list[tuple[str, np.ndarray]] = []
    handles = []

    def wanted(name: str) -> bool:
        return keep is None or keep(name)

    def record(name: str):
        def hook(module, args, output):
            value = as_array(output)
            if value is not None:
                out.append((name, value))
        return hook

    def in_projection(name: str):
        def hook(module, args, kwargs):
            query = args[0] if args else kwargs["query"]
            out.append((name, as_array(torch.nn.functional.linear(query, module.in_proj_weight, module.in_proj_bias))))
        return hook

    for path, module in model.named_modules():
        name = path.removeprefix(prefix)
        if not path or path == prefix.rstrip("."):
            continue
        if isinstance(module, torch.nn.MultiheadAttention) and module.in_proj_weight is not None:
            if wanted(name):
                handles.append(module.register_forward_pre_hook(in_projection(name), with_kwargs=True))
            if wanted(f"{name}.out_proj"):
                handles.append(module.register_forward_hook(record(f"{name}.out_proj")))
        elif any(True for _ in module.parameters(recurse=False)) and wanted(name):
            if not isinstance(module, torch.nn.modules.linear.NonDynamicallyQuantizableLinear):
                handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


# ---- layouts ------------------------------------------------------------------------------

def _merges(fine: Sequence[int], coarse: Sequence[int]) -> bool:
    """Whether `coarse` is `fine` with runs of consecutive axes merged (size-1 axes ignored)."""
    fine, coarse = [d for d in fine if d != 1], [d for d in coarse if d != 1]
    i = 0
    for c in coarse:
        prod = 1
        while prod < c and i < len(fine):
            prod *= fine[i]
            i += 1
        if prod != c:
            return False
    return i == len(fine)


def layouts(original: np.ndarray, hf_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """(permutation, the original's output laid out as HF's) for every axis permutation
    under which the shapes agree, up to merging consecutive axes on either side."""
    if original.size != int(np.prod(hf_shape)):
        return []
    axes = range(original.ndim)
    perms = itertools.permutations(axes) if original.ndim <= MAX_PERMUTED_AXES else [tuple(axes)]
    found, seen = [], set()
    for perm in perms:
        shape = tuple(original.shape[a] for a in perm)
        effective = tuple(a for a in perm if original.shape[a] != 1)  # moving size-1 axes changes nothing
        if effective in seen or not (_merges(shape, hf_shape) or _merges(hf_shape, shape)):
            continue
        seen.add(effective)
        found.append((perm, np.transpose(original, perm).reshape(hf_shape)))
    return found


# ---- comparing -------------------------------------------------------------------------

@dataclass(frozen=True)
class Compared:
    pair: Pair
    call: int  # the how-many-th call of the original module (0: the first)
    order: int  # position of the original's output in its execution order
    diff: Diff
    permutation: tuple[int, ...]  # applied to the original's output axes

    @property
    def ok(self) -> bool:
        return self.diff.ok


@dataclass(frozen=True)
class Skipped:
    pair: Pair
    call: int
    reason: str


@dataclass
class Localisation:
    compared: list[Compared]  # in the original's execution order
    skipped: list[Skipped] = field(default_factory=list)  # no layout fits, or a call on one side only
    unobserved: list[Pair] = field(default_factory=list)  # pairs one side never called (e.g. a parameter read directly)

    @property
    def first(self) -> Compared | None:
        return next((c for c in self.compared if not c.ok), None)

    @property
    def diverged(self) -> bool:
        return self.first is not None

    def layers_compared(self) -> set[str]:
        return {c.pair.layer for c in self.compared}

    def record(self) -> dict:
        """For parity.json: the first diverging pair with its numbers, and the counts."""
        first = self.first
        counts = {"pairs_compared": len(self.compared), "not_comparable": len(self.skipped),
                  "unobserved": len(self.unobserved)}
        if first is None:
            return {"first_divergence": None, **counts}
        d = first.diff
        return {"first_divergence": {
            "original_module": first.pair.original, "hf_modules": list(first.pair.hf), "layer": first.pair.layer,
            "call": first.call, "max_abs": d.max_abs, "max_rel": d.max_rel, "index": list(d.index),
            "out_of_tolerance": d.mismatched, "elements": d.total, "atol": d.atol, "rtol": d.rtol,
            "pairs_before_within_tolerance": sum(1 for c in self.compared if c.order < first.order)}, **counts}

    def describe(self) -> str:
        first = self.first
        counts = f"{len(self.compared)} pairs compared, {len(self.skipped)} not comparable"
        if first is None:
            return f"no divergence: every module output within tolerance ({counts})"
        d, pair = first.diff, first.pair
        before = sum(1 for c in self.compared if c.order < first.order)
        call = f", call {first.call}" if first.call else ""
        if d.nonfinite:
            numbers = f"{d.nonfinite} non-finite values ({d.nonfinite_what} at index {d.index})"
        else:
            numbers = f"max abs {d.max_abs:.3g} at index {d.index}, max rel {d.max_rel:.3g}"
        return (f"first divergence: original {pair.original}{call} -> HF {_hf_names(pair.hf)} ({pair.layer}): "
                f"{numbers}, {d.mismatched}/{d.total} out of tolerance (atol {d.atol:.2g}: the family's atol plus "
                f"rtol x this tensor's largest |value|; rtol {d.rtol:g}); "
                f"{before} pairs before it within tolerance; {counts}")


def _hf_names(modules: tuple[str, ...]) -> str:
    if len(modules) == 1:
        return modules[0]
    parents = {m.rpartition(".")[0] for m in modules}
    if len(parents) == 1:
        return f"{parents.pop()}.{{{','.join(m.rpartition('.')[2] for m in modules)}}}"
    return "[" + ", ".join(modules) + "]"


def compare_pair(pair: Pair, call: int, order: int, original: np.ndarray, hf: np.ndarray,
                 atol: float, rtol: float) -> Compared | Skipped:
    """The pair under its best-fitting layout; Skipped when no layout fits."""
    candidates = layouts(original, hf.shape)
    if not candidates:
        return Skipped(pair, call, f"shapes {tuple(original.shape)} and {tuple(hf.shape)} fit no layout")
    key = f"{pair.original} -> {_hf_names(pair.hf)}"
    # Relative to the tensor's scale, not each element's: inside a model most values sit
    # near zero (a LayerNorm's output crosses it everywhere), where an element-wise rtol
    # allows nothing, while rounding grows with the tensor's magnitude.
    atol = atol + rtol * float(np.abs(original).max(initial=0.0))
    best = min(((compare(key, laid_out, hf, atol, rtol), perm) for perm, laid_out in candidates),
               key=lambda dp: (dp[0].mismatched, dp[0].max_abs))
    return Compared(pair, call, order, best[0], best[1])


def localise(variant: Variant, spec: Mapping, original_side, original_model, hf_model, inputs,
             atol: float, rtol: float, original_keys: Iterable[str] | None = None) -> Localisation:
    """Run both models once on `inputs` (in the original's layout, as `original_side.forward`
    takes them) and compare every paired module output. `original_side` is the family's
    `Original` (fixtures/harness.py): `activations` gives the original's outputs,
    `hf_forward` runs the HF model. `original_keys`: the loader's keys (default: the
    original's at `spec`, `original_side.on_meta`)."""
    keys = list(original_keys if original_keys is not None else original_side.on_meta(spec))
    rows = original_side.compared_rows(spec, inputs)
    table = pairs(variant, spec, keys)
    by_original = {p.original: p for p in table}
    originals = original_side.activations(original_model, inputs, keep=by_original.__contains__)
    expected: dict[tuple[str, int], tuple[int, np.ndarray]] = {}
    calls: dict[str, int] = {}
    for order, (name, value) in enumerate(originals):
        if name in by_original and value is not None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            expected[(name, k)] = (order, np.asarray(value, np.float32))
    del originals

    hf_members: dict[str, list[Pair]] = {}
    for p in table:
        for m in p.hf:
            hf_members.setdefault(m, []).append(p)
    pending: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    hf_calls: dict[str, int] = {}
    results: list[Compared | Skipped] = []
    hf_seen: set[str] = set()

    def on_output(name: str, value: np.ndarray):
        k = hf_calls.get(name, 0)
        hf_calls[name] = k + 1
        hf_seen.add(name)
        for p in hf_members[name]:
            parts = pending.setdefault((p.original, k), {})
            parts[name] = value
            if len(parts) < len(p.hf):
                continue
            del pending[(p.original, k)]
            if (p.original, k) not in expected:
                results.append(Skipped(p, k, "called more often on the HF side"))
                continue
            order, original = expected.pop((p.original, k))
            hf = parts[p.hf[0]] if len(p.hf) == 1 else _concat([parts[m] for m in p.hf])
            if hf is not None:
                original, hf = _selected_rows(p, original, hf, rows)
            results.append(compare_pair(p, k, order, original, hf, atol, rtol) if hf is not None
                           else Skipped(p, k, "HF outputs of unequal leading shapes"))

    handles = [hf_model.get_submodule(m).register_forward_hook(_hf_hook(m, on_output)) for m in hf_members]
    try:
        with torch.no_grad():
            original_side.hf_forward(hf_model, inputs)
    finally:
        for h in handles:
            h.remove()
    for (name, k), _ in expected.items():
        if any(m in hf_seen for m in by_original[name].hf):
            results.append(Skipped(by_original[name], k, "called more often on the original side"))
    observed_originals = {name for name, _ in expected} | {r.pair.original for r in results}
    unobserved = [p for p in table if p.original not in observed_originals or not any(m in hf_seen for m in p.hf)]
    compared = sorted((r for r in results if isinstance(r, Compared)), key=lambda c: c.order)
    return Localisation(compared, [r for r in results if isinstance(r, Skipped)], unobserved)


def _selected_rows(pair: Pair, original: np.ndarray, hf: np.ndarray, rows) -> tuple[np.ndarray, np.ndarray]:
    """The rows the compared outputs keep (Original.compared_rows), for the modules it names."""
    if rows is None or not pair.original.startswith(tuple(rows[0])):
        return original, hf
    mask = np.asarray(rows[1])
    if original.shape[:mask.ndim] != mask.shape or hf.shape[:mask.ndim] != mask.shape:
        return original, hf
    return original[mask], hf[mask]


def _hf_hook(name: str, on_output):
    def hook(module, args, output):
        value = as_array(output)
        if value is not None:
            on_output(name, value)
    return hook


def _concat(parts: list[np.ndarray]) -> np.ndarray | None:
    if len({p.shape[:-1] for p in parts}) != 1:
        return None
    return np.concatenate(parts, axis=-1)
