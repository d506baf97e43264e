import math

import pytest

from normlab.metrics import aggregate, best, mean_curve, speedup, speedup_curve, steps_to_target


def curve(points):
    return [{"step": s, "test_acc": a} for s, a in points]


BASE = curve([(0, 0.1), (100, 0.3), (200, 0.5), (300, 0.6), (400, 0.6)])
FAST = curve([(0, 0.1), (100, 0.6), (200, 0.7), (300, 0.8), (400, 0.85)])
SLOW = curve([(0, 0.1), (100, 0.2), (200, 0.25), (300, 0.3), (400, 0.35)])


def test_steps_to_target():
    assert steps_to_target(BASE, 0.5) == 200
    assert steps_to_target(BASE, 0.05) == 0
    assert steps_to_target(BASE, 0.61) is None


def test_speedup_headline_at_baseline_best():
    assert best(BASE) == 0.6
    assert speedup(BASE, FAST) == pytest.approx(300 / 100)
    assert speedup(BASE, SLOW) is None  # never reached: not a number
    assert speedup(BASE, FAST, target=0.3) == 1.0
    assert speedup(BASE, FAST, target=0.95) is None
    # already there at step 0: counted at its first evaluation (a lower bound), never infinite
    early = curve([(0, 0.7), (100, 0.7), (200, 0.8)])
    assert speedup(BASE, early) == 300 / 100
    assert speedup(curve([(0, 0.5)]), early) == 1.0


def test_speedup_curve_over_training():
    rows = speedup_curve(BASE, FAST)
    assert [r["baseline_step"] for r in rows] == [100, 200, 300]
    assert [r["method_step"] for r in rows] == [100, 100, 100]
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 3.0]
    rows = speedup_curve(BASE, SLOW)
    assert rows[0]["speedup"] == pytest.approx(100 / 300) and rows[1]["speedup"] is None and rows[1]["method_step"] is None
    # A baseline that first dips below its initial accuracy: those accuracies took it 0 steps, so no
    # rows for them, and every row agrees with speedup() at its target.
    dip = curve([(0, 0.10), (50, 0.08), (100, 0.09), (150, 0.30)])
    rows = speedup_curve(dip, FAST)
    assert [(r["baseline_step"], r["target"]) for r in rows] == [(150, 0.30)]
    assert all(r["speedup"] == speedup(dip, FAST, target=r["target"]) for r in rows)


def test_nan_values_are_skipped_and_empty_curves_are_errors():
    c = curve([(0, 0.1), (100, float("nan")), (200, 0.4)])
    assert steps_to_target(c, 0.3) == 200
    with pytest.raises(ValueError, match="no finite"):
        best(curve([(0, float("nan"))]))


def test_aggregate_mean_std_ci_and_missing():
    a = aggregate([1.0, 2.0, 3.0, None])
    assert a.n == 3 and a.missing == 1 and a.mean == 2.0 and a.std == 1.0
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2)
    assert a.ci_low == pytest.approx(2 - half) and a.ci_high == pytest.approx(2 + half)
    assert a.format(digits=2, unit="x") == "2.00 ± 1.00x (1/4 never reached)"
    none = aggregate([None, None])
    assert none.mean is None and none.format(unit="x") == "never reached"
    with pytest.raises(ValueError, match="confidence must be in"):
        aggregate([1.0, 2.0], confidence=1.5)
    single = aggregate([0.5])
    assert single.std is None and single.format(100) == "50.0"


def test_mean_curve():
    steps, mean, std = mean_curve([BASE, FAST], "test_acc")
    assert steps == [0, 100, 200, 300, 400]
    assert mean[1] == pytest.approx(0.45) and std[0] == 0.0
