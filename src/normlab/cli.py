"""The normlab command: reproduce the papers' experiments, run experiment files, read results.

    normlab reproduce mnist-cnn              # the paper's MNIST CNN experiment (30 runs) -> runs/mnist-cnn/
    normlab reproduce --list                 # the bundled experiments
    normlab run my-sweep.toml --out DIR      # any experiment file
    normlab report DIR [--tensorboard]       # rebuild report.md, runs.json and the plots from DIR/runs.db
    normlab results DIR [--method M] [--csv F]
    normlab methods                          # the registered methods
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _int_type(low: int, why: str = ""):
    # An argparse type: an int >= low, else an error that argparse prefixes with the option's name.
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{why}, got {text!r}")
        return value
    return parse


_count = _int_type(0, " (0 runs everything in this process)")
_positive = _int_type(1)


class _UsageError(Exception):
    """A bad command-line value, reported in one line with exit status 2."""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path,
                   help="output folder (default: runs/<experiment name>, runs/<experiment name>-quick with --quick)")
    p.add_argument("--seeds", type=_positive, help="number of seeds (0..N-1)")
    p.add_argument("--steps", type=_positive, help="training steps per run")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=_positive, help="minibatch size")
    p.add_argument("--weight", type=float, help="standardization-loss weight")
    p.add_argument("--eval-every", type=_positive, help="evaluate the full test set every N steps")
    p.add_argument("--methods", help="comma-separated method specs, e.g. none,bn,std_loss,ws+gn")
    p.add_argument("--quick", action="store_true", help="the experiment's small budget (a smoke test)")
    p.add_argument("--workers", type=_count,
                   help="worker processes (default: one per core, 1 thread each; 0: in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace, target: str) -> int:
    from .experiments import build_report, load, override, run_experiment

    exp = load(target)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    exp = override(exp, seeds=args.seeds, methods=methods, quick=args.quick, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, weight=args.weight, eval_every=args.eval_every)
    out = args.out or Path("runs") / (exp.name + ("-quick" if args.quick else ""))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file, not a folder" if out.exists() else f"cannot be created ({e.strerror})"
        raise _UsageError(f"--out {out} {what}: pass a folder for the results (it is created if missing)") from None
    n = len(exp.runs())
    print(f"{exp.name}: {exp.description}\n{n} runs ({len(exp.methods)} methods x {len(exp.seeds)} seeds"
          f"{' x grid' if exp.grid else ''}) -> {out}", file=sys.stderr)
    start = time.perf_counter()
    with run_experiment(exp, out, workers=args.workers, progress=not args.no_progress) as store:
        missing = len({r.id for r in exp.runs()} - store.done_ids())
    print(f"finished in {time.perf_counter() - start:.1f} s wall time", file=sys.stderr)
    if missing < n:  # with every run failed there is nothing to report
        build_report(out)
    if missing:
        print(f"normlab: {missing} of {n} runs failed (errors above) and are not in the report; run the same "
              "command again to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    first, _, examples = __doc__.partition("\n")
    parser = argparse.ArgumentParser(prog="normlab", description=first,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples.strip("\n"))
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")

    p = command("reproduce", "run a bundled experiment of the papers, then write its report")
    p.add_argument("name", nargs="?", help="bundled experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the bundled experiments")
    _add_run_options(p)
    p = command("run", "run an experiment file (TOML, see normlab.experiments.spec), then write its report")
    p.add_argument("file", type=Path, help="the experiment file")
    _add_run_options(p)
    p = command("report", "write report.md, runs.json and plots from a results folder")
    p.add_argument("folder", type=Path, help="a results folder (holding runs.db)")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="LOGDIR",
                   help="also write the curves as TensorBoard logs (default LOGDIR: FOLDER/tensorboard)")
    p = command("results", "list the runs of a results folder, optionally as CSV")
    p.add_argument("folder", type=Path, help="a results folder (holding runs.db)")
    p.add_argument("--method", help="only the runs of this method spec, e.g. std_loss")
    p.add_argument("--status", choices=["done", "diverged"], help="only the finished or only the diverged runs")
    p.add_argument("--group", help="exact group label, e.g. 'std_loss std_loss.weight=0.1'")
    p.add_argument("--csv", type=Path, help="write the runs to this CSV file")
    p.add_argument("--all", action="store_true",
                   help="also the older runs of a folder reused with other settings (the report leaves them out)")
    command("methods", "list the registered methods")
    args = parser.parse_args(argv)

    from .data import DataError
    from .experiments import SpecError, StoreError

    try:
        if args.command == "reproduce":
            from .experiments import bundled

            if args.list or not args.name:
                for name, desc in bundled().items():
                    print(f"{name:18s} {desc}")
                if args.list:
                    return 0
                raise _UsageError("reproduce needs the name of a bundled experiment (listed above), e.g. "
                                  "normlab reproduce mnist-cnn")
            return _run(args, args.name)
        if args.command == "run":
            return _run(args, str(args.file))
        if args.command == "report":
            from .experiments import build_report, export_tensorboard

            build_report(args.folder)
            if args.tensorboard is not None:
                try:
                    logdir = export_tensorboard(args.folder, args.tensorboard or None)
                except ImportError as e:
                    raise _UsageError(f"--tensorboard: {e}") from None
                print(f"TensorBoard logs: {logdir} (tensorboard --logdir {logdir})")
            return 0
        if args.command == "results":
            return _results(args)
        if args.command == "methods":
            from . import list_methods

            for name, desc in list_methods().items():
                print(f"{name:10s} {desc}")
            return 0
    except (SpecError, StoreError, FileNotFoundError, _UsageError) as e:
        print(f"normlab: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"normlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _results(args: argparse.Namespace) -> int:
    from .experiments import Store

    if not (args.folder / "runs.db").exists():
        raise FileNotFoundError(f"{args.folder} has no runs.db")
    where = {k: v for k, v in (("method", args.method), ("status", args.status), ("grp", args.group)) if v}
    with Store(args.folder) as store:
        if args.csv:
            try:
                n = store.to_csv(args.csv, where, current=not args.all)
            except OSError as e:
                raise _UsageError(f"--csv {args.csv}: cannot write it ({e.strerror}); pass a file path in an "
                                  "existing folder") from None
            print(f"wrote {n} runs to {args.csv}")
            return 0
        rows = store.runs(where, current=not args.all)
        hidden = 0 if args.all else len(store.runs(where)) - len(rows)
        print(f"{'group':28s} {'seed':>4s} {'status':9s} {'test acc':>8s} {'wall s':>7s}")
        for r in rows:
            # A diverged run has no final accuracy (its stored figure is the last finite evaluation's).
            acc = "-" if r["final_test_acc"] is None or r["status"] == "diverged" else f"{r['final_test_acc'] * 100:.2f}"
            status = r["status"] + (f"@{r['diverged_at']}" if r["diverged_at"] else "")
            print(f"{r['grp']:28s} {r['seed']:4d} {status:9s} {acc:>8s} {r['wall_s'] or 0:7.1f}")
        print(f"{len(rows)} runs" + (f"; {hidden} older run(s) from other settings not shown (--all shows them)"
                                     if hidden else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
