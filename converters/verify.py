"""`convert --verify`: the user's checkpoint proven against the original model.

The checkpoint's own weights, as the safe loader read them (the original's names), go
into the family's original reference at the converted spec (fixtures/*_original.py, in
the original framework); the converted HF model is loaded from the output as a user
loads it; both run on one deterministic input and every output is compared at the
family tolerance. What the comparison found is the verdict (`Verdict`), written
beside the model as parity.json and a model card (converters/evidence.py).

Outcomes, and the CLI's exit codes:
- "pass" (0): every output within the family tolerance of the original.
- "known-divergence" (3): the HF class, or the hub config asked for, computes
  something else than the original (named, with the measured difference); the weights
  are proven by the original run with the HF side's structure, within tolerance.
- "fail" (1): an output beyond tolerance; the first diverging layer is localised.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import downloads, errors, pipeline
from .family import Variant
from .registry import hub_config_values, known_divergence

EXIT_CODES = {"pass": 0, "fail": 1, "known-divergence": 3}
DEFAULT_SEED = 0


@dataclass(frozen=True)
class InputUsed:
    """Which input both models ran: the published recipe's (its files cached) or a seeded one."""

    kind: str  # "recipe", "seeded", or "fixed" (a reference input no seed enters)
    description: str
    seed: int | None = None
    files: tuple[tuple[str, str], ...] = ()  # (url, sha256) of the recipe files
    why_not_recipe: str = ""

    def describe(self) -> str:
        if self.kind == "recipe":
            return f"the published recipe's input ({self.description})"
        if self.kind == "fixed":
            return f"a fixed input: {self.description} ({self.why_not_recipe})"
        return (f"seeded input, seed {self.seed}: {self.description} ({self.why_not_recipe}; --seed replays or "
                f"changes it)")


@dataclass(frozen=True)
class Divergence:
    """A known port difference present in this conversion, and what it measured here."""

    name: str  # e.g. "HF decoder hard-codes the query residual"
    source: str  # "HF class" or "hub config"
    detail: str


@dataclass
class Verdict:
    variant: str
    outcome: str
    tolerance: Mapping[str, float]
    input: InputUsed
    outputs: list  # parity_harness.compare.Diff per output: HF against the original
    divergences: tuple[Divergence, ...] = ()
    weights_check: list = field(default_factory=list)  # HF against the original run with the HF structure
    localisation: object | None = None  # converters.localise result on a miss
    localisation_error: str = ""
    seconds: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def lines(self) -> list[str]:
        """What the CLI prints: the verdict, the input, one line per output, the localisation."""
        tol = ", ".join(f"{k}={v:g}" for k, v in self.tolerance.items())
        head = {"pass": f"verify passed: {self.variant} reproduces the original within the family tolerance ({tol})",
                "fail": f"verify FAILED: {self.variant} does not reproduce the original ({tol})",
                "known-divergence": f"verify: known divergence: {self.variant} computes something else than the "
                                    f"original, by a known cause: "
                                    + "; ".join(f"{d.name} ({d.source})" for d in self.divergences)}[self.outcome]
        out = [head, f"  input: {self.input.describe()}"]
        out += [f"  original vs HF  {d.describe()}" if not d.ok else f"  original vs HF  {_ok_line(d)}"
                for d in self.outputs]
        if self.divergences:
            verdict = "within" if all(d.ok for d in self.weights_check) else "BEYOND"
            out.append(f"  weights: the original run with the HF side's structure ({verdict} tolerance):")
            out += [f"    {d.describe() if not d.ok else _ok_line(d)}" for d in self.weights_check]
        if self.localisation is not None:
            out += [f"  {line}" for line in self.localisation.describe().splitlines()]
            if self.localisation.first is None:
                out.append("  (the difference arises where no module pair is observed: a parameter the model reads "
                           "directly, or the step between the last pair and the output)")
        elif self.localisation_error:
            out.append(f"  localisation unavailable: {self.localisation_error}")
        if self.outcome == "fail":
            out.append("  the output is kept with this evidence; do not use it")
        return out


def _ok_line(d) -> str:
    return (f"{d.key}: max abs diff {d.max_abs:.3g} at index {d.index}, max rel diff {d.max_rel:.3g}, "
            f"0/{d.total} out of tolerance")


def divergences(variant: Variant, hub_config: bool) -> tuple[Divergence, ...]:
    """The known port differences this conversion carries: the HF class's (registry), and
    the published hub config's numerics when `--hub-config` wrote them."""
    found = []
    if (known := known_divergence(variant)) is not None:
        found.append(Divergence(known.cause, "HF class", known.detail))
    if hub_config and (hub := hub_config_values(variant)):
        found.append(Divergence("the hub config's " + ", ".join(f"{k}={v!r}" for k, v in hub.items()), "hub config",
                                "--hub-config wrote the published hub config, which computes the published "
                                "values, not the original's outputs"))
    return tuple(found)


