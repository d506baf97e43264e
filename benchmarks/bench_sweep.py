"""Sweep throughput of the harness against running the same runs one after another, side by side.

Takes the bundled ``weight-sweep`` experiment (std-loss weight x seeds on the MNIST CNN) with a
reduced budget (``--steps``, ``--seeds``) and runs its runs twice:

* ``sequential``: one after another in this process with torch's default threading and no
  tuning (the obvious loop: ``for cfg in configs: normlab.engine.train(cfg)``);
* ``harness``: ``normlab.experiments.run_experiment`` (one spawned worker per core, one thread each,
  tuned allocator, results written to a fresh SQLite store), start-up of the workers included.

It prints the runs per minute of each and their ratio (the harness issue's goal: at least 3x).

    python benchmarks/bench_sweep.py [--steps 200] [--seeds 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from normlab import data, engine
from normlab.experiments import load, override, run_experiment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=50)
    args = p.parse_args()
    exp = override(load("weight-sweep"), seeds=args.seeds, steps=args.steps, eval_every=args.eval_every)
    runs = exp.runs()
    ds = data.load("mnist", progress=False)
    default_threads = torch.get_num_threads()

    start = time.perf_counter()
    for run in runs:
        engine.train(run.config, ds)
    seq = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_experiment(exp, out, progress=False).close()
        pool = time.perf_counter() - start

    n = len(runs)
    print(f"weight-sweep, {n} runs of {args.steps} steps (eval every {args.eval_every}), {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print("| way | wall s | runs/min |")
    print("| --- | ---: | ---: |")
    print(f"| sequential, default threading ({default_threads} threads) | {seq:.1f} | {n / seq * 60:.1f} |")
    print(f"| harness ({min(n, os.cpu_count() or 1)} workers x 1 thread) | {pool:.1f} | {n / pool * 60:.1f} |")
    print(f"throughput ratio harness / sequential: {seq / pool:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
