"""Cost of weight standardization and batch-channel norm, side by side, on one thread.

Forward + backward (input gradient and parameter gradients) on a ``(N, 64, 32, 32)`` float32 input
(``N = 128``; ``--quick``: 16):

* ``conv``       - plain ``nn.Conv2d(64, 64, 3, padding=1)``,
* ``ws conv``    - the same conv with normlab's weight standardization (goal: <= 1.15x ``conv``),
* ``bn``         - ``nn.BatchNorm2d(64)`` (the reference for memory),
* ``bn + gn``    - ``nn.BatchNorm2d(64)`` followed by ``nn.GroupNorm(32, 64)``,
* ``bcn``        - ``BatchChannelNorm2d(64)`` (goal: <= 1.3x ``bn + gn``),
* ``bcn est``    - ``BatchChannelNorm2d(64, estimate=True)``,

interleaved in rounds so that drift of the machine hits every variant alike; prints the median
time of each in two markdown tables (convs; normalization layers) with the time ratios and the
activation memory each keeps for backward (bytes of the distinct non-parameter tensors autograd
saves, counted with ``saved_tensors_hooks``), relative to ``conv`` and to ``bn``.

    python benchmarks/bench_ws_bcn.py [--quick] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from normlab.methods.bcn import BatchChannelNorm2d
from normlab.methods.ws import weight_standardization


def variants() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    ws = weight_standardization(nn.Conv2d(64, 64, 3, padding=1))
    return {
        "conv": conv,
        "ws conv": ws,
        "bn": nn.BatchNorm2d(64),
        "bn + gn": nn.Sequential(nn.BatchNorm2d(64), nn.GroupNorm(32, 64)),
        "bcn": BatchChannelNorm2d(64),
        "bcn est": BatchChannelNorm2d(64, estimate=True),
    }


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    del y
    return sum(n for ptr, n in seen.items() if ptr not in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, 3 rounds (a smoke run)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128, --quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 3)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch = args.batch or (16 if args.quick else 128)
    rounds = args.rounds or (3 if args.quick else 7)

    mods = variants()
    x = torch.randn(batch, 64, 32, 32, requires_grad=True)
    grad = torch.randn(batch, 64, 32, 32)
    times: dict[str, list[float]] = {name: [] for name in mods}
    for m in mods.values():  # warm-up
        step(m, x, grad)
    for _ in range(rounds):
        for name, m in mods.items():
            t = time.perf_counter()
            step(m, x, grad)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    mem = {name: saved_bytes(m, x) for name, m in mods.items()}

    # The weight transform alone: standardize the 64x64x3x3 weight, forward + backward.
    w = mods["ws conv"]
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        w.weight.sum().backward()
    ws_alone = (time.perf_counter() - t) / n

    goal = {"ws conv": 1.15, "bcn": 1.3, "bcn est": 1.3}
    print(f"input ({batch}, 64, 32, 32) float32, {args.threads} thread(s), median of {rounds} rounds, "
          f"torch {torch.__version__}\n")
    tables = (("conv", ["conv", "ws conv"], "conv"), ("bn + gn", ["bn", "bn + gn", "bcn", "bcn est"], "bn"))
    for ref, rows, mem_ref in tables:
        print(f"| variant | fwd+bwd ms | vs {ref} | goal | saved for backward MiB | vs {mem_ref} |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in rows:
            r = med[name] / med[ref]
            g = f"<= {goal[name]}" + (" ok" if r <= goal[name] else " MISSED") if name in goal else ""
            print(f"| {name} | {med[name] * 1e3:.1f} | {r:.3f} | {g} | {mem[name] / 2**20:.1f} | "
                  f"{mem[name] / mem[mem_ref]:.2f} |")
        print()
    print(f"weight standardization alone (64x64x3x3 weight, fwd+bwd): {ws_alone * 1e6:.0f} us")


if __name__ == "__main__":
    main()
