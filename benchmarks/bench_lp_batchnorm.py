"""Speed and memory of normlab's L1 / top-k batch norm (Hoffer et al. 2018) against nn.BatchNorm2d.

One thread, forward + backward of a (128, 64, 32, 32) float32 tensor, side by side in one run,
interleaved in rounds so that drift of the machine hits every variant alike:

* ``bn``          - ``nn.BatchNorm2d`` (PyTorch's native kernel; the reference of the ratios),
* ``l1bn``        - :class:`normlab.methods.lp_batchnorm.L1BatchNorm2d` (goal: <= 1.5x bn),
* ``topk1``       - :class:`TopKBatchNorm2d` with k = 1, i.e. L-infinity batch norm (goal: <= 2x bn),
* ``topk10``      - :class:`TopKBatchNorm2d` with k = 10 (goal: <= 2x bn),
* ``naive_l1``    - L1 batch norm written as a plain PyTorch composition, autograd through it.

Peak memory is the largest number of bytes allocated at once during one forward + backward beyond
what was allocated before it (the input, the incoming gradient, the parameters), read from the CPU
allocator's allocation and free events under ``torch.profiler`` with ``profile_memory=True``.

    python benchmarks/bench_lp_batchnorm.py [--quick] [--rounds 5] [--reps 5] [--no-channels-last]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from normlab.methods.lp_batchnorm import L1BatchNorm2d, TopKBatchNorm2d


class NaiveL1BatchNorm2d(nn.BatchNorm2d):
    """L1 batch norm as the obvious composition of PyTorch ops (autograd through all of them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean((0, 2, 3), keepdim=True)
        d = x - mu
        s = math.sqrt(math.pi / 2) * d.abs().mean((0, 2, 3), keepdim=True)
        with torch.no_grad():
            self.running_mean.lerp_(mu.flatten(), self.momentum)
            self.running_var.lerp_((s * s).flatten(), self.momentum)
        return d / torch.sqrt(s * s + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


VARIANTS = {
    "bn": lambda c: nn.BatchNorm2d(c),
    "l1bn": lambda c: L1BatchNorm2d(c),
    "topk1": lambda c: TopKBatchNorm2d(c, k=1),
    "topk10": lambda c: TopKBatchNorm2d(c, k=10),
    "naive_l1": lambda c: NaiveL1BatchNorm2d(c),
}


def make_step(name: str, x: torch.Tensor, g: torch.Tensor):
    torch.manual_seed(0)
    layer = VARIANTS[name](x.shape[1]).train()
    xr = x.detach().requires_grad_()

    def step() -> None:
        layer(xr).backward(g)
        xr.grad = None  # at the end, so that a profiled step frees nothing allocated before it
        layer.zero_grad(set_to_none=True)

    return step


def peak_bytes(name: str, x: torch.Tensor, g: torch.Tensor) -> int:
    """Peak of the bytes allocated during one fwd+bwd above what was allocated before it.

    PyTorch keeps no CPU allocator statistics, but under ``profile_memory=True`` the CPU allocator
    reports every allocation and free to the profiler; their running sum in time order is exact.
    """
    step = make_step(name, x, g)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 3 repeats (a smoke run)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all variants")
    p.add_argument("--reps", type=int, default=5, help="timed fwd+bwd per variant per round")
    p.add_argument("--shape", type=int, nargs=4, default=[128, 64, 32, 32])
    p.add_argument("--no-channels-last", action="store_true", help="skip the channels_last table")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.reps = 1, 3
    torch.set_num_threads(args.threads)
    formats = [("NCHW", torch.contiguous_format)]
    if not args.no_channels_last:
        formats.append(("channels_last", torch.channels_last))
    torch.manual_seed(0)
    base = torch.randn(*args.shape)
    grad = torch.randn(*args.shape)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), input {tuple(args.shape)} float32, "
          f"{args.rounds} rounds x {args.reps} reps, median fwd+bwd\n")
    for fmt_name, fmt in formats:
        x = base.contiguous(memory_format=fmt)
        g = grad.contiguous(memory_format=fmt)
        steps = {name: make_step(name, x, g) for name in VARIANTS}
        for step in steps.values():  # warm up
            step()
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, step in steps.items():
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
        peaks = {name: peak_bytes(name, x, g) for name in VARIANTS}
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        print(f"### {fmt_name}\n")
        print("| variant | fwd+bwd ms | time / bn | peak MiB | peak / bn |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in VARIANTS:
            print(f"| {name} | {med[name]:.1f} | {med[name] / med['bn']:.2f}x | {peaks[name] / 2**20:.0f} | "
                  f"{peaks[name] / peaks['bn']:.2f}x |")
        print()


if __name__ == "__main__":
    main()