def _recipe_input(side, variant: Variant, spec: Mapping):
    """(inputs, InputUsed) from the published recipe's files if all are cached, else (None, reason)."""
    urls = variant.inputs.files
    if not urls:
        return None, "the variant has no published input recipe"
    try:
        paths = downloads.cached_only(urls)
    except errors.DownloadError as err:  # a cached file that no longer matches its recorded digest
        return None, f"a cached recipe file is unusable ({errors.one_line(err, 300)})"
    if paths is None:
        return None, "the published recipe's files are not cached"
    inputs = side.recipe_inputs(variant, spec, paths)
    if inputs is None:
        return None, "the published recipe's input does not fit this spec"
    files = tuple((url, downloads.sha256_file(p)) for url, p in zip(urls, paths))
    return inputs, InputUsed("recipe", variant.inputs.description, files=files)


def choose_input(side, variant: Variant, spec: Mapping, seed: int | None):
    """The published recipe's input when its files are cached and no seed is asked for;
    otherwise the reference's seeded input of the spec's shape and value range."""
    if seed is None:
        inputs, used = _recipe_input(side, variant, spec)
        if inputs is not None:
            return inputs, used
        why, seed = used, DEFAULT_SEED
    else:
        why = "--seed given"
    description, seeded = side.input_description(spec, seed)
    if not seeded:
        return side.inputs(spec, seed), InputUsed("fixed", description, why_not_recipe=why)
    return side.inputs(spec, seed), InputUsed("seeded", description, seed=seed, why_not_recipe=why)


def verify(variant: Variant, spec: Mapping, model_dir, checkpoint, state_dict_box: list | None = None, *,
           hub_config: bool = False, seed: int | None = None, progress: Callable[[str], None] = print) -> Verdict:
    """The verdict on one conversion of the local file `checkpoint`. `state_dict_box` may
    hold the original state dict the conversion's loader read (one element, taken out here,
    so that the original side is released before the HF model is loaded: the two full-size
    models never sit in memory together); without it the file is read again."""
    from parity_fixtures.harness import original
    from parity_harness.compare import compare_outputs
    from parity_harness.tolerances import TOLERANCE

    side, tolerance = original(variant.family), TOLERANCE[variant.family]
    found = divergences(variant, hub_config)
    seconds = {}
    inputs, used = choose_input(side, variant, spec, seed)
    progress(f"[verify 1/3] the original {variant.family} reference on {used.describe()}")
    clock = _Clock(seconds)
    with clock("load_original"):
        state_dict = state_dict_box.pop() if state_dict_box else pipeline.load_original_state_dict(checkpoint, variant)
        model = _load_original(side, spec, state_dict, variant)
        del state_dict
    with clock("original_forward"):
        reference = side.forward(model, inputs)
    port = None
    if found:  # the weights check: the original's network with what the HF side hard-codes
        with clock("port_forward"):
            port = side.port_forward(model, inputs, hub_config=hub_config_values(variant) if hub_config else {})
    del model
    progress("[verify 2/3] the converted model, loaded with from_pretrained")
    with clock("load_converted"):
        hf_model = load_converted(variant, model_dir)
    with clock("hf_forward"):
        hf = side.hf_forward(hf_model, inputs)
    outputs = compare_outputs(reference, hf, **tolerance)
    weights = compare_outputs(port, hf, **tolerance) if port is not None else []
    if found:
        outcome = "known-divergence" if all(d.ok for d in weights) else "fail"
    else:
        outcome = "pass" if all(d.ok for d in outputs) else "fail"
    verdict = Verdict(variant.name, outcome, dict(tolerance), used, outputs, found, weights, seconds=seconds)
    if outcome == "fail":
        progress("[verify 3/3] localising the first diverging layer")
        with clock("localisation"):
            _localise(verdict, variant, spec, side, hf_model, inputs, checkpoint)
    return verdict


def _load_original(side, spec, state_dict, variant):
    try:
        return side.load(spec, state_dict)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:  # strict loads name what does not fit
        raise errors.VerifyError(f"the original {variant.family} reference cannot take the checkpoint's weights at "
                                 f"{variant.name}'s spec: {errors.one_line(err, 600)}") from err


class _Clock:
    """`with clock(name):` adds the block's wall time to seconds[name]."""

    def __init__(self, seconds: dict):
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _localise(verdict: Verdict, variant, spec, side, hf_model, inputs, checkpoint) -> None:
    """Hooks on both sides, paired through the rename table: the first pair past tolerance.
    The original is loaded again from the checkpoint for it (on a miss only)."""
    from . import localise

    try:
        state_dict = pipeline.load_original_state_dict(checkpoint, variant)
        keys = list(state_dict)
        verdict.localisation = localise.localise(variant, spec, side, side.load(spec, state_dict), hf_model, inputs,
                                                 verdict.tolerance["atol"], verdict.tolerance["rtol"],
                                                 original_keys=keys)
    except Exception as err:  # localisation is a diagnosis: its failure must not hide the verdict
        verdict.localisation_error = f"{type(err).__name__}: {errors.one_line(err, 300)}"


def load_converted(variant: Variant, model_dir):
    """The output as a user loads it: from_pretrained, no missing, unexpected or mismatched keys."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the weights of a local file: no bar among the verdict's lines
    try:
        model, info = pipeline.hf_model_class(variant).from_pretrained(model_dir, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise errors.VerifyError(f"from_pretrained does not load the output cleanly: {problems}")
    return model.eval()
