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
from .store import Store

__all__ = ["build_report", "summarize"]


def _groups(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["grp"]].append(r)
    return dict(groups)


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


def summarize(store: Store) -> list[dict]:
    """One row per group: counts, final accuracy aggregate, paper figure, speed-up aggregate."""
    exp = store.meta("experiment", {}) or {}
    baseline = exp.get("baseline")
    paper = exp.get("paper", {})
    groups = _groups(store.runs())
    rows = []
    for name, runs in groups.items():
        method = runs[0]["method"]
        finals = [r["final_test_acc"] for r in runs]
        base = _baseline_group(name, runs, groups, baseline)
        speed = None
        if base is not None and base != name:
            by_seed = {r["seed"]: r for r in groups[base]}
            pairs = [(by_seed[r["seed"]]["curve"], r["curve"]) for r in runs if r["seed"] in by_seed]
            speed = metrics.aggregate(metrics.speedup(b, m) for b, m in pairs)
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
        ci = f"[{f.ci_low * 100:.1f}, {f.ci_high * 100:.1f}]" if f.ci_low is not None else "-"
        if r["speedup"] is None:
            sp = "(baseline)" if r["baseline"] == r["group"] else "-"
        else:
            sp = r["speedup"].format(digits=2) + "x" if r["speedup"].mean is not None else r["speedup"].format()
        runs = f"{r['n']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        lines.append(f"| {r['group']} | {runs} | {f.format(100)} | {ci} | {_fmt_paper(r['paper'])} | {sp} |")
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


def _plot_curves(groups: dict[str, list[dict]], key: str, ylabel: str, path: Path, scale: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in groups.items():
        steps, mean, std = metrics.mean_curve([r["curve"] for r in runs], key)
        mean = [m * scale for m in mean]
        std = [s * scale for s in std]
        line, = ax.plot(steps, mean, label=f"{name} (n={len(runs)})")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for r in rows:
        if r["speedup"] is None:
            continue
        base = groups[r["baseline"]]
        bs, bm, _ = metrics.mean_curve([x["curve"] for x in base], "test_acc")
        ms, mm, _ = metrics.mean_curve([x["curve"] for x in groups[r["group"]]], "test_acc")
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


def build_report(folder: str | Path, *, echo: bool = True) -> Path:
    """Write ``report.md``, ``runs.json`` and the PNG plots into ``folder`` from its store."""
    folder = Path(folder)
    if not (folder / "runs.db").exists():
        raise FileNotFoundError(f"{folder} has no runs.db: run an experiment into it first (normlab run FILE --out {folder})")
    store = Store(folder)
    runs = store.runs()
    if not runs:
        raise ValueError(f"{folder}/runs.db holds no finished runs yet")
    exp = store.meta("experiment", {}) or {}
    rows = summarize(store)
    groups = _groups(runs)
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
    md += [f"Budget: model {cfg['model']}, dataset {cfg['dataset']}, {cfg['steps']} steps, batch {cfg['batch_size']}, "
           f"{cfg['optimizer']} lr {cfg['lr']}, weight decay {cfg['weight_decay']}, test set evaluated every "
           f"{cfg['eval_every']} steps; {len(runs)} runs, {sum(r['wall_s'] or 0 for r in runs):.0f} s of training "
           f"in all ({runs[0]['env'].get('threads', '?')} thread(s) per run, torch {runs[0]['env'].get('torch', '?')}).",
           "", "## Final test accuracy and speed-up", "", table(rows), "",
           "Speed-up: per seed, the steps the baseline needs to reach its best test accuracy divided by the steps "
           "the method needs to reach the same accuracy (Collins et al. 2019), then mean ± std over seeds; a "
           "method that never reaches it is counted as such, not as a number.", ""]
    comparison = _comparison(rows)
    if comparison:
        md += ["## Against the paper", ""] + comparison + [""]
    md += ["## Curves", "", "![test accuracy](test_acc.png)", "", "![training loss](train_loss.png)", ""]
    if has_speed:
        md += ["Speed-up over the course of training, on the seed-mean curves:", "", "![speed-up](speedup.png)", ""]
    md += ["Per-run results (config, environment, curve): `runs.json`; the store: `runs.db`.", ""]
    (folder / "report.md").write_text("\n".join(md))
    if echo:
        print(table(rows))
        for line in comparison:
            print(line)
        print(f"report: {folder / 'report.md'}")
    store.close()
    return folder / "report.md"
