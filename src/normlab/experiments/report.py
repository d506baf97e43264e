"""Reports rebuilt from a results store alone: a markdown table, JSON of every run, PNG plots.

For each group of runs (a method, with its swept values) over seeds: final test accuracy as
mean ± std with a 95% t-interval, the paper's figure beside ours where the experiment names one,
and the speed-up against the baseline as the paper defines it (:mod:`normlab.metrics`): per seed,
steps the baseline needs to reach its best accuracy / steps the method needs, aggregated over the
seeds, "never reached" counted and never turned into a number. Plots: training loss and test
accuracy against steps (mean with a ±1 std band over seeds, one colour per group; the paper's
Figure 1), the speed-up over the course of training (Figures 5 and 6), and for grids the final
accuracy against each swept value.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .. import metrics
from .store import Store, StoreError

__all__ = ["build_report", "summarize", "export_tensorboard"]


def _groups(runs: list[dict], methods: list[str] | None = None) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["grp"]].append(r)
    order = {m: i for i, m in enumerate(methods or [])}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[1][0]["method"], len(order)),
                                                       _sort_key(kv[1][0]["config"]))))


def _sort_key(cfg: dict) -> tuple:
    return (cfg["lr"], cfg["batch_size"], sorted((k, 0, v) if isinstance(v, (int, float)) else (k, 1, str(v))
                                                 for k, v in cfg["method_options"].items()))


def _baseline_group(group: str, runs: list[dict], groups: dict[str, list[dict]], baseline: str | None) -> str | None:
    """The baseline's group with the same swept run fields (lr, batch size, ...) as ``group``."""
    if baseline is None:
        return None
    cfg = runs[0]["config"]
    for name, rs in groups.items():
        other = rs[0]["config"]
        if other["method"] == baseline and all(
                other[k] == cfg[k] for k in cfg if k not in ("method", "method_options", "seed")):
            return name
    return None


def _paired_speedup(base_runs: list[dict], runs: list[dict]) -> metrics.Aggregate:
    """Speed-up of ``runs`` over ``base_runs``, paired by seed. A diverged run has no speed-up (its
    curve stops at the last finite values): only seeds where both runs finished are compared."""
    by_seed = {r["seed"]: r["curve"] for r in base_runs if r["status"] == "done"}
    return metrics.aggregate(metrics.speedup(by_seed[r["seed"]], r["curve"]) for r in runs
                             if r["seed"] in by_seed and r["status"] == "done")


def summarize(store: Store) -> list[dict]:
    """One row per group: counts, final accuracy aggregate, paper figure, speed-up aggregate."""
    exp = store.meta("experiment", {}) or {}
    baseline = exp.get("baseline")
    paper = exp.get("paper", {})
    groups = _groups(store.runs(current=True), exp.get("methods"))
    rows = []
    for name, runs in groups.items():
        method = runs[0]["method"]
        finals = [r["final_test_acc"] if r["status"] == "done" else None for r in runs]
        base = _baseline_group(name, runs, groups, baseline)
        speed = None
        if base is not None and base != name:
            speed = _paired_speedup(groups[base], runs)
        ref = paper.get(name)
        rows.append({"group": name, "method": method, "n": len(runs),
                     "diverged": sum(r["status"] == "diverged" for r in runs),
                     "final": metrics.aggregate(finals), "paper": ref, "baseline": base, "speedup": speed,
                     "wall_s": sum(r["wall_s"] or 0 for r in runs)})
    return rows


def _fmt_paper(ref) -> str:
    if ref is None:
        return "-"
    if isinstance(ref, (int, float)):
        return f"{ref:.1f}"
    return f"{ref[0]:.1f} ± {ref[1]:.1f}" if len(ref) > 1 and ref[1] else f"{ref[0]:.1f}"


