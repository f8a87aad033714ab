"""upgrade-check: the offline parity suite under other transformers releases, compared.

One virtual environment per transformers release, built with uv from the package
registry pip is configured with (index, extra indexes, find-links) and cached under
`$CONVERT_PARITY_CACHE/envs` (default ~/.cache/convert-parity/envs), keyed by the release
and a hash of everything else it is built from: the pyproject pins, the exact torch
(the running interpreter's, e.g. `torch==2.13.0+cpu`, so that uv can never resolve
another torch and its CUDA packages), the Python and the registry. The project is
installed into each from the checkout (editable, no dependencies) on every use.

In each environment the suite (the matrix and the X-CLIP checks by default) writes its
results file; the comparison of each target with the baseline (`compare_runs`, pure)
gives status changes per test, the drift of every measured output (largest first,
beyond the family tolerance or not), changed key lists and configs that no longer load.
`bisect` binary-searches the releases between a good and a bad one for the first where
a check changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from . import report

DEFAULT_TESTS = ("parity_tests/test_matrix.py", "parity_tests/test_xclip.py")
FAILING = {"failed", "error", "missing"}
ENV_PINS_LEFT_OUT = {"transformers", "torch", "uv"}  # set per release; the torch of this interpreter; not needed inside
UV_HTTP_TIMEOUT = "60"  # seconds per request; uv's own default is 30 with retries


class EnvBuildError(Exception):
    """An environment could not be built (unreachable registry, unresolvable pins)."""


class SuiteError(Exception):
    """The suite did not produce a results file in an environment."""


# ---- what an environment is built from -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    checkout: Path
    cache: Path
    python: str
    torch: str
    pins: tuple[str, ...]
    registry: tuple[str, ...]  # uv arguments naming the indexes and find-links
    build_timeout: float = 1800.0
    run_timeout: float = 3600.0

    def key(self, version: str) -> str:
        """The environment's cache key: the release, and a hash of everything else in it."""
        what = json.dumps([self.python, platform.python_version(), self.torch, self.pins, self.registry])
        return f"transformers-{version}-{hashlib.sha256(what.encode()).hexdigest()[:12]}"


def default_cache() -> Path:
    root = os.environ.get("CONVERT_PARITY_CACHE") or Path.home() / ".cache" / "convert-parity"
    return Path(root) / "envs"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def project_pins(pyproject: Path, extras: Iterable[str] = ("test",)) -> tuple[str, ...]:
    """The project's dependencies and test extra as pyproject states them, less
    transformers (set per release), torch (pinned exactly, see torch_requirement) and uv."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"]) + [r for e in extras for r in project.get("optional-dependencies", {}).get(e, [])]
    return tuple(r for r in reqs if _name(r) not in ENV_PINS_LEFT_OUT)


def torch_requirement(pyproject: Path) -> str:
    """The torch this interpreter runs (with its local tag: `2.13.0+cpu` is the CPU wheel),
    if it satisfies the pyproject pin; else the pin itself."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    pinned = next(Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]
                  if _name(r) == "torch")
    with contextlib.suppress(metadata.PackageNotFoundError):
        installed = metadata.version("torch")
        if pinned.specifier.contains(installed, prereleases=True):
            return f"torch=={installed}"
    return str(pinned)


