"""The training engine: one run = model + method + data + optimizer + steps + batch size + seed.

The whole step is on one screen in :func:`train`::

    out = model(x); task = cross_entropy(out, y); aux = handle.aux_loss()
    (task + aux).backward(); handle.before_step(); opt.step(); handle.after_step()

A run is deterministic for a given seed on a given machine and thread count: the model is
initialised from ``seed``, and the minibatch of step ``s`` is a pure function of ``(seed, s)``
(epoch ``e`` is a permutation drawn from a generator seeded by ``(seed, e)``, batches are taken in
order, the incomplete last batch of an epoch is dropped), so a run can stop and resume anywhere.
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as data_mod
from . import models
from .methods.registry import Handle, apply, normalize_options

__all__ = ["RunConfig", "RunResult", "train", "build_run", "Sampler", "evaluate", "configure_worker"]

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class RunConfig:
    """Everything that defines one training run (plain data, JSON-serializable)."""

    model: str = "cnn"
    method: str = "none"
    dataset: str = "mnist"
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 4e-5
    seed: int = 0
    eval_every: int = 50
    model_options: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    percentiles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "eval_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for key in ("weight_decay", "momentum"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum applies to sgd only ({self.optimizer} has its own betas); leave it 0")
        if self.model not in models.MODELS:
            raise ValueError(f"model must be one of {sorted(models.MODELS)}, got {self.model!r}")
        if not isinstance(self.percentiles, (list, tuple)) or not all(
                isinstance(q, (int, float)) and 0 <= q <= 100 for q in self.percentiles):
            raise ValueError(f"percentiles must be numbers in [0, 100], got {self.percentiles!r}")
        if self.dataset not in data_mod.DATASETS:
            raise ValueError(f"dataset must be one of {sorted(data_mod.DATASETS)}, got {self.dataset!r}")
        # 1 and 1.0 are the same setting: one type, so that they give one run id (spec.run_id).
        self.lr, self.weight_decay, self.momentum = float(self.lr), float(self.weight_decay), float(self.momentum)
        self.method_options = normalize_options(self.method, self.method_options)

    def to_dict(self) -> dict:
        """Every field as a plain dict (JSON-ready; what a run id is computed from)."""
        return asdict(self)


@dataclass
class RunResult:
    """A finished (or diverged) run: its config, the evaluation curve and the final metrics.

    ``curve`` rows: ``step``, ``loss`` and ``aux`` (mean task and auxiliary loss over the steps
    since the previous row), ``train_acc`` (mean minibatch accuracy over those steps, in training
    mode), ``test_loss`` and ``test_acc`` (the full test set, eval mode). ``diverged_at`` is the
    first step whose loss was not finite (None if the run finished); the curve then ends with the
    last finite values.
    """

    config: dict
    curve: list[dict]
    diverged_at: int | None
    wall_s: float
    env: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        """The last curve row (the final evaluation), or ``{}`` for a run that diverged at step 0."""
        return self.curve[-1] if self.curve else {}

    def to_dict(self) -> dict:
        """The result as a plain dict (JSON-ready, as stored in ``runs.db`` and ``runs.json``)."""
        return {"config": self.config, "curve": self.curve, "diverged_at": self.diverged_at,
                "wall_s": self.wall_s, "final": self.final, "env": self.env}


def configure_worker(threads: int = 1) -> None:
    """Tune a worker process for many small CPU runs: ``threads`` intra-op threads, and glibc's malloc
    told to keep freed memory (no mmap/munmap and page faults for every activation; ~15% per step
    measured on the CNN). Leaves the process untouched where glibc is not available."""
    torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 64 << 20)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


class Sampler:
    """Minibatch indices of a step, a pure function of ``(seed, step)`` (the epoch's permutation is cached)."""

    def __init__(self, seed: int, n: int, batch_size: int) -> None:
        self.seed, self.n, self.bs = seed, n, batch_size
        self.per_epoch = n // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
        self.epoch, self.perm = -1, None

    def __call__(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=g)
        return self.perm[i * self.bs:(i + 1) * self.bs]


def build_run(cfg: RunConfig) -> tuple[Handle, torch.optim.Optimizer]:
    """Model (built with batch-norm placeholders, then converted by the method) and optimizer.

    The model's random init depends on ``cfg.seed`` only, so every method starts from the same
    conv/linear weights for a given seed (a paired comparison).
    """
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, norm="bn", **cfg.model_options)
    handle = apply(model, cfg.method, **cfg.method_options)
    params = [p for p in handle.model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return handle, opt


def _prepare(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2500, channels_last: bool = True) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode on ``(x, y)``, in chunks."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        out = model(_prepare(xs, channels_last))
        loss_sum += float(F.cross_entropy(out.float(), ys, reduction="sum"))
        correct += int((out.argmax(1) == ys).sum())
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def preactivation_percentiles(model: nn.Module, x: Tensor, qs: list[float], channels_last: bool = True) -> list[float]:
    """Percentiles ``qs`` (0..100) of the input of the model's last ``ReLU`` (the last hidden
    layer's pre-activation, after any normalization) on ``x``, in eval mode: the statistic of the
    standardization-loss paper's Figure 4."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("percentiles: the model has no nn.ReLU whose input to record")
    seen: list[Tensor] = []
    # A copy: an in-place ReLU would otherwise overwrite the recorded values.
    hook = relus[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().float().flatten().clone()))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(_prepare(x, channels_last))
    finally:
        hook.remove()
        model.train(was_training)
    q = torch.tensor([v / 100 for v in qs], dtype=torch.float32)
    return torch.quantile(seen[0], q).tolist()


def environment() -> dict:
    """Versions and machine facts recorded with every run."""
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}


def _save_checkpoint(path: str, state: dict) -> None:
    # Atomic: a kill during the write leaves the previous checkpoint intact; the temporary file is
    # the writer's own, so two processes on one path cannot interleave their bytes.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_checkpoint(path: str) -> dict | None:
    # A checkpoint that cannot be read (truncated, not ours) is reported and dropped: the run starts
    # over instead of failing on every retry.
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file, whatever torch.load raises
        warnings.warn(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); starting the run over")
        os.remove(path)
        return None


def train(cfg: RunConfig, data: data_mod.Dataset | None = None, *,
          on_eval: Callable[[dict], None] | None = None, channels_last: bool = True,
          checkpoint: str | None = None) -> RunResult:
    """Train one run and return its curve (see :class:`RunResult`).

    The test set is evaluated at step 0, every ``cfg.eval_every`` steps and at the last step.
    A non-finite loss stops the run: it is recorded as diverged at that step, the curve keeping the
    last finite values; so is a run whose test loss at an evaluation is not finite (the update
    before it diverged). ``on_eval(row)`` is called with each curve row (progress reporting).

    With ``checkpoint`` (a file path) the full training state (model, optimizer, curve, RNG) is
    saved atomically at every evaluation, and a run started with an existing checkpoint of the same
    config resumes from it and ends with the same numbers as an uninterrupted run.
    """
    data = data if data is not None else data_mod.load(cfg.dataset, progress=False)
    handle, opt = build_run(cfg)
    model = handle.model
    std = handle.state.get("std_loss")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    sample = Sampler(cfg.seed, len(data.train_y), cfg.batch_size)
    curve: list[dict] = []
    window = {"loss": 0.0, "aux": 0.0, "correct": 0, "seen": 0, "steps": 0}
    start, elapsed, first = time.perf_counter(), 0.0, 1
    state = _load_checkpoint(checkpoint) if checkpoint and os.path.exists(checkpoint) else None
    if state is not None and state.get("config") == cfg.to_dict():
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        curve, elapsed, first = state["curve"], state["elapsed"], state["step"] + 1
        if on_eval is not None:
            for row in curve:
                on_eval(row)

    def record(step: int) -> bool:
        # False when the test loss is not finite: the update of this step diverged (the row is dropped).
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, channels_last=channels_last)
        if not math.isfinite(test_loss):
            return False
        k = window["steps"]
        row = {"step": step,
               "loss": window["loss"] / k if k else None,
               "aux": window["aux"] / k if k else None,
               "train_acc": window["correct"] / window["seen"] if k else None,
               "test_loss": test_loss, "test_acc": test_acc}
        if cfg.percentiles:
            row["preact"] = preactivation_percentiles(model, data.test_x[:1000], cfg.percentiles, channels_last)
        window.update(loss=0.0, aux=0.0, correct=0, seen=0, steps=0)
        curve.append(row)
        if on_eval is not None:
            on_eval(row)
        if checkpoint and 0 < step < cfg.steps:
            _save_checkpoint(checkpoint, {
                "config": cfg.to_dict(), "step": step, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "curve": curve,
                "elapsed": elapsed + time.perf_counter() - start})
        return True

    diverged_at = None
    if first == 1 and not record(0):
        diverged_at, first = 0, cfg.steps + 1
    for step in range(first, cfg.steps + 1):
        idx = sample(step - 1)
        # Through the std loss's batch(), its first conv's moments come from a per-example table.
        # index_select copies whole rows: about 2% of a step faster than data[idx] on the MNIST CNN.
        x = std.batch(data.train_x, idx) if std is not None else data.train_x.index_select(0, idx)
        x, y = _prepare(x, channels_last), data.train_y.index_select(0, idx)
        out = model(x)
        task = F.cross_entropy(out, y)
        aux = handle.aux_loss()
        loss = task + aux
        task_v, aux_v = task.detach().item(), float(aux.detach())
        if not (math.isfinite(task_v) and math.isfinite(aux_v)):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        handle.before_step()
        opt.step()
        handle.after_step()
        window["loss"] += task_v
        window["aux"] += aux_v
        window["correct"] += int((out.argmax(1) == y).sum())
        window["seen"] += len(y)
        window["steps"] += 1
        if (step % cfg.eval_every == 0 or step == cfg.steps) and not record(step):
            diverged_at = step
            break
    handle.remove()
    if checkpoint and os.path.exists(checkpoint):
        os.remove(checkpoint)
    return RunResult(cfg.to_dict(), curve, diverged_at, elapsed + time.perf_counter() - start, environment())
