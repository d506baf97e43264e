import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import normlab
from normlab import cli
from normlab.experiments import SpecError, Store, build_report, bundled, load, override, run_experiment
from normlab.experiments.spec import validate

TINY = """
description = "tiny"
methods = ["none", "std_loss"]
seeds = 2
[run]
model = "mlp"
steps = {steps}
eval_every = {every}
lr = 0.01
[options.std_loss]
weight = 0.1
"""


def test_bundled_experiments_listed_and_valid():
    names = bundled()
    assert {"mnist-cnn", "mnist-mlp"} <= set(names)
    for name in names:
        exp = load(name)
        assert exp.runs() and exp.description


def test_mnist_cnn_defaults_are_the_papers_budget():
    exp = load("mnist-cnn")
    runs = exp.runs()
    assert len(runs) == 30 and exp.methods == ["none", "bn_shift", "std_loss"] and exp.baseline == "none"
    cfg = runs[0].config
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.momentum) == \
        (1000, 128, 1e-3, 4e-5, "sgd", 0.0)
    assert [r.config.method_options for r in runs if r.config.method == "std_loss"][0] == {"weight": 1.0}
    assert len({r.id for r in runs}) == 30


@pytest.mark.parametrize("raw,match", [
    ({"methods": ["none"], "colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"methods": []}, "non-empty list"),
    ({"methods": ["nonsense"]}, "unknown method 'nonsense'"),
    ({"methods": ["none"], "run": {"stpes": 3}}, r"\[run\]: unknown key\(s\) \['stpes'\]; allowed"),
    ({"methods": ["none"], "run": {"steps": 0}}, "steps must be a positive integer"),
    ({"methods": ["none"], "baseline": "bn"}, "'baseline' must be one of"),
    ({"methods": ["none"], "seeds": -1}, "'seeds' must be >= 1"),
    ({"methods": ["std_loss"], "options": {"std_loss": {"wieght": 1}}}, r"unknown key\(s\) \['wieght'\]"),
    ({"methods": ["std_loss"], "grid": {"std_loss.wieght": [1]}}, "has no option 'wieght'"),
    ({"methods": ["none"], "grid": {"lr": []}}, "non-empty list"),
    ({"methods": ["none"], "grid": {"colour": [1]}}, "not a run field"),
    ({"methods": ["none"], "run": {"optimizer": "lbfgs"}}, "optimizer must be one of"),
    ({"methods": ["std_loss"], "options": {"std_loss": {"weight": float("nan")}}},
     "std_loss: weight must be a finite number >= 0, got nan"),
    ({"methods": ["none", "std_loss"], "grid": {"std_loss.weight": [1.0, -1.0]}},
     "std_loss std_loss.weight=-1: weight must be a finite number >= 0, got -1.0"),
    ({"methods": ["none", "none"]}, "lists a method twice"),
    ({"methods": ["none"], "seeds": [0, 0]}, "distinct non-negative integers"),
    ({"methods": ["none"], "grid": {"lr": [0.1, 0.1]}}, "distinct values"),
    ({"methods": ["none"], "run": {"batch_size": 60001}}, "batch_size 60001 exceeds the 60000 training examples"),
    ({"methods": ["none", "bn"], "run": {"model": "mlp", "batch_size": 1}},
     "bn: batch_size 1: Expected more than 1 value per channel"),
    ({"methods": ["none"], "grid": {"lr": [0.1, 0.01]}, "paper": {"none": 24.6}},
     r"\[paper\] \['none'\] name no group of runs; the groups are \['none lr=0.1', 'none lr=0.01'\]"),
])
def test_validation_errors_name_the_key(raw, match):
    with pytest.raises(SpecError, match=match):
        validate(raw, "t")


def test_bad_toml_and_unknown_names(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("methods = [none")
    with pytest.raises(SpecError, match="not valid TOML"):
        load(bad)
    with pytest.raises(SpecError, match="unknown experiment 'nope'; bundled"):
        load("nope")


def test_grid_expands_method_options_only_for_their_method():
    exp = validate({"methods": ["none", "std_loss"], "seeds": [0, 1],
                    "grid": {"std_loss.weight": [0.1, 1.0], "lr": [0.01, 0.1]}}, "g")
    groups = sorted({r.group for r in exp.runs()})
    assert len(exp.runs()) == (2 + 4) * 2
    assert "std_loss lr=0.01 std_loss.weight=0.1" in groups and "none lr=0.1" in groups


def test_int_and_float_settings_give_one_run_id():
    ids = [[r.id for r in validate({"methods": ["none"], "seeds": 1, "run": {"lr": lr, "momentum": mo,
                                                                            "weight_decay": wd}}, "e").runs()]
           for lr, mo, wd in ((1, 0, 0), (1.0, 0.0, 0.0))]
    assert ids[0] == ids[1]
    assert ids[0] != validate({"methods": ["none"], "seeds": 1, "run": {"lr": 2}}, "e").runs()[0].id


def test_override_quick_and_cli_options():
    exp = override(load("mnist-cnn"), quick=True)
    assert len(exp.seeds) == 2 and exp.run["steps"] == 200
    exp = override(load("mnist-cnn"), seeds=3, steps=50, weight=0.5, methods=["none", "std_loss"])
    assert len(exp.runs()) == 6 and exp.options["std_loss"]["weight"] == 0.5


def test_bad_option_value_stops_before_any_run():
    with pytest.raises(SpecError, match="mnist-cnn: std_loss: weight must be a finite number"):
        override(load("mnist-cnn"), weight=float("nan"))


def test_weight_override_without_std_loss_names_the_option():
    with pytest.raises(SpecError, match="--weight sets the standardization-loss weight, but none of the methods"):
        override(load("mnist-cnn"), methods=["none", "bn"], weight=0.5)


def test_bad_worker_count(tmp_path, capsys):
    exp = validate({"methods": ["none"], "seeds": 1, "run": {"model": "mlp", "steps": 2}}, "w")
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        run_experiment(exp, tmp_path, workers=-1, progress=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "mnist-cnn", "--workers", "-1"])
    assert e.value.code == 2 and "argument --workers: must be an integer >= 0" in capsys.readouterr().err
    for argv, says in ((["--workers", "abc"], "argument --workers: must be an integer >= 0 (0 runs everything in "
                        "this process), got 'abc'"), (["--steps", "0"], "argument --steps: must be an integer >= 1"),
                       (["--batch-size", "1.5"], "argument --batch-size: must be an integer >= 1, got '1.5'")):
        with pytest.raises(SystemExit) as e:
            cli.main(["reproduce", "mnist-cnn"] + argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_tensorboard_export_without_tensorboard_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import builtins

    exp = validate({"methods": ["none"], "seeds": 1, "run": {"model": "mlp", "steps": 2, "eval_every": 1}}, "tb")
    run_experiment(exp, tmp_path, workers=0, progress=False)
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert cli.main(["report", str(tmp_path), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard: TensorBoard export needs the tensorboard package" in err


def test_paper_figures_of_groups_an_override_drops_are_not_an_error():
    exp = validate({"methods": ["none", "std_loss"], "grid": {"lr": [0.1, 0.01]},
                    "paper": {"none lr=0.1": 24.6, "std_loss lr=0.01": [75.2, 2.6]}}, "p")
    assert {r.group for r in override(exp, methods=["none"], lr=0.1).runs()} == {"none"}


def test_methods_command_lists_the_registry(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(normlab.list_methods())


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    spec, taken = _write_tiny(tmp_path, steps=2, every=1), tmp_path / "taken"
    taken.write_text("not a folder")
    for out, says in ((taken, "is a file, not a folder"), (taken / "sub", "cannot be created")):
        assert cli.main(["run", str(spec), "--out", str(out), "--workers", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} {says}" in err and "Traceback" not in err
    assert taken.read_text() == "not a folder"


def test_cli_exits_nonzero_when_runs_fail_and_a_rerun_retries_them(tmp_path, monkeypatch, capsys):
    from normlab import engine

    real = engine.train

    def flaky(cfg, *args, **kwargs):
        if cfg.method == "std_loss" and cfg.seed == 1:
            raise RuntimeError("boom")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(engine, "train", flaky)
    spec, out = _write_tiny(tmp_path, steps=20, every=10), tmp_path / "out"
    argv = ["run", str(spec), "--out", str(out), "--workers", "0", "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "1 of 4 runs failed" in err
    assert (out / "report.md").exists()
    monkeypatch.setattr(engine, "train", real)
    assert cli.main(argv) == 0
    with Store(out) as store:
        assert len(store.done_ids()) == 4


def _write_tiny(tmp_path, steps=40, every=10):
    f = tmp_path / "tiny.toml"
    f.write_text(TINY.format(steps=steps, every=every))
    return f


def _add_many(folder, k):
    store = Store(folder)
    for i in range(20):
        store.add(f"{k}-{i}", "e", "g", {"config": {"method": "none", "seed": i}, "curve": [{"step": 0}],
                                         "diverged_at": None, "wall_s": 0.1, "final": {"test_acc": 0.5}})
    store.close()


def test_concurrent_writers(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(tmp_path, k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store(tmp_path) as store:
        assert len(store.runs()) == 80 and len(store.done_ids()) == 80
        n = store.to_csv(tmp_path / "runs.csv")
    lines = (tmp_path / "runs.csv").read_text().splitlines()
    assert n == 80 and len(lines) == 81 and lines[0].startswith("id,experiment,grp,method,seed,status")


def test_in_process_sweep_records_divergence_and_reports(tmp_path):
    exp = validate({"methods": ["none"], "seeds": 1, "run": {"model": "mlp", "steps": 30, "eval_every": 10},
                    "grid": {"lr": [0.01, 1e5]}}, "div")
    store = run_experiment(exp, tmp_path, workers=0, progress=False)
    runs = {r["grp"]: r for r in store.runs()}
    assert runs["none lr=100000"]["status"] == "diverged" and runs["none lr=100000"]["diverged_at"] >= 1
    assert runs["none lr=0.01"]["status"] == "done"
    store.close()
    build_report(tmp_path, echo=False)
    text = (tmp_path / "report.md").read_text()
    assert "| none lr=100000 | 1 | diverged |" in text
    assert (tmp_path / "sweep_lr.png").stat().st_size > 1000  # a diverged point is marked, not plotted as a value
    assert "every 10 steps" in text and "lower bound" in text
    # a second start repeats nothing
    again = run_experiment(exp, tmp_path, workers=0, progress=False)
    assert len(again.runs()) == 2


@pytest.mark.slow
def test_end_to_end_reproduction_writes_a_well_formed_report(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["reproduce", "mnist-cnn", "--seeds", "2", "--steps", "200", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| none | 2 |" in printed and "24.6 ± 6.5" in printed
    report = (out / "report.md").read_text()
    for needle in ("| bn_shift | 2 |", "| std_loss | 2 |", "speed-up", "test_acc.png", "train_loss.png",
                   "Against the paper"):
        assert needle in report
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 6 and {r["config"]["method"] for r in runs} == {"none", "bn_shift", "std_loss"}
    assert all(r["curve"][-1]["step"] == 200 for r in runs)
    import matplotlib.image

    for png in ("test_acc.png", "train_loss.png", "speedup.png"):
        assert matplotlib.image.imread(out / png).shape[0] > 100


def _finished(folder):
    db = Path(folder) / "runs.db"
    if not db.exists():
        return 0
    with Store(folder) as s:
        return len(s.runs())


@pytest.mark.slow
def test_sigkill_and_resume_loses_and_repeats_nothing(tmp_path):
    spec = _write_tiny(tmp_path, steps=300, every=20)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cmd = [sys.executable, "-m", "normlab.cli", "run", str(spec), "--workers", "2", "--no-progress", "--out"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cmd + [str(clean)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ckpts = list((killed / "checkpoints").glob("*.pt")) if (killed / "checkpoints").exists() else []
        if _finished(killed) >= 1 and ckpts:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished(killed)
    assert before < 4, "the sweep finished before it could be killed; make it longer"
    subprocess.run(cmd + [str(killed)], check=True, env=env, capture_output=True)
    with Store(clean) as a, Store(killed) as b:
        ra, rb = a.runs(), b.runs()
    assert len(rb) == 4 and sorted(r["id"] for r in ra) == sorted(r["id"] for r in rb)
    for x, y in zip(sorted(ra, key=lambda r: r["id"]), sorted(rb, key=lambda r: r["id"])):
        assert x["curve"] == y["curve"] and x["final_test_acc"] == y["final_test_acc"]
    assert not list((killed / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("kind,png", [("distributions", "distributions.png"), ("loss-vs-accuracy", "loss_vs_accuracy.png"),
                                      ("lr-sweep", "sweep_lr.png")])
def test_report_kinds_write_their_plots(tmp_path, kind, png):
    raw = {"methods": ["none", "std_loss"], "seeds": 2, "report": {"kind": kind},
           "run": {"model": "mlp", "steps": 20, "eval_every": 10, "percentiles": [5, 50, 95]}}
    if kind == "lr-sweep":
        raw["grid"] = {"lr": [0.001, 0.01]}
    run_experiment(validate(raw, kind), tmp_path, workers=0, progress=False).close()
    build_report(tmp_path, echo=False)
    assert (tmp_path / png).stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    assert png in text
    if kind == "lr-sweep":
        assert "at its own best learning rate" in text
        assert "| std_loss | 0.001 |" in text or "| std_loss | 0.01 |" in text
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert all(len(row["preact"]) == 3 for r in runs for row in r["curve"])


def test_tensorboard_export(tmp_path):
    exp = validate({"methods": ["none"], "seeds": 1, "run": {"model": "mlp", "steps": 10, "eval_every": 5}}, "tb")
    run_experiment(exp, tmp_path, workers=0, progress=False).close()
    assert cli.main(["report", str(tmp_path), "--tensorboard"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "none" / "seed0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test_acc")] == [0, 5, 10]
    assert cli.main(["report", str(tmp_path), "--tensorboard"]) == 0  # again: replaces, not adds
    assert len(list((tmp_path / "tensorboard" / "none" / "seed0").glob("events.out.tfevents.*"))) == 1


def test_diverged_runs_have_no_speedup():
    from normlab.experiments.report import _paired_speedup

    def run(seed, status, accs):
        return {"seed": seed, "status": status, "curve": [{"step": 100 * i, "test_acc": a} for i, a in enumerate(accs)]}

    base = [run(0, "done", [0.1, 0.5, 0.9]), run(1, "done", [0.1, 0.5, 0.9])]
    # seed 1 diverged after reaching the target by chance: it must not count as a speed-up
    method = [run(0, "done", [0.1, 0.9, 0.9]), run(1, "diverged", [0.95])]
    agg = _paired_speedup(base, method)
    assert agg.n == 1 and agg.mean == 2.0
    assert _paired_speedup(base, [run(0, "diverged", [0.95])]).format(unit="x") == "n/a"


def test_plots_leave_diverged_runs_out_of_means(tmp_path, monkeypatch):
    # One diverged seed must neither cut a group's mean curve short nor pull a level line down.
    import matplotlib.axes

    from normlab import metrics
    from normlab.experiments import report

    def run(seed, status, accs, weight=None):
        return {"seed": seed, "status": status, "method": "std_loss" if weight else "none", "grp": "g",
                "final_test_acc": accs[-1], "curve": [{"step": 100 * i, "test_acc": a} for i, a in enumerate(accs)],
                "config": {"method": "std_loss" if weight else "none",
                           "method_options": {"weight": weight} if weight else {}}}

    runs = [run(0, "done", [0.1, 0.5, 0.9]), run(1, "done", [0.1, 0.5, 0.9]), run(2, "diverged", [0.1])]
    seen, real = [], metrics.mean_curve
    monkeypatch.setattr(metrics, "mean_curve", lambda curves, key: seen.append(real(curves, key)) or seen[-1])
    report._plot_curves({"g": runs}, "test_acc", "acc", tmp_path / "acc.png")
    assert seen[-1][0] == [0, 100, 200] and (tmp_path / "acc.png").exists()
    assert report._label("g", runs) == "g (n=2; 1 diverged, not shown)"
    assert report._label("g", runs[2:]) == "g (all 1 diverged)" and report._plotted(runs[2:]) == runs[2:]

    levels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, *a, **k: levels.append(y))
    sweep_runs = [run(0, "done", [0.1, 0.9]), run(1, "diverged", [0.1]), run(0, "done", [0.1, 0.5], weight=1.0)]
    report._plot_sweep({"grid": {"std_loss.weight": [1.0]}, "methods": ["none", "std_loss"]}, sweep_runs, tmp_path)
    assert levels == [pytest.approx(90.0)]


def test_reusing_a_folder_reports_only_the_last_experiment(tmp_path, monkeypatch, capsys):
    # The second command (other settings, same folder) must not average the first one's runs in; a
    # folder named like the bundled experiment is not mistaken for an experiment file.
    monkeypatch.chdir(tmp_path)
    base = ["reproduce", "mnist-mlp", "--methods", "none", "--seeds", "1", "--workers", "0", "--no-progress",
            "--out", "mnist-mlp"]
    assert cli.main(base + ["--steps", "4"]) == 0
    assert cli.main(base + ["--steps", "6"]) == 0
    text = (tmp_path / "mnist-mlp" / "report.md").read_text()
    assert "| none | 1 |" in text and "6 steps" in text and "1 older run(s) in this folder" in text
    assert len(json.loads((tmp_path / "mnist-mlp" / "runs.json").read_text())) == 1
    capsys.readouterr()
    assert cli.main(["results", "mnist-mlp"]) == 0  # like the report: the last experiment's runs
    out = capsys.readouterr().out
    assert "1 runs; 1 older run(s) from other settings not shown (--all shows them)" in out
    assert cli.main(["results", "mnist-mlp", "--all"]) == 0
    assert "2 runs\n" in capsys.readouterr().out
    assert cli.main(["results", "mnist-mlp", "--csv", "runs.csv"]) == 0
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 2  # header + the current run


def test_in_process_runs_use_the_workers_thread_count(tmp_path, monkeypatch):
    from normlab import engine

    seen, real = [], engine.train
    monkeypatch.setattr(engine, "train", lambda cfg, *a, **k: seen.append(torch.get_num_threads()) or real(cfg, *a, **k))
    torch.set_num_threads(2)
    exp = validate({"methods": ["none"], "seeds": 1, "run": {"model": "mlp", "steps": 2}}, "t")
    run_experiment(exp, tmp_path, workers=0, progress=False).close()
    assert seen == [1] and torch.get_num_threads() == 2


def test_every_run_failing_prints_the_summary_not_a_traceback(tmp_path, monkeypatch, capsys):
    from normlab import engine

    def boom(cfg, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "train", boom)
    spec = _write_tiny(tmp_path, steps=2, every=1)
    assert cli.main(["run", str(spec), "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 1
    assert "4 of 4 runs failed" in capsys.readouterr().err


def test_validation_accepts_top_k_batch_norm_at_the_runs_batch_size():
    # The dry forward of validate runs at the runs' batch size: top-k BN needs k values per channel.
    validate({"methods": ["none", "topkbn"], "run": {"model": "mlp", "batch_size": 128}}, "t")
    with pytest.raises(SpecError, match="k=10 needs at least k values per channel, got 8"):
        validate({"methods": ["none", "topkbn"], "run": {"model": "mlp", "batch_size": 8}}, "t")


def test_report_survives_a_group_that_diverged_at_step_0(tmp_path, monkeypatch):
    # engine.train ends a run whose test loss is already NaN at step 0 with an empty curve.
    from normlab import engine

    real = engine.train

    def nan_at_start(cfg, *args, **kwargs):
        if cfg.method == "bn":
            return engine.RunResult(cfg.to_dict(), [], 0, 0.0, engine.environment())
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(engine, "train", nan_at_start)
    exp = validate({"methods": ["none", "bn"], "seeds": 2, "run": {"model": "mlp", "steps": 4, "eval_every": 2}}, "t")
    run_experiment(exp, tmp_path, workers=0, progress=False).close()
    build_report(tmp_path)
    assert "| bn | 2 | diverged |" in (tmp_path / "report.md").read_text()



def test_int_and_float_method_options_are_one_setting():
    def ids(weight):
        return [r.id for r in validate({"methods": ["std_loss"], "seeds": 1,
                                        "options": {"std_loss": {"weight": weight}}}, "e").runs()]
    assert ids(1) == ids(1.0)
    with pytest.raises(SpecError, match="distinct values"):
        validate({"methods": ["std_loss"], "grid": {"std_loss.weight": [1, 1.0]}}, "e")
    k = validate({"methods": ["topkbn"], "seeds": 1, "options": {"topkbn": {"k": 3}}}, "e").runs()[0]
    assert k.config.method_options == {"k": 3}  # an int option stays an int


@pytest.mark.parametrize("raw, match", [
    ({"paper": {"none": "x"}}, "'none' must be a number or"),
    ({"paper": 3}, r"\[paper\] must be a table"),
    ({"report": 3}, r"\[report\] must be a table"),
    ({"run": {"percentiles": 5}}, "percentiles must be numbers"),
])
def test_bad_paper_report_and_percentiles_stop_before_any_run(raw, match):
    with pytest.raises(SpecError, match=match):
        validate({"methods": ["none"], **raw}, "e")


def test_results_folders_that_cannot_be_read_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "runs.db").write_text("not a database")
    assert cli.main(["report", str(tmp_path / "bad")]) == 2
    assert "is not a normlab results database" in capsys.readouterr().err
    empty = tmp_path / "empty"
    Store(empty).set_meta("run_ids", ["x"])
    assert cli.main(["report", str(empty)]) == 2
    assert "holds no finished runs" in capsys.readouterr().err
    assert cli.main(["results", str(empty), "--csv", str(tmp_path)]) == 2
    assert "--csv" in capsys.readouterr().err
    assert cli.main(["reproduce"]) == 2
    assert "needs the name of a bundled experiment" in capsys.readouterr().err


def test_report_of_an_incomplete_sweep_says_what_is_missing_and_keeps_ci_in_range(tmp_path):
    exp = validate({"methods": ["none"], "seeds": 2, "run": {"model": "mlp", "steps": 10, "eval_every": 5}}, "part")
    run_experiment(exp, tmp_path, workers=0, progress=False).close()
    with Store(tmp_path) as store:
        store.set_meta("run_ids", [r.id for r in exp.runs()] + ["never-run"])
    build_report(tmp_path, echo=False)
    text = (tmp_path / "report.md").read_text()
    assert "**1 of 3 planned runs are missing**" in text
    ci = text.split("| none | 2 |")[1].split("|")[1].strip()
    low, high = (float(v) for v in ci.strip("[]").split(","))
    assert 0.0 <= low <= high <= 100.0


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_with_workers_exits_130_without_a_traceback(tmp_path):
    # Runs far longer than the test. The child gets SIGINT's default action back: a shell without job
    # control starts a background job (CI in the background) with SIGINT ignored, which is inherited.
    spec = _write_tiny(tmp_path, steps=10_000_000, every=500)
    proc = subprocess.Popen([sys.executable, "-m", "normlab.cli", "run", str(spec), "--workers", "2", "--no-progress",
                             "--out", str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list((tmp_path / "out" / "checkpoints").glob("*.pt")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"interrupted" in err


def test_sweep_plots_hold_the_other_swept_values_fixed(tmp_path, monkeypatch):
    from normlab.experiments import report

    exp = validate({"methods": ["none", "std_loss"], "seeds": 1, "run": {"model": "mlp", "steps": 4, "eval_every": 2},
                    "grid": {"lr": [0.01, 0.1], "std_loss.weight": [0.1, 1.0]}}, "two-axes")
    run_experiment(exp, tmp_path, workers=0, progress=False).close()
    lines = []
    monkeypatch.setattr(report, "_plot_sweep_line", lambda ax, key, label, mine: lines.append((key, label, mine)))
    build_report(tmp_path, echo=False)
    by_weight = {label: mine for key, label, mine in lines if key == "std_loss.weight"}
    assert sorted(by_weight) == ["none (lr=0.01)", "none (lr=0.1)", "std_loss (lr=0.01)", "std_loss (lr=0.1)"]
    for label, mine in by_weight.items():
        assert {r["config"]["lr"] for r in mine} == {float(label.split("lr=")[1].rstrip(")"))}
    assert len(by_weight["std_loss (lr=0.1)"]) == 2  # one run at each weight