def _pip_config() -> dict[str, list[str]]:
    """pip's configured registry (`pip config list` merges files and PIP_* variables)."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                          timeout=60, check=False)
    config: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        option = key.split(".")[-1]
        if option in ("index-url", "extra-index-url", "find-links"):
            config.setdefault(option, []).extend(value.strip().strip("'\"").split())
    return config


def registry_args(config: Mapping[str, list[str]] | None = None) -> tuple[str, ...]:
    """uv arguments for the registry pip uses: the same index, extra indexes and find-links;
    versions from every index are weighed together, as pip does."""
    config = _pip_config() if config is None else config
    args: list[str] = []
    for url in dict.fromkeys(config.get("index-url", [])[:1]):
        args += ["--index-url", url]
    for url in dict.fromkeys(config.get("extra-index-url", [])):
        args += ["--extra-index-url", url]
    for url in dict.fromkeys(config.get("find-links", [])):
        args += ["--find-links", url]
    if config.get("extra-index-url"):
        args += ["--index-strategy", "unsafe-best-match"]
    return tuple(args)


def recipe(checkout: Path, cache: Path | None = None, **timeouts) -> Recipe:
    pyproject = checkout / "pyproject.toml"
    return Recipe(checkout=checkout.resolve(), cache=(cache or default_cache()), python=sys.executable,
                  torch=torch_requirement(pyproject), pins=project_pins(pyproject), registry=registry_args(),
                  **timeouts)


# ---- environments ----------------------------------------------------------------------------

def _uv() -> str:
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if not found:
        raise EnvBuildError("uv is not installed: pip install uv (it is in the test extra)")
    return found


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no output"


def _run(cmd: list[str], timeout: float, what: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "UV_HTTP_TIMEOUT": os.environ.get("UV_HTTP_TIMEOUT", UV_HTTP_TIMEOUT), **kw.pop("env", {})}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kw)
    except subprocess.TimeoutExpired:
        raise EnvBuildError(f"{what}: no result after {timeout:.0f} s (registry unreachable?)") from None
    if done.returncode != 0:
        raise EnvBuildError(f"{what}: {_tail(done.stderr or done.stdout)}")
    return done


@dataclasses.dataclass
class Env:
    version: str
    path: Path
    built: bool  # built by this call, or taken from the cache
    seconds: float

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def build_env(version: str, r: Recipe, log: Callable[[str], None] = lambda s: None) -> Env:
    """The cached environment for one transformers release, built if absent: in a temporary
    directory renamed into place when complete, so a failed or interrupted build leaves
    no half environment behind."""
    t0 = time.monotonic()
    path = r.cache / r.key(version)
    if (path / "convert-parity-env.json").exists():
        return Env(version, path, False, time.monotonic() - t0)
    r.cache.mkdir(parents=True, exist_ok=True)
    tmp = r.cache / f".{path.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    uv = _uv()
    log(f"building the environment for transformers {version} ({path})")
    try:
        _run([uv, "venv", "--quiet", "--python", r.python, str(tmp)], 120, f"transformers {version}: uv venv")
        # No --compile-bytecode: it compiles all of torch and jax (3 minutes here); the first suite run
        # writes the .pyc of the modules it imports into the environment, and later runs reuse them.
        _run(["nice", "-n", "10", uv, "pip", "install", "--python", str(tmp / "bin" / "python"), *r.registry,
              r.torch, *r.pins, f"transformers=={version}"], r.build_timeout,
             f"transformers {version} cannot be installed with {r.torch} and Python {platform.python_version()}")
        (tmp / "convert-parity-env.json").write_text(json.dumps(
            {"transformers": version, "torch": r.torch, "pins": r.pins, "registry": r.registry}, indent=1) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another run built it meanwhile: use that one
            if not (path / "convert-parity-env.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Env(version, path, True, time.monotonic() - t0)


def install_checkout(env: Env, r: Recipe) -> None:
    """The project from this checkout, editable and without dependencies (the pins are the env's)."""
    _run([_uv(), "pip", "install", "--quiet", "--python", str(env.python), *r.registry, "--no-deps", "-e",
          str(r.checkout)], r.build_timeout, f"transformers {env.version}: installing the checkout")


def run_suite(env: Env, r: Recipe, results: Path, pytest_args: Iterable[str], jobs: int = 2) -> tuple[Path, float]:
    """pytest in the environment, offline, writing its results file; the tests' own failures
    are data (the comparison reports them), a missing results file is an error."""
    install_checkout(env, r)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    cmd = ["nice", "-n", "10", str(env.python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(jobs),
           "--results", str(results), *pytest_args]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=r.checkout, capture_output=True, text=True, timeout=r.run_timeout, check=False,
                              env={**{k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"},
                                   "HF_HUB_OFFLINE": "1", "CONVERT_PARITY_OFFLINE": "1"})  # the env's own plugins
    except subprocess.TimeoutExpired:
        raise SuiteError(f"transformers {env.version}: the suite did not finish in {r.run_timeout:.0f} s") from None
    (results.with_suffix(".log")).write_text(done.stdout + done.stderr)
    if not results.exists():
        raise SuiteError(f"transformers {env.version}: pytest wrote no results (exit {done.returncode}): "
                         f"{_tail(done.stdout + done.stderr)}")
    return results, time.monotonic() - t0


# ---- the comparison (pure: results documents in, findings out) ------------------------------

def _family_atol(variant: str, output: Mapping) -> float:
    """The family tolerance (parity_harness.tolerances) of the variant; the atol the output
    was checked with for a name the registry does not know."""
    from converters.registry import UnknownVariantError, get_variant

    from .tolerances import TOLERANCE

    with contextlib.suppress(UnknownVariantError, KeyError):
        return TOLERANCE[get_variant(variant).family]["atol"]
    return output.get("atol", 0.0)


def _rows(doc: Mapping) -> dict[tuple[str, str], dict]:
    return {(r["variant"], r["check"]): r for r in doc["rows"]}


def _keys(row: Mapping | None) -> dict | None:
    keys = (row or {}).get("keys")
    return None if keys is None else {k: keys.get(k, []) for k in ("missing", "unexpected", "mismatched")}


def _line(doc: Mapping) -> str:
    return ".".join(doc["versions"].get("transformers", "?").split(".")[:2])


def compare_runs(base: Mapping, other: Mapping) -> dict:
    """What changed from the baseline's results to another release's."""
    a, b = _rows(base), _rows(other)
    status = []
    for key in sorted(set(a) | set(b)):
        before, after = (a.get(key) or {}).get("status", "missing"), (b.get(key) or {}).get("status", "missing")
        if before != after:
            status.append({"variant": key[0], "check": key[1], "before": before, "after": after,
                           "regression": after in FAILING and before not in FAILING,
                           "message": (b.get(key) or {}).get("message")})
    outputs = {(r["variant"], r["check"], o["output"]): o for doc in (base, other) for r in doc["rows"]
               for o in r.get("outputs", [])}
    drift = []
    for d in report.drift(base, other):
        if d["change"] == 0:
            continue
        limit = _family_atol(d["variant"], outputs[(d["variant"], d["check"], d["output"])])
        drift.append({**d, "tolerance": limit, "beyond": d["change"] > limit})
    keys = [{"variant": k[0], "check": k[1], "before": _keys(a.get(k)), "after": _keys(b.get(k))}
            for k in sorted(set(a) & set(b))
            if None not in (_keys(a[k]), _keys(b[k])) and _keys(a[k]) != _keys(b[k])]  # no keys: it did not load
    nearest = sorted({r["keys"]["compared_with"] for r in other["rows"]
                      if r.get("keys") and r["check"] == "test_loading_keys"} - {_line(other)})
    no_load = [{"variant": k[0], "message": b[k].get("message")} for k in sorted(b)
               if k[1] == "test_loading_keys" and b[k]["status"] in FAILING
               and (a.get(k) or {}).get("status") not in FAILING and not _is_assertion(b[k].get("message"))]
    measured = sum(1 for r in other["rows"] for _ in r.get("outputs", []))
    return {"base": base["versions"].get("transformers"), "other": other["versions"].get("transformers"),
            "counts": {label: _counts(doc) for label, doc in (("base", base), ("other", other))},
            "status_changes": status, "drift": drift, "measured_outputs": measured, "key_changes": keys,
            "nearest_key_line": nearest, "no_longer_load": no_load,
            "regressions": sum(s["regression"] for s in status), "beyond_tolerance": sum(d["beyond"] for d in drift)}


def _is_assertion(message: str | None) -> bool:
    """A failed comparison, not an exception from loading (from_pretrained raised)."""
    return bool(message) and message.startswith("AssertionError")


def _counts(doc: Mapping) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in doc["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return dict(sorted(counts.items()))


def failed(comparison: Mapping) -> bool:
    return bool(comparison["regressions"] or comparison["beyond_tolerance"])


def _fmt(x) -> str:
    return "-" if x is None else "non-finite" if isinstance(x, float) and math.isinf(x) else f"{x:.3g}"


def _keys_text(keys: Mapping | None) -> str:
    if keys is None:
        return "-"
    return "; ".join(f"{k} {len(v)}" + (f" ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})" if v else "")
                     for k, v in keys.items())


def _grouped(status_changes: list[Mapping]) -> list[tuple[tuple, list[str]]]:
    """One row per kind of change (check, before, after, message): a release that breaks
    one check for 18 variants is one line of the summary, not 18 (the JSON keeps each)."""
    groups: dict[tuple, list[str]] = {}
    for s in status_changes:
        groups.setdefault((s["check"], s["before"], s["after"], s["regression"], s["message"]), []).append(s["variant"])
    return sorted(groups.items(), key=lambda g: (not g[0][3], g[0][0], g[0][1], g[0][2]))


def _variants(names: list[str], most: int = 4) -> str:
    shown_names = ", ".join(n or "-" for n in names[:most])
    return f"{len(names)}: {shown_names}" + (", ..." if len(names) > most else "")


def render_markdown(comparisons: list[Mapping], drift_rows: int = 25) -> str:
    """The summary for a CI step (GitHub's step summary renders it): one section per target."""
    lines = ["# Upgrade check", ""]
    for c in comparisons:
        verdict = (f"**FAIL**: {c['regressions']} status regression(s), {c['beyond_tolerance']} output(s) drifted "
                   "beyond the family tolerance" if failed(c) else
                   "**PASS**: no status regression, no drift beyond the family tolerance")
        counts = {k: ", ".join(f"{n} {s}" for s, n in v.items()) for k, v in c["counts"].items()}
        lines += [f"## transformers {c['base']} -> {c['other']}", "", verdict, "",
                  f"- {c['base']}: {counts['base']}", f"- {c['other']}: {counts['other']}",
                  f"- {len(c['drift'])} of {c['measured_outputs']} measured outputs moved"
                  f" ({c['beyond_tolerance']} beyond tolerance)", ""]
        if c["status_changes"]:
            lines += [f"### Status changes ({len(c['status_changes'])})", "",
                      "| check | before | after | regression | variants | message |", "|---|---|---|---|---|---|"]
            lines += [f"| {check} | {before} | {after} | {'yes' if regression else 'no'} | {_variants(variants)} | "
                      f"{(message or '').replace('|', '/')[:160]} |"
                      for (check, before, after, regression, message), variants in _grouped(c["status_changes"])]
            lines.append("")
        if c["drift"]:
            shown_rows = c["drift"][:drift_rows]
            lines += [f"### Numeric drift, largest first ({len(shown_rows)} of {len(c['drift'])} shown)", "",
                      "| variant | check | output | before | after | change | tolerance | beyond |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {d['variant']} | {d['check']} | {d['output']} | {_fmt(d['base'])} | {_fmt(d['other'])} | "
                      f"{_fmt(d['change'])} | {_fmt(d['tolerance'])} | {'**yes**' if d['beyond'] else 'no'} |"
                      for d in shown_rows]
            lines.append("")
        if c["key_changes"]:
            groups: dict[tuple, list[str]] = {}
            for k in c["key_changes"]:
                groups.setdefault((k["check"], _keys_text(k["before"]), _keys_text(k["after"])), []).append(k["variant"])
            lines += [f"### Changed key lists ({len(c['key_changes'])})", "", "| check | variants | before | after |",
                      "|---|---|---|---|"]
            lines += [f"| {check} | {_variants(names)} | {before} | {after} |"
                      for (check, before, after), names in sorted(groups.items())]
            lines.append("")
        if c["nearest_key_line"]:
            lines += [f"Key lists: no record for transformers {'.'.join(str(c['other']).split('.')[:2])}; compared with "
                      f"the nearest recorded line {', '.join(c['nearest_key_line'])}.", ""]
        if c["no_longer_load"]:
            lines += [f"### Configs that no longer load ({len(c['no_longer_load'])})", ""]
            lines += [f"- {n['variant']}: {n['message']}" for n in c["no_longer_load"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_outputs(runs: list[tuple[str, dict]], comparisons: list[dict], out: Path) -> dict[str, Path]:
    """upgrade.md, upgrade.json and the report's plot (one series per release)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "upgrade.md", "json": out / "upgrade.json", "png": out / "parity.png"}
    files["md"].write_text(render_markdown(comparisons))
    strict = [{**c, "drift": [{**d, **{k: None if isinstance(d[k], float) and math.isinf(d[k]) else d[k]
                                       for k in ("base", "other", "change")}} for d in c["drift"]]}
              for c in comparisons]
    files["json"].write_text(json.dumps({"comparisons": strict}, indent=1) + "\n")
    report.plot(runs, files["png"])
    return files


# ---- the commands --------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _measure(version: str, r: Recipe, out: Path, pytest_args: list[str], jobs: int, tally: dict) -> dict:
    env = build_env(version, r, _log)
    tally["built" if env.built else "cached"] += 1
    _log(f"transformers {version}: environment {'built' if env.built else 'from the cache'} in {env.seconds:.0f} s")
    results, seconds = run_suite(env, r, out / "results" / f"transformers-{version}.json", pytest_args, jobs)
    doc = report.read_results(results)
    _log(f"transformers {version}: {', '.join(f'{n} {s}' for s, n in _counts(doc).items())} in {seconds:.0f} s")
    return doc


def upgrade_check(base: str, targets: list[str], r: Recipe, out: Path, pytest_args: list[str], jobs: int = 2) -> int:
    tally = {"built": 0, "cached": 0}
    docs = {v: _measure(v, r, out, pytest_args, jobs, tally) for v in [base, *targets]}
    comparisons = [compare_runs(docs[base], docs[t]) for t in targets]
    files = write_outputs([(f"transformers {v}", docs[v]) for v in docs], comparisons, out)
    print(files["md"].read_text())
    if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(summary, "a") as fh:
            fh.write(files["md"].read_text())
    print(f"environments: {tally['built']} built, {tally['cached']} from the cache; "
          + "; ".join(f"{k}: {p}" for k, p in files.items()))
    return 1 if any(failed(c) for c in comparisons) else 0


def _version(v: str):
    from packaging.version import Version

    return Version(v)


def list_releases(good: str, bad: str) -> list[str]:
    """The transformers releases from good to bad inclusive, oldest first, as pip's
    configured registry lists them (final releases only)."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "transformers", "--timeout", "30", "--retries", "1"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        raise EnvBuildError("listing transformers releases: the registry did not answer in 180 s") from None
    found = re.search(r"Available versions:\s*(.+)", done.stdout)
    if done.returncode != 0 or not found:
        raise EnvBuildError(f"listing transformers releases: {_tail(done.stderr or done.stdout)}")
    lo, hi = _version(good), _version(bad)
    return sorted((v.strip() for v in found.group(1).split(",") if lo <= _version(v.strip()) <= hi), key=_version)


def changes(good: Mapping, other: Mapping, threshold: float | None) -> list[str]:
    """How the check's rows in `other` differ from the good release's: a status change, a row
    that appears or vanishes, or an output moved by more than `threshold` (None: the family
    tolerance)."""
    a, b = _rows(good), _rows(other)
    found = []
    for key in sorted(set(a) | set(b)):
        before, after = (a.get(key) or {}).get("status", "missing"), (b.get(key) or {}).get("status", "missing")
        if before != after:
            found.append(f"{key[1]}[{key[0]}] {before} -> {after}")
    for d in compare_runs(good, other)["drift"]:
        limit = d["tolerance"] if threshold is None else threshold
        if d["change"] > limit:
            found.append(f"{d['check']}[{d['variant']}] {d['output']} moved {_fmt(d['change'])} (> {limit:g})")
    return found


def _numbers(doc: Mapping) -> str:
    parts = []
    for (variant, check), row in sorted(_rows(doc).items()):
        worst = report.worst(row)
        keys = _keys(row)
        parts.append(f"{check}[{variant}] {row['status']}" + (f", max abs {_fmt(worst)}" if worst is not None else "")
                     + (f", {_keys_text(keys)}" if keys else "")
                     + (f": {row['message'][:200]}" if row.get("message") else ""))
    return "; ".join(parts) or "no rows"


def bisect(check: str, good: str, bad: str, r: Recipe, out: Path, threshold: float | None = None,
           releases: list[str] | None = None, measure: Callable | None = None) -> int:
    """Binary search for the first release between good and bad where `check` (pytest
    arguments) changes from what it is on good. Xfail marks are ignored (--runxfail), so the
    status is the behaviour, not the bookkeeping. A release that cannot be installed is
    skipped with the reason. Exit 0 when found, 1 when good and bad do not differ."""
    pytest_args = ["--runxfail", *shlex.split(check)]
    tally = {"built": 0, "cached": 0}
    measure = measure or (lambda v: _measure(v, r, out, pytest_args, 0, tally))  # a few tests: no workers
    releases = releases or list_releases(good, bad)
    _log(f"{len(releases)} releases from {good} to {bad}: {', '.join(releases)}")
    if good not in releases or bad not in releases:
        raise EnvBuildError(f"--good {good} and --bad {bad} must both be releases on the registry")
    docs, skipped = {}, {}

    def result(v):
        if v not in docs:
            docs[v] = measure(v)
        return docs[v]

    baseline = result(good)
    if not changes(baseline, result(bad), threshold):
        print(f"no change beyond the threshold from {good} to {bad}: {good}: {_numbers(baseline)}; "
              f"{bad}: {_numbers(result(bad))}")
        return 1
    lo, hi = releases.index(good), releases.index(bad)
    candidates = list(releases)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            doc = result(candidates[mid])
        except EnvBuildError as err:
            skipped[candidates[mid]] = str(err)
            _log(f"skipped {candidates[mid]}: {err}")
            del candidates[mid]
            hi -= 1
            continue
        if changes(baseline, doc, threshold):
            hi = mid
        else:
            lo = mid
    first, last_good = candidates[hi], candidates[lo]
    after = releases[releases.index(first) + 1] if first != releases[-1] else None
    lines = [f"first release where the check changes: transformers {first}",
             f"  previous release ({last_good}, unchanged): {_numbers(docs[last_good])}",
             f"  {first}: {_numbers(docs[first])}",
             f"  changes from {good}: {'; '.join(changes(baseline, docs[first], threshold))}",
             f"  next release: {after or '-'}" + (f" ({_numbers(docs[after])})" if after in docs else ""),
             f"  releases between {good} and {bad}: {len(releases)}; measured: {len(docs)} "
             f"({', '.join(sorted(docs, key=_version))}); environments built: {tally['built']}, "
             f"from the cache: {tally['cached']}"]
    lines += [f"  skipped {v}: {why}" for v, why in skipped.items()]
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bisect.json").write_text(json.dumps({
        "check": check, "good": good, "bad": bad, "first": first, "previous": last_good, "next": after,
        "releases": releases, "measured": sorted(docs, key=_version), "built": tally["built"],
        "cached": tally["cached"], "skipped": skipped,
        "changes": changes(baseline, docs[first], threshold)}, indent=1) + "\n")
    return 0
