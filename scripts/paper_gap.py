"""Do init or input scaling explain the gap between our MNIST CNN numbers and the paper's?

The standardization-loss paper (Collins et al. 2019, appendix A.1) does not state its weight init or
its input preprocessing. This runs the paper's CNN budget (none / BN shift-only / std loss, plain
SGD lr 1e-3, 1000 steps) under PyTorch's default init or Glorot-uniform with zero biases (the
TensorFlow default), on standardized or 0..1 pixels, and prints the final test accuracy per cell.

    python scripts/paper_gap.py [--seeds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
from multiprocessing import get_context

METHODS = ("none", "bn_shift", "std_loss")


def _run(job: tuple[str, bool, str, int]) -> tuple[tuple[str, bool, str, int], float]:
    init, standardized, method, seed = job
    from normlab import data, engine

    engine.configure_worker(1)
    ds = data.load("mnist", progress=False, normalize=standardized)
    cfg = engine.RunConfig(method=method, seed=seed, eval_every=1000, model_options={"init": init})
    return job, engine.train(cfg, ds).final["test_acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    jobs = [(init, std, m, s) for init in ("torch", "glorot") for std in (True, False)
            for m in METHODS for s in range(args.seeds)]
    acc: dict[tuple[str, bool, str], list[float]] = {}
    with get_context("spawn").Pool(args.workers) as pool:
        for i, ((init, std, m, s), a) in enumerate(pool.imap_unordered(_run, jobs), 1):
            acc.setdefault((init, std, m), []).append(a)
            print(f"[{i}/{len(jobs)}] init={init} input={'standardized' if std else '0..1'} {m} seed {s}: {100 * a:.1f}%",
                  flush=True)
    print("\n| init | input | " + " | ".join(METHODS) + " |\n| --- | --- |" + " ---: |" * len(METHODS))
    for init in ("torch", "glorot"):
        for std in (True, False):
            cells = [acc[(init, std, m)] for m in METHODS]
            text = [f"{100 * statistics.mean(c):.1f} ± {100 * statistics.stdev(c) if len(c) > 1 else 0:.1f}" for c in cells]
            print(f"| {init} | {'standardized' if std else '0..1'} | " + " | ".join(text) + " |")
    print("| paper | ? | 24.6 ± 6.5 | 85.6 | 75.2 ± 2.6 |")


if __name__ == "__main__":
    main()
