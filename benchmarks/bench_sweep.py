"""Sweep throughput of the harness against running the same runs one after another, side by side.

Takes the bundled ``weight-sweep`` experiment (std-loss weight x seeds on the MNIST CNN) with a
reduced budget (``--steps``, ``--seeds``) and runs its runs twice:

* ``sequential``: one after another in this process with torch's default threading and no
  tuning (the obvious loop: ``for cfg in configs: normlab.engine.train(cfg)``);
* ``harness``: ``normlab.experiments.run_experiment`` (one spawned worker per core, one thread each,
  tuned allocator, results written to a fresh SQLite store), start-up of the workers included.

It prints the runs per minute of each and their ratio (the harness issue's goal: at least 3x).

It also splits the ratio into its two parts: the summed time of the runs themselves (one after another
with the default threads, against inside the workers with one thread each, both workers busy) and
the packing of runs onto ``cores`` workers. With perfect packing and no start-up the ratio would be
``cores * sum(sequential run times) / sum(worker run times)``: the most any one-process-per-core
scheme gets unless it makes each run cheaper than ``engine.train`` does.

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

    seq_runs = []
    for run in runs:
        start = time.perf_counter()
        engine.train(run.config, ds)
        seq_runs.append(time.perf_counter() - start)
    seq = sum(seq_runs)

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        store = run_experiment(exp, out, progress=False)
        pool = time.perf_counter() - start
        worker_runs = [r["wall_s"] for r in store.runs()]
        store.close()
    cores = min(len(runs), os.cpu_count() or 1)

    n = len(runs)
    print(f"weight-sweep, {n} runs of {args.steps} steps (eval every {args.eval_every}), {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print("| way | wall s | runs/min |")
    print("| --- | ---: | ---: |")
    print(f"| sequential, default threading ({default_threads} threads) | {seq:.1f} | {n / seq * 60:.1f} |")
    print(f"| harness ({min(n, os.cpu_count() or 1)} workers x 1 thread) | {pool:.1f} | {n / pool * 60:.1f} |")
    print(f"throughput ratio harness / sequential: {seq / pool:.2f}x (goal >= 3x)")
    print(f"time in the runs: {seq:.1f} s one after another ({default_threads} threads), {sum(worker_runs):.1f} s "
          f"summed over the workers (1 thread each): perfect packing on {cores} workers would give "
          f"{cores} x {seq:.1f} / {sum(worker_runs):.1f} = {cores * seq / sum(worker_runs):.2f}x")


if __name__ == "__main__":
    main()
