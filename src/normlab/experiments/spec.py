"""Experiment files: a TOML declaration -> a validated :class:`Experiment` -> a list of runs.

An experiment file names what to train and what to vary; every key is checked, unknown keys are
errors that name the key and the allowed ones::

    description = "Collins et al. 2019, Figure 1 (left): MNIST CNN"
    methods = ["none", "bn_shift", "std_loss"]   # registry names or "+" combinations
    baseline = "none"                              # speed-ups are measured against it
    seeds = 10                                     # a count (0..n-1) or an explicit list

    [run]                                          # fields of normlab.engine.RunConfig but method,
                                                   # seed, method_options (the keys above and [options])
    model = "cnn"
    steps = 1000
    lr = 1e-3

    [options.std_loss]                             # options of one method
    weight = 1.0

    [grid]                                         # optional sweeps: run fields, or method.option
    lr = [1e-3, 1e-2]                              # (a method option sweeps that method's runs only)
    "std_loss.weight" = [0.01, 0.1, 1.0]

    [paper]                                        # reported figures shown beside ours (optional)
    metric = "final_test_acc"                      # what they are: final test accuracy in %
    "none lr=0.001" = [24.6, 6.5]                  # a group: mean, std (std may be omitted)

Runs are grouped by method and swept values; a group's label is the method spec followed by its
grid values (``"none lr=0.001"``, ``"std_loss lr=0.01 std_loss.weight=0.1"``; just ``"none"`` without a
grid). ``[paper]`` keys must be such labels.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from ..engine import RunConfig

__all__ = ["Experiment", "SpecError", "load", "bundled", "Run"]

TOP_KEYS = {"description", "reference", "methods", "baseline", "seeds", "run", "options", "grid", "paper",
            "quick", "report"}
RUN_KEYS = {f.name for f in fields(RunConfig)} - {"method", "seed", "method_options"}
REPORT_KINDS = ("curves", "sweep", "lr-sweep", "loss-vs-accuracy", "distributions")


class SpecError(ValueError):
    """An invalid experiment file or override; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Run:
    """One run of an experiment: a stable id, a human label (its group) and its config."""

    id: str
    group: str
    config: RunConfig


@dataclass
class Experiment:
    """A validated experiment (see the module docstring for the file format)."""

    name: str
    description: str
    methods: list[str]
    baseline: str | None
    seeds: list[int]
    run: dict
    options: dict[str, dict] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    paper: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    reference: str = ""

    def runs(self) -> list[Run]:
        """Every run of the grid (method x swept values x seed), in a stable order."""
        out: list[Run] = []
        run_axes = {k: v for k, v in self.grid.items() if "." not in k}
        for method in self.methods:
            parts = set(method.split("+"))
            opt_axes = {k: v for k, v in self.grid.items() if "." in k and k.split(".", 1)[0] in parts}
            axes = {**run_axes, **opt_axes}
            keys = list(axes)
            for values in itertools.product(*(axes[k] for k in keys)):
                run_fields = dict(self.run)
                options = {}
                for part in method.split("+"):
                    options.update({(f"{part}.{k}" if "+" in method else k): v
                                    for k, v in self.options.get(part, {}).items()})
                label = [method]
                for k, v in zip(keys, values):
                    if "." in k:
                        part, opt = k.split(".", 1)
                        options[k if "+" in method else opt] = v
                    else:
                        run_fields[k] = v
                    label.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
                group = " ".join(label)
                for seed in self.seeds:
                    cfg = RunConfig(method=method, seed=seed, method_options=options, **run_fields)
                    out.append(Run(run_id(cfg), group, cfg))
        return out

    def to_dict(self) -> dict:
        """The experiment's definition as a plain dict (stored with its runs to rebuild the report)."""
        return {k: getattr(self, k) for k in ("name", "description", "reference", "methods", "baseline",
                                              "seeds", "run", "options", "grid", "paper", "report")}


def run_id(cfg: RunConfig) -> str:
    """A stable id of a config: the same settings always give the same id (resume, no repeats)."""
    import hashlib

    text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(value: object) -> str:
    # 1 and 1.0 are one value (one setting, one run id).
    return json.dumps(float(value) if isinstance(value, int) and not isinstance(value, bool) else value)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


