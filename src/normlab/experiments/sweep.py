"""Run the runs of an experiment on a pool of worker processes, storing each as it finishes.

Measured on the 2-core machine this was built on (see ``benchmarks/RESULTS.md``): for the paper's
tiny models, one process per core with one intra-op thread each beats one process with two threads,
so the pool defaults to ``os.cpu_count()`` workers x 1 thread. Workers are spawned (not forked),
tune their allocator (:func:`normlab.engine.configure_worker`), load the data once, and die with
the parent. Each run checkpoints at every evaluation into ``<out>/checkpoints/``; a sweep that is
killed and started again skips the runs already in the store and resumes the others from their
checkpoints, ending with the same numbers as an uninterrupted sweep.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from .spec import Experiment, Run
from .store import Store

__all__ = ["run_experiment", "default_workers"]

_progress: mp.Queue | None = None


def default_workers() -> int:
    """One worker per core (each with one thread), as measured fastest for small models."""
    return max(1, os.cpu_count() or 1)


def _init_worker(progress: mp.Queue, threads: int) -> None:
    global _progress
    _progress = progress
    try:  # die with the parent, even on SIGKILL (Linux)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what to do on Ctrl-C
    from ..engine import configure_worker

    configure_worker(threads)


def _work(run_id: str, config: dict, checkpoint: str) -> tuple[str, dict | None, str | None]:
    from ..engine import RunConfig, train

    cfg = RunConfig(**config)
    last = [0]

    def on_eval(row: dict) -> None:
        if _progress is not None:
            _progress.put(row["step"] - last[0])
        last[0] = row["step"]

    try:
        result = train(cfg, on_eval=on_eval, checkpoint=checkpoint)
    except Exception:
        return run_id, None, traceback.format_exc()
    if result.diverged_at is not None and _progress is not None:
        _progress.put(cfg.steps - last[0])
    return run_id, result.to_dict(), None


def _bar(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def run_experiment(exp: Experiment, out: str | Path, *, workers: int | None = None, threads: int = 1,
                   progress: bool = True) -> Store:
    """Run every run of ``exp`` not yet in ``<out>/runs.db`` and return the store.

    ``workers`` defaults to :func:`default_workers`; with ``workers=0`` the runs execute in this
    process (debugging). Progress (steps done over all runs, ETA) goes to stderr. A run that raises
    is reported and left out of the store (a later start retries it); the sweep goes on.
    """
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be an int >= 0 (0 runs everything in this process), got {workers!r}")
    out = Path(out)
    store = Store(out)
    store.set_meta("experiment", exp.to_dict())
    runs = exp.runs()
    store.set_meta("run_ids", [r.id for r in runs])  # the report covers these, not older runs in the folder
    done = store.done_ids()
    pending: list[Run] = [r for r in runs if r.id not in done]
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for stale in ckpt_dir.glob("*.tmp"):  # a checkpoint write cut short by a kill
        stale.unlink(missing_ok=True)
    total = sum(r.config.steps for r in pending)
    skipped = len(runs) - len(pending)
    if skipped and progress:
        print(f"{skipped} of {len(runs)} runs already in {store.path}; running the other {len(pending)}",
              file=sys.stderr)
    if not pending:
        return store
    n_workers = default_workers() if workers is None else workers
    n_workers = min(n_workers, len(pending))
    from .. import data

    for name in sorted({r.config.dataset for r in pending}):
        data.fetch(name, progress=progress)  # a download happens here once, not in every worker
    bar = _bar(total=total, unit="step", desc=f"{exp.name}: {len(pending)} runs",
                      disable=not progress, smoothing=0.05, dynamic_ncols=True)
    failures: list[tuple[Run, str]] = []
    by_id = {r.id: r for r in pending}

    def finish(run_id: str, result: dict | None, error: str | None) -> None:
        run = by_id[run_id]
        if error is not None:
            failures.append((run, error))
            bar.write(f"run {run.group} seed {run.config.seed} failed:\n{error}", file=sys.stderr)
            return
        store.add(run_id, exp.name, run.group, result)
        if result["diverged_at"] is not None:
            bar.write(f"run {run.group} seed {run.config.seed} diverged at step {result['diverged_at']}", file=sys.stderr)

    if n_workers == 0:
        _init_progress_local(SimpleNamespace(put=bar.update))  # the bar moves at every evaluation
        before = torch.get_num_threads()
        torch.set_num_threads(threads)  # as a worker has it: a run's numbers depend on the thread count
        try:
            for run in pending:
                finish(*_work(run.id, asdict(run.config), str(ckpt_dir / f"{run.id}.pt")))
        finally:
            _init_progress_local(None)
            torch.set_num_threads(before)
            bar.close()
        return _report_failures(store, failures)

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(q, threads))
    try:
        futures = {pool.submit(_work, r.id, asdict(r.config), str(ckpt_dir / f"{r.id}.pt")) for r in pending}
        while futures:
            finished, futures = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(q, bar)
            for fut in finished:
                finish(*fut.result())
        _drain(q, bar)
    except KeyboardInterrupt:
        bar.write(f"interrupted: finished runs are in {store.path}; run the same command again to resume", file=sys.stderr)
        procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    pool.shutdown()
    return _report_failures(store, failures)


def _init_progress_local(q) -> None:
    global _progress
    _progress = q


def _drain(q, bar) -> None:
    while True:
        try:
            bar.update(q.get_nowait())
        except queue.Empty:
            return


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _report_failures(store: Store, failures: list) -> Store:
    ckpts = store.folder / "checkpoints"
    if ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()
    if failures:
        names = ", ".join(f"{r.group} seed {r.config.seed}" for r, _ in failures)
        print(f"{len(failures)} run(s) failed and were not stored: {names}", file=sys.stderr)
    return store
