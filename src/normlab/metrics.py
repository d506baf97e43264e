"""Measurements over recorded curves, apart from training, so any stored run can be re-analysed.

The speed-up of the standardization-loss paper (Collins et al. 2019, arXiv 1903.00925, section 4):
the number of steps the baseline needs to reach an accuracy divided by the number of steps the
method needs to reach the same accuracy,

    speedup(a) = steps_to_target(baseline, a) / steps_to_target(method, a),

quoted at the baseline's best accuracy (the headline) and plotted over the whole course of training
(one point per accuracy the baseline reaches). A target that is never reached gives ``None``,
never a number: "never reached" is a result, not an infinity or a zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["steps_to_target", "speedup", "speedup_curve", "best", "Aggregate", "aggregate", "mean_curve"]

Curve = Sequence[Mapping[str, float | int | None]]


def _points(curve: Curve, key: str) -> list[tuple[int, float]]:
    out = []
    for row in curve:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            out.append((int(row["step"]), float(value)))
    if not out:
        raise ValueError(f"curve has no finite {key!r} values; keys present: "
                         f"{sorted(curve[0]) if curve else 'none (empty curve)'}")
    return out


def steps_to_target(curve: Curve, target: float, key: str = "test_acc") -> int | None:
    """The first recorded step at which ``curve[key] >= target``; ``None`` if it never gets there.

    ``curve`` is a sequence of rows ``{"step": s, key: value, ...}`` in step order (as recorded by
    :func:`normlab.engine.train`). Resolution is the evaluation interval: the answer is the first
    evaluated step that reached the target.
    """
    for step, value in _points(curve, key):
        if value >= target:
            return step
    return None


def best(curve: Curve, key: str = "test_acc") -> float:
    """The highest finite ``curve[key]`` over the run."""
    return max(v for _, v in _points(curve, key))


def speedup(baseline: Curve, method: Curve, target: float | None = None, key: str = "test_acc") -> float | None:
    """``steps_to_target(baseline, a) / steps_to_target(method, a)`` at accuracy ``a``.

    ``a`` defaults to the baseline's best accuracy (the paper's headline). ``None`` when the method
    never reaches ``a`` (or the baseline does not); a value above 1 means the method is faster.
    A target reached at step 0 by both counts as a speed-up of 1, by the baseline alone as 0 (it
    needed no training, the method some); a method already at the target at
    step 0 while the baseline needs training counts as reaching it at its first evaluation after
    step 0 (a lower bound, the finest the curve can resolve).
    """
    a = best(baseline, key) if target is None else target
    b, m = steps_to_target(baseline, a, key), steps_to_target(method, a, key)
    return _ratio(b, m, method, key)


def _ratio(b: int | None, m: int | None, method: Curve, key: str) -> float | None:
    if b is None or m is None:
        return None
    if b == 0:
        return 1.0 if m == 0 else b / m
    if m == 0:
        m = min((s for s, _ in _points(method, key) if s > 0), default=1)
    return b / m


def speedup_curve(baseline: Curve, method: Curve, key: str = "test_acc") -> list[dict]:
    """The speed-up over the course of training: one row per distinct accuracy the baseline reaches.

    Rows ``{"baseline_step": s, "target": a, "method_step": m or None, "speedup": s/m or None}``
    for each evaluation step ``s > 0`` at which the baseline set a new best accuracy ``a``, above
    its value at step 0 too (an accuracy it had at initialization takes it 0 steps); the paper's
    Figures 5 and 6 plot speed-up against the baseline's steps.
    """
    rows, record = [], -math.inf
    for step, value in _points(baseline, key):
        if step == 0:
            record = max(record, value)
        if value <= record:
            continue
        record = value
        m = steps_to_target(method, value, key)
        rows.append({"baseline_step": step, "target": value, "method_step": m, "speedup": _ratio(step, m, method, key)})
    return rows


@dataclass(frozen=True)
class Aggregate:
    """Mean, sample standard deviation and two-sided 95% Student-t confidence interval of ``n`` values.

    ``missing`` counts the inputs that were ``None`` (e.g. "never reached"); they are excluded from
    the statistics and reported, never imputed.
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    missing: int = 0

    def format(self, scale: float = 1.0, digits: int = 1, missing: str = "never reached", unit: str = "") -> str:
        """``"mean ± std"`` (scaled, e.g. by 100 for percent), with the count of missing values
        (described by ``missing``) if any; ``unit`` follows the numbers."""
        if self.mean is None:
            return missing if self.missing else "n/a"
        text = f"{self.mean * scale:.{digits}f}"
        if self.std is not None:
            text += f" ± {self.std * scale:.{digits}f}"
        text += unit
        if self.missing:
            text += f" ({self.missing}/{self.n + self.missing} {missing})"
        return text


def aggregate(values: Iterable[float | None], confidence: float = 0.95) -> Aggregate:
    """Aggregate values over seeds: mean, std (ddof=1) and the t-interval ``mean ± t * std / sqrt(n)``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    vals = list(values)
    present = [float(v) for v in vals if v is not None]
    missing = len(vals) - len(present)
    n = len(present)
    if n == 0:
        return Aggregate(0, None, None, None, None, missing)
    mean = sum(present) / n
    if n == 1:
        return Aggregate(1, mean, None, None, None, missing)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1))
    from scipy.stats import t  # lazy: keeps `import normlab` light

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Aggregate(n, mean, std, mean - half, mean + half, missing)


def mean_curve(curves: Sequence[Curve], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std of ``key`` across runs, at the steps every run recorded."""
    if not curves:
        raise ValueError("mean_curve needs at least one curve")
    common = set.intersection(*({int(r["step"]) for r in c if r.get(key) is not None} for c in curves))
    steps = sorted(common)
    means, stds = [], []
    for s in steps:
        vals = [float(next(r[key] for r in c if int(r["step"]) == s)) for c in curves]
        m = sum(vals) / len(vals)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return steps, means, stds