def _check_keys(where: str, got: dict, allowed: set[str]) -> None:
    unknown = sorted(set(got) - allowed)
    _expect(not unknown, f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def validate(raw: dict, name: str = "experiment", *, paper_groups: bool = True) -> Experiment:
    """Check a parsed experiment table and build the :class:`Experiment`; raises :class:`SpecError`.

    ``paper_groups``: every ``[paper]`` key must be the label of a group of runs (off for a copy
    with fewer groups, such as :func:`override`'s, which shows the figures of the groups it keeps).

    Besides the keys and run fields, every distinct model and method configuration is built once
    (on a throw-away model, leaving the global RNG as it was), so that a bad option value, such as
    a NaN std-loss weight, stops the experiment before its first run rather than failing every
    run of its group after the others have trained.
    """
    import torch

    from .. import models
    from ..data import TRAIN_SIZES
    from ..methods.registry import apply, get_method, parse_spec

    _expect(isinstance(raw, dict), f"{name}: the file must be a TOML table")
    _check_keys(name, raw, TOP_KEYS)
    methods = raw.get("methods")
    _expect(isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods),
            f"{name}: 'methods' must be a non-empty list of method names, e.g. [\"none\", \"std_loss\"]")
    _expect(len(set(methods)) == len(methods), f"{name}: 'methods' lists a method twice: {methods}")
    for m in methods:
        try:
            parse_spec(m)
        except ValueError as e:
            raise SpecError(f"{name}: methods: {e}") from None
    baseline = raw.get("baseline", methods[0])
    _expect(baseline in methods, f"{name}: 'baseline' must be one of methods {methods}, got {baseline!r}")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        _expect(seeds >= 1, f"{name}: 'seeds' must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    _expect(isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds),
            f"{name}: 'seeds' must be a count or a list of distinct non-negative integers, got {seeds!r}")
    run = raw.get("run", {})
    _expect(isinstance(run, dict), f"{name}: [run] must be a table")
    _check_keys(f"{name}: [run]", run, RUN_KEYS)
    options = raw.get("options", {})
    _expect(isinstance(options, dict), f"{name}: [options] must be a table of per-method tables")
    all_parts = {p for m in methods for p in m.split("+")}
    for method, opts in options.items():
        _expect(method in all_parts, f"{name}: [options.{method}]: {method!r} is not used by methods {methods}")
        _expect(isinstance(opts, dict), f"{name}: [options.{method}] must be a table")
        allowed = set(get_method(method).options)
        _check_keys(f"{name}: [options.{method}]", opts, allowed)
    grid = raw.get("grid", {})
    _expect(isinstance(grid, dict), f"{name}: [grid] must be a table of lists")
    for key, values in grid.items():
        _expect(isinstance(values, list) and values and len({_canonical(v) for v in values}) == len(values),
                f"{name}: [grid] {key!r} must be a non-empty list of distinct values, got {values!r}")
        if "." in key:
            method, opt = key.split(".", 1)
            _expect(method in all_parts, f"{name}: [grid] {key!r}: method {method!r} is not in methods {methods}")
            allowed = set(get_method(method).options)
            _expect(opt in allowed, f"{name}: [grid] {key!r}: {method} has no option {opt!r}; allowed: {sorted(allowed)}")
        else:
            _expect(key in RUN_KEYS, f"{name}: [grid] {key!r} is not a run field; allowed: {sorted(RUN_KEYS)} "
                    "or 'method.option'")
    quick = raw.get("quick", {})
    _expect(isinstance(quick, dict), f"{name}: [quick] must be a table")
    _check_keys(f"{name}: [quick]", quick, RUN_KEYS | {"seeds", "grid"})
    report = raw.get("report", {})
    _expect(isinstance(report, dict), f"{name}: [report] must be a table (kind = ...)")
    _check_keys(f"{name}: [report]", report, {"kind"})
    paper = raw.get("paper", {})
    _expect(isinstance(paper, dict), f"{name}: [paper] must be a table of group = figure")
    for key, ref in paper.items():
        if key == "metric":
            continue
        ok = isinstance(ref, (int, float)) and not isinstance(ref, bool) or isinstance(ref, list) and 1 <= len(ref) <= 2 \
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ref)
        _expect(ok, f"{name}: [paper] {key!r} must be a number or [mean, std] (the paper's figure in %), got {ref!r}")
    _expect(report.get("kind", "curves") in REPORT_KINDS,
            f"{name}: [report] kind must be one of {REPORT_KINDS}, got {report.get('kind')!r}")
    exp = Experiment(name=name, description=str(raw.get("description", "")), methods=list(methods),
                     baseline=baseline, seeds=seeds, run=dict(run), options=dict(options), grid=dict(grid),
                     paper=dict(raw.get("paper", {})), quick=dict(quick), report=dict(report),
                     reference=str(raw.get("reference", "")))
    try:
        runs = exp.runs()
    except (TypeError, ValueError) as e:
        raise SpecError(f"{name}: {e}") from None
    groups = list(dict.fromkeys(r.group for r in runs))
    unknown = [k for k in paper if k != "metric" and k not in groups]
    _expect(not (paper_groups and unknown), f"{name}: [paper] {unknown} name no group of runs; the groups are "
            f"{groups} (a method, followed by its grid values when there is a grid)")
    built: set[str] = set()
    for r in runs:
        c = r.config
        size = TRAIN_SIZES[c.dataset]
        _expect(c.batch_size <= size, f"{name}: {r.group}: batch_size {c.batch_size} exceeds the {size} "
                f"training examples of {c.dataset}")
        dry = min(c.batch_size, 1024)  # the runs' own batch (capped): top-k BN needs k values per channel
        key = json.dumps([c.model, c.model_options, c.method, c.method_options, dry], sort_keys=True, default=repr)
        if key in built:
            continue
        built.add(key)
        try:  # build it, and one forward pass and auxiliary loss on a batch of the runs' size
            with torch.random.fork_rng(devices=[]):
                handle = apply(models.build(c.model, norm="bn", **c.model_options), c.method, **c.method_options)
                handle.model(torch.zeros(dry, 1, 28, 28)).sum().add(handle.aux_loss())
                handle.remove()
        except (TypeError, ValueError, RuntimeError) as e:
            at = f"batch_size {c.batch_size}: " if c.batch_size < 2 else ""  # torch's batch-of-one refusals
            raise SpecError(f"{name}: {r.group}: {at}{e}") from None
    return exp


