"""Cost of the standardization loss per training step of the paper's MNIST CNN, side by side.

Measures one SGD step as ``normlab.engine.train`` runs it (the minibatch gathered from the in-memory
training set, forward, loss, backward, update; batch 128, channels_last, one thread) of

* ``none``      - no normalization (the reference the overhead is measured against),
* ``std_loss``  - normlab's standardization loss (``normlab.apply(model, "std_loss")``) as the engine
                  runs it: the minibatch taken through ``StandardizationLoss.batch``, so that the first
                  conv's moments are summed from the per-example table of the training set,
* ``std_loss_torch`` - ``std_loss`` with its per-channel maths as torch operations, as normlab runs it
                  where its C loops (``normlab/_fused.c``) were not compiled or with NORMLAB_PURE_TORCH=1,
* ``std_loss_hooks`` - the same loss on a minibatch gathered without it, by ``index_select`` (what a user's own loop
                  gets without ``batch``): the first conv's moments from the batch's patches,
* ``naive``     - the same loss written the obvious way: forward hooks with ``torch.var_mean`` over
                  (0, 2, 3) and autograd through it,
* ``naive_nchw`` - the foundation issue's reference loop: ``naive`` in NCHW memory format (the issue
                  measured it at 14 ms/step on its machine; it calibrates this VM against that one),
* ``bn`` / ``bn_shift`` - batch norm with scale and shift / shift only (the paper's baseline),

interleaved in many short rounds so that drift of the machine (a shared VM here: the absolute step
time moves by 20% from minute to minute) hits every variant alike. It prints the median step time
of each and the median over rounds of the per-round ratios, with their interquartile range: the
foundation issue asks for std_loss / none <= 1.15 and std_loss / bn < 1.

    python benchmarks/bench_std_loss.py [--steps 40] [--rounds 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from normlab import apply, data, engine, functional, models


def naive_std_loss(model: torch.nn.Module) -> tuple[list, list]:
    """The obvious implementation: hooks on each conv output, var_mean, autograd through it."""
    terms: list[torch.Tensor] = []
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    def hook(module, args, out):
        var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
        terms.append(0.5 * (mean**2 + var - torch.log(var + 1e-5) - 1).sum())

    return terms, [c.register_forward_hook(hook) for c in convs]


def make_step(variant: str, data_x: torch.Tensor, data_y: torch.Tensor, batches: list[torch.Tensor]):
    torch.manual_seed(0)
    norm = variant if variant in ("bn", "bn_shift") else "none"
    fmt = torch.contiguous_format if variant == "naive_nchw" else torch.channels_last
    model = models.cnn(norm=norm).to(memory_format=fmt)
    aux = lambda: 0.0  # noqa: E731
    gather = lambda x, idx: x.index_select(0, idx)  # noqa: E731
    if variant in ("std_loss", "std_loss_torch", "std_loss_hooks"):
        handle = apply(models.cnn(norm="bn").to(memory_format=torch.channels_last), "std_loss")
        model, aux = handle.model, handle.aux_loss
        if variant != "std_loss_hooks":
            gather = handle.state["std_loss"].batch
    elif variant in ("naive", "naive_nchw"):
        terms, _ = naive_std_loss(model)

        def aux():
            total = torch.stack(terms).sum()
            terms.clear()
            return total
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=4e-5)
    i = 0

    def step() -> None:
        nonlocal i
        idx = batches[i % len(batches)]
        i += 1
        x, y = gather(data_x, idx).contiguous(memory_format=fmt), data_y.index_select(0, idx)  # as engine.train does
        loss = F.cross_entropy(model(x), y) + aux()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if variant == "std_loss_torch":
        def pure_torch_step() -> None:
            fused, functional._fused = functional._fused, None
            try:
                step()
            finally:
                functional._fused = fused

        return pure_torch_step
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    engine.configure_worker(args.threads)
    ds = data.load("mnist", progress=False)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(ds.train_y), (128,), generator=g) for _ in range(50)]
    variants = ["none", "std_loss", "std_loss_torch", "std_loss_hooks", "naive", "naive_nchw", "bn", "bn_shift"]
    steps = {v: make_step(v, ds.train_x, ds.train_y, batches) for v in variants}
    for step in steps.values():  # warm up (oneDNN primitive caches, allocator)
        for _ in range(30):
            step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[v]()
            times[v].append((time.perf_counter() - t) / args.steps * 1e3)
    med = {v: statistics.median(ts) for v, ts in times.items()}

    def ratio(a: str, b: str) -> str:
        r = [x / y for x, y in zip(times[a], times[b])]
        q1, q2, q3 = statistics.quantiles(r, n=4)
        return f"{q2:.3f} (IQR {q1:.3f}-{q3:.3f})"

    print(f"MNIST CNN, batch 128, channels_last, {args.threads} thread(s), torch {torch.__version__}; "
          f"median of {args.rounds} rounds x {args.steps} steps; the loss's C loops: "
          f"{'on' if functional._fused is not None else 'off (not compiled, or NORMLAB_PURE_TORCH=1)'}")
    print("| variant | ms/step | vs none (median of the per-round ratios) |")
    print("| --- | ---: | ---: |")
    for v in variants:
        print(f"| {v} | {med[v]:.2f} | {statistics.median(x / y for x, y in zip(times[v], times['none'])):.3f} |")
    print("per-round ratios, median over rounds:")
    print(f"  std_loss / none: {ratio('std_loss', 'none')} (goal <= 1.15)")
    print(f"  std_loss_torch / none: {ratio('std_loss_torch', 'none')} (the same maths as torch operations)")
    print(f"  std_loss_hooks / none: {ratio('std_loss_hooks', 'none')} (without batch(): a plain minibatch)")
    print(f"  naive / none:    {ratio('naive', 'none')}")
    print(f"  std_loss / bn:   {ratio('std_loss', 'bn')} (goal < 1)")
    print(f"  std_loss / bn_shift: {ratio('std_loss', 'bn_shift')}")
    print(f"  std_loss_hooks / bn: {ratio('std_loss_hooks', 'bn')}")
    print(f"  naive_nchw / std_loss: {ratio('naive_nchw', 'std_loss')} (the issue's reference loop: 14 ms/step "
          f"on its machine, {med['naive_nchw']:.1f} ms/step here now)")


if __name__ == "__main__":
    main()