def table(rows: list[dict]) -> str:
    """The summary as a markdown table (accuracies in %)."""
    lines = ["| group | runs | final test acc % (mean ± std) | 95% CI | paper | speed-up vs baseline |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        f = r["final"]
        # An accuracy lies in [0, 100] %: the t-interval is cut there (2 seeds give wide intervals).
        ci = (f"[{max(f.ci_low, 0.0) * 100:.1f}, {min(f.ci_high, 1.0) * 100:.1f}]" if f.ci_low is not None
              else "-")
        if r["speedup"] is None:
            sp = "(baseline)" if r["baseline"] == r["group"] else "-"
        else:
            sp = r["speedup"].format(digits=2, unit="x")
            if r["speedup"].n + r["speedup"].missing == 0 and r["diverged"]:
                sp = "diverged"
        runs = str(r["n"])
        lines.append(f"| {r['group']} | {runs} | {f.format(100, missing='diverged')} | {ci} | {_fmt_paper(r['paper'])} | {sp} |")
    return "\n".join(lines)


def _comparison(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        ref, f = r["paper"], r["final"]
        if ref is None or f.mean is None:
            continue
        mean = ref if isinstance(ref, (int, float)) else ref[0]
        diff = f.mean * 100 - mean
        within = ""
        if f.std:
            within = f" ({abs(diff) / (f.std * 100):.1f} of our standard deviations)"
        out.append(f"- **{r['group']}**: ours {f.mean * 100:.1f}% vs the paper's {mean:.1f}%: "
                   f"{diff:+.1f} points{within}.")
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plotted(runs: list[dict]) -> list[dict]:
    """The runs a group's mean curve is drawn from: those that finished. A diverged run's curve stops
    early, and the mean over seeds exists only at the steps every run recorded, so one diverged
    seed would cut the whole group's curve short; where every run diverged, all of them (the mean
    then ends at the first divergence)."""
    return [r for r in runs if r["status"] == "done"] or runs


def _label(name: str, runs: list[dict]) -> str:
    diverged = sum(r["status"] == "diverged" for r in runs)
    done = len(runs) - diverged
    if not diverged:
        return f"{name} (n={len(runs)})"
    return f"{name} (all {diverged} diverged)" if not done else f"{name} (n={done}; {diverged} diverged, not shown)"


def _plot_curves(groups: dict[str, list[dict]], key: str, ylabel: str, path: Path, scale: float = 1.0) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in groups.items():
        steps, mean, std = metrics.mean_curve([r["curve"] for r in _plotted(runs)], key)
        mean = [m * scale for m in mean]
        std = [s * scale for s in std]
        line, = ax.plot(steps, mean, label=_label(name, runs))
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_speedup(groups: dict[str, list[dict]], rows: list[dict], path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for r in rows:
        if r["speedup"] is None or r["speedup"].n == 0:
            continue
        base = groups[r["baseline"]]
        bs, bm, _ = metrics.mean_curve([x["curve"] for x in _plotted(base)], "test_acc")
        ms, mm, _ = metrics.mean_curve([x["curve"] for x in _plotted(groups[r["group"]])], "test_acc")
        if not bs or not ms:  # a group that diverged at step 0 has no curve
            continue
        curve = metrics.speedup_curve([{"step": s, "test_acc": v} for s, v in zip(bs, bm)],
                                      [{"step": s, "test_acc": v} for s, v in zip(ms, mm)])
        pts = [(c["baseline_step"], c["speedup"]) for c in curve if c["speedup"] is not None and math.isfinite(c["speedup"])]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=r["group"])
            drawn = True
    if drawn:
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("baseline training step")
        ax.set_ylabel("speed-up (baseline steps / method steps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _swept(run: dict, key: str):
    cfg = run["config"]
    if "." in key:
        part, opt = key.split(".", 1)
        opts = cfg["method_options"]
        return opts.get(key, opts.get(opt)) if part in cfg["method"].split("+") else None
    return cfg[key]


def _plot_sweep(exp: dict, runs: list[dict], folder: Path) -> list[str]:
    """Final test accuracy against each swept value, one line per method (mean ± std over the seeds
    that finished) and, when several values are swept, per setting of the others (each point holds
    them fixed); diverged runs are marked as such on the bottom edge."""
    plt = _plt()
    out = []
    for key in exp.get("grid", {}):
        others = [k for k in exp["grid"] if k != key]
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in exp["methods"]:
            settings: dict[tuple, list[dict]] = {}
            for r in runs:
                if r["method"] == method:
                    settings.setdefault(tuple(_swept(r, o) for o in others), []).append(r)
            for setting, mine in sorted(settings.items(), key=lambda kv: str(kv[0])):
                fixed = ", ".join(f"{o}={v:g}" if isinstance(v, float) else f"{o}={v}"
                                  for o, v in zip(others, setting) if v is not None)
                label = f"{method} ({fixed})" if fixed else method
                _plot_sweep_line(ax, key, label, mine)
        numeric = all(isinstance(v, (int, float)) for v in exp["grid"][key])
        if numeric and min(exp["grid"][key]) > 0 and max(exp["grid"][key]) / min(exp["grid"][key]) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"sweep_{key.replace('.', '_')}.png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        out.append(name)
    return out


def _plot_sweep_line(ax, key: str, label: str, mine: list[dict]) -> None:
    # One line of a sweep plot: the runs `mine` of one method at one setting of the other swept values.
    values = sorted({_swept(r, key) for r in mine}, key=lambda v: (v is None, v))
    if values == [None]:  # not swept for this method: its level as a line
        agg = metrics.aggregate(r["final_test_acc"] if r["status"] == "done" else None for r in mine)
        if agg.mean is not None:
            ax.axhline(agg.mean * 100, linestyle="--", color="grey", label=f"{label} (not swept)")
        return
    pts = [(v, metrics.aggregate(r["final_test_acc"] if r["status"] == "done" else None
                                 for r in mine if _swept(r, key) == v)) for v in values]
    color = None
    done = [(v, a) for v, a in pts if a.mean is not None]
    if done:
        line = ax.errorbar([v for v, _ in done], [a.mean * 100 for _, a in done],
                           yerr=[(a.std or 0) * 100 for _, a in done], marker="o", capsize=3, label=label)
        color = line.lines[0].get_color()
    # Diverged runs have no final accuracy: an x on the bottom edge, never a made-up value.
    for v, a in pts:
        if a.missing:
            ax.plot([v], [0.03], marker="x", markersize=9, color=color, transform=ax.get_xaxis_transform(),
                    clip_on=False, label=None if done else label)
            ax.annotate(f"{a.missing}/{a.n + a.missing} diverged", (v, 0.03), xycoords=ax.get_xaxis_transform(),
                        textcoords="offset points", xytext=(0, 8), ha="center", va="bottom", rotation=90,
                        fontsize=7, color=color)


def _best_lr_table(exp: dict, groups: dict[str, list[dict]]) -> list[str]:
    """Each method at its best learning rate, and speed-ups against the baseline at *its* best."""
    best: dict[str, tuple[str, metrics.Aggregate]] = {}
    for name, runs in groups.items():
        agg = metrics.aggregate(r["final_test_acc"] if r["status"] == "done" else None for r in runs)
        method = runs[0]["method"]
        if agg.mean is not None and agg.missing == 0 and (method not in best or agg.mean > best[method][1].mean):
            best[method] = (name, agg)
    base = exp.get("baseline")
    if base not in best:
        return ["The baseline did not finish at any learning rate without diverging."]
    base_group = best[base][0]
    lines = ["| method | best lr | final test acc % | speed-up vs baseline at its best lr | "
             "speed-up vs baseline at the same lr |", "| --- | ---: | ---: | ---: | ---: |"]
    for method in exp["methods"]:
        if method not in best:
            lines.append(f"| {method} | - | diverged or incomplete at every lr | - | - |")
            continue
        name, agg = best[method]
        lr = groups[name][0]["config"]["lr"]
        sp = _paired_speedup(groups[base_group], groups[name])
        same = _baseline_group(name, groups[name], groups, base)
        sp_same = "-" if same is None else _paired_speedup(groups[same], groups[name]).format(digits=2, unit="x")
        lines.append(f"| {method} | {lr:g} | {agg.format(100)} | {sp.format(digits=2, unit='x')} | {sp_same} |")
    return lines


def _plot_loss_vs_accuracy(groups: dict[str, list[dict]], path: Path) -> None:
    """Test accuracy against cross entropy (training and test), seed means: the paper's Figure 2 (top)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, runs in groups.items():
        curves = [r["curve"] for r in _plotted(runs)]
        for ax, key in zip(axes, ("loss", "test_loss")):
            steps, loss, _ = metrics.mean_curve(curves, key)
            steps_acc, acc, _ = metrics.mean_curve(curves, "test_acc")
            acc_at = dict(zip(steps_acc, acc))
            ax.plot(loss, [acc_at[s] * 100 for s in steps], marker=".", label=name)
    axes[0].set_xlabel("training cross entropy (mean over the steps before each evaluation)")
    axes[1].set_xlabel("test cross entropy")
    axes[0].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_distributions(groups: dict[str, list[dict]], path: Path) -> bool:
    """Percentiles of the last hidden pre-activation against steps, one panel per group (Figure 4)."""
    plt = _plt()
    runs = [rs[0] for rs in groups.values() if rs[0]["config"].get("percentiles")]
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.5), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        qs = run["config"]["percentiles"]
        rows = [r for r in run["curve"] if r.get("preact")]
        steps = [r["step"] for r in rows]
        for i, q in enumerate(qs):
            ax.plot(steps, [r["preact"][i] for r in rows], color=plt.cm.viridis(i / max(1, len(qs) - 1)),
                    label=f"p{q:g}")
        ax.set_title(run["grp"])
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("last hidden pre-activation")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_report(folder: str | Path, *, echo: bool = True) -> Path:
    """Write ``report.md``, ``runs.json`` and the PNG plots into ``folder`` from its store."""
    folder = Path(folder)
    if not (folder / "runs.db").exists():
        raise FileNotFoundError(f"{folder} has no runs.db: run an experiment into it first (normlab run FILE --out {folder})")
    store = Store(folder)
    runs = store.runs(current=True)
    if not runs:
        store.close()
        raise StoreError(f"{folder}/runs.db holds no finished runs of its last experiment yet: run it (or run it "
                         "again: stored runs are kept) before asking for a report")
    others = len(store.runs()) - len(runs)
    planned = store.meta("run_ids", None)
    missing = len(set(planned) - {r["id"] for r in runs}) if planned else 0
    incomplete = (f"**{missing} of {len(planned)} planned runs are missing** (failed, or the sweep was stopped): "
                  "this report covers the others; run the same command again to complete it.") if missing else ""
    exp = store.meta("experiment", {}) or {}
    rows = summarize(store)
    groups = _groups(runs, exp.get("methods"))
    with open(folder / "runs.json", "w") as f:
        json.dump([{k: r[k] for k in ("id", "grp", "status", "diverged_at", "wall_s", "config", "env", "curve")}
                   for r in runs], f, indent=1)
    _plot_curves(groups, "test_acc", "test accuracy (%)", folder / "test_acc.png", scale=100)
    _plot_curves(groups, "loss", "training loss (cross entropy)", folder / "train_loss.png")
    has_speed = _plot_speedup(groups, rows, folder / "speedup.png")
    cfg = runs[0]["config"]
    md = [f"# {exp.get('name', folder.name)}", "", exp.get("description", ""), ""]
    if exp.get("reference"):
        md += [f"Reference: {exp['reference']}", ""]
    swept = "".join(f"; swept: {k} over {v}" for k, v in exp.get("grid", {}).items())
    md += [f"Budget: model {cfg['model']}, dataset {cfg['dataset']}, {cfg['steps']} steps, batch {cfg['batch_size']}, "
           f"{cfg['optimizer']} lr {cfg['lr']}{swept}, weight decay {cfg['weight_decay']}, test set evaluated every "
           f"{cfg['eval_every']} steps; {len(runs)} runs, {sum(r['wall_s'] or 0 for r in runs):.0f} s of training "
           f"in all ({runs[0]['env'].get('threads', '?')} thread(s) per run, torch {runs[0]['env'].get('torch', '?')})"
           + (f"; {others} older run(s) in this folder, from other settings, are left out." if others else "."),
           ""] + ([incomplete, ""] if incomplete else []) + ["## Final test accuracy and speed-up", "", table(rows), "",
           "Final accuracy: mean over the runs that did not diverge (a diverged run is counted, not averaged). "
           "Speed-up: per seed, the steps the baseline needs to reach its best test accuracy divided by the steps "
           "the method needs to reach the same accuracy (Collins et al. 2019), then mean ± std over seeds; a "
           "method that never reaches it is counted as such, not as a number. Steps are counted at the "
           f"evaluations (every {cfg['eval_every']} steps): a method that is already there at its first evaluation "
           f"scores the baseline's steps / {cfg['eval_every']}, a lower bound of its speed-up.", ""]
    comparison = _comparison(rows)
    if comparison:
        md += ["## Against the paper", ""] + comparison + [""]
    md += ["## Curves", "", "![test accuracy](test_acc.png)", "", "![training loss](train_loss.png)", ""]
    if has_speed:
        md += ["Speed-up over the course of training, on the seed-mean curves:", "", "![speed-up](speedup.png)", ""]
    kind = exp.get("report", {}).get("kind", "curves")
    if exp.get("grid"):
        md += ["## Final accuracy against the swept values", ""]
        md += [f"![{p}]({p})" for p in _plot_sweep(exp, runs, folder)] + [""]
    if kind == "lr-sweep":
        md += ["## Against the baseline at its own best learning rate", ""] + _best_lr_table(exp, groups) + [
            "", "A speed-up that holds against the baseline at the same learning rate but not against the baseline "
            "at its own best learning rate only compensates for a too-small learning rate.", ""]
    if kind == "loss-vs-accuracy":
        _plot_loss_vs_accuracy(groups, folder / "loss_vs_accuracy.png")
        md += ["## Cross entropy against accuracy", "", "If a method reaches a given test accuracy at a higher "
               "training cross entropy than the baseline, part of its gain is regularization rather than "
               "faster optimization; equal curves mean pure acceleration.", "",
               "![loss vs accuracy](loss_vs_accuracy.png)", ""]
    if kind == "distributions" and _plot_distributions(groups, folder / "distributions.png"):
        md += ["## Pre-activation distributions", "", "Percentiles of the input of the last ReLU on 1000 test "
               "images (eval mode) at each evaluation:", "", "![distributions](distributions.png)", ""]
    md += ["Per-run results (config, environment, curve): `runs.json`; the store: `runs.db`.", ""]
    (folder / "report.md").write_text("\n".join(md))
    if echo:
        if incomplete:
            print(incomplete.replace("**", ""))
        print(table(rows))
        for line in comparison:
            print(line)
        print(f"report: {folder / 'report.md'}")
    store.close()
    return folder / "report.md"


def export_tensorboard(folder: str | Path, logdir: str | Path | None = None) -> Path:
    """Write the curves of the runs of the folder's last experiment (the runs its report covers) as
    TensorBoard scalars, one run directory per run (``<logdir>/<group>/seed<k>``, default
    ``logdir = <folder>/tensorboard``); needs ``tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard export needs the tensorboard package: pip install tensorboard") from e
    folder = Path(folder)
    logdir = Path(logdir) if logdir is not None else folder / "tensorboard"
    with Store(folder) as store:
        for run in store.runs(current=True):
            tag = run["grp"].replace(" ", "_").replace("=", "-")
            run_dir = logdir / tag / f"seed{run['seed']}"
            for old in run_dir.glob("events.out.tfevents.*"):  # written by an earlier export: not twice
                old.unlink()
            with SummaryWriter(str(run_dir)) as w:
                for row in run["curve"]:
                    for key in ("loss", "aux", "train_acc", "test_loss", "test_acc"):
                        if row.get(key) is not None:
                            w.add_scalar(key, row[key], row["step"])
    return logdir