def override(exp: Experiment, *, seeds: int | None = None, methods: list[str] | None = None,
             quick: bool = False, **run: object) -> Experiment:
    """A copy of ``exp`` with command-line overrides (``None`` values are ignored)."""
    raw = {"description": exp.description, "reference": exp.reference, "methods": list(exp.methods),
           "baseline": exp.baseline, "seeds": list(exp.seeds), "run": dict(exp.run),
           "options": {k: dict(v) for k, v in exp.options.items()}, "grid": dict(exp.grid),
           "paper": exp.paper, "quick": exp.quick, "report": exp.report}
    if quick:
        q = dict(exp.quick)
        if "seeds" in q:
            raw["seeds"] = q.pop("seeds")
        if "grid" in q:
            raw["grid"] = q.pop("grid")
        raw["run"].update(q)
    if methods is not None:
        _expect(bool(methods), f"{exp.name}: --methods names no method; give e.g. none,std_loss")
        raw["methods"] = methods
        if raw["baseline"] not in methods:
            raw["baseline"] = methods[0]
        used = {p for m in methods for p in m.split("+")}
        raw["options"] = {k: v for k, v in raw["options"].items() if k in used}
        raw["grid"] = {k: v for k, v in raw["grid"].items() if "." not in k or k.split(".", 1)[0] in used}
    if seeds is not None:
        raw["seeds"] = seeds
    weight = run.pop("weight", None)
    if weight is not None:
        _expect(any("std_loss" in m.split("+") for m in raw["methods"]),
                f"{exp.name}: --weight sets the standardization-loss weight, but none of the methods "
                f"{raw['methods']} uses std_loss")
        raw["options"].setdefault("std_loss", {})["weight"] = weight
        raw["grid"].pop("std_loss.weight", None)
    for key, value in run.items():
        if value is not None:
            raw["run"][key] = value
            raw["grid"].pop(key, None)
    return validate(raw, exp.name, paper_groups=False)


def bundled() -> dict[str, str]:
    """The bundled experiments: name -> one-line description."""
    out = {}
    for f in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if f.name.endswith(".toml"):
            out[f.name[:-5]] = tomllib.loads(f.read_text()).get("description", "")
    return out


def load(name_or_path: str | Path) -> Experiment:
    """Load an experiment file by path, or a bundled experiment by name (see :func:`bundled`)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():  # a folder named like a bundled experiment is not one
        _expect(path.is_file(), f"experiment file {str(path)!r} does not exist")
        text, name = path.read_text(), path.stem
    else:
        res = resources.files(__package__) / f"{name_or_path}.toml"
        _expect(res.is_file(), f"unknown experiment {str(name_or_path)!r}; bundled: {', '.join(bundled())} "
                "(or give the path of a .toml file)")
        text, name = res.read_text(), str(name_or_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{name}: not valid TOML: {e}") from None
    return validate(raw, name)
