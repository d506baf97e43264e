"""Fold batch-statistics normalization into the preceding conv/linear for inference.

In eval mode a batch-statistics layer is a per-channel affine map ``y = x * s + t``; after a conv
or linear layer ``x = W * u + b`` it folds exactly into that layer (Ioffe & Szegedy 2015, arXiv
1502.03167, section 3.2; Jacob et al. 2018, arXiv 1712.05877, for the folding itself)::

    W'[o] = W[o] * s[o],   b'[o] = b[o] * s[o] + t[o]

``s, t`` come from

* ``nn.BatchNorm1d/2d/3d`` (any ``_BatchNorm`` with running statistics):
  ``s = gamma / sqrt(running_var + eps)``, ``t = beta - running_mean * s`` (``gamma = 1`` when the
  weight is ``None``, as for shift-only BN; ``beta = 0`` when the bias is ``None``);
* any layer with the folding protocol's ``eval_affine() -> (scale, shift)`` (L1/top-k BN,
  estimated BN, ...);
* the standardization loss's ``ChannelAffine``: ``s = weight``, ``t = bias``.

:func:`fold` returns a model with those layers replaced by ``nn.Identity``, the std-loss probes
replaced by ``nn.Identity``, every module hook removed and every weight parametrization
(``torch.nn.utils.parametrize``, and the legacy hook-based ``weight_norm``/``spectral_norm``)
baked into a plain weight. Layers that cannot fold (group/layer norm, a norm not directly after a
conv/linear, a conv whose output has other users, a module called more than once or reachable
under two names, a conv whose weight or bias is tied to another module) stay and are named in a
warning; :func:`fold_report` returns the same information as a :class:`FoldReport`.

Finding "directly after": the model is traced with ``torch.fx`` (norm and conv/linear layers as
leaves); a norm folds when its input is the output of a conv/linear node that has no other user
(``nn.Identity`` and already-folded norms in between are skipped). When tracing fails (data-
dependent control flow), plain ``nn.Sequential`` containers are scanned for adjacent pairs
instead.

A norm after a ``Linear`` folds only where the ``Linear``'s output is ``(N, C)``: on ``(N, L, F)``
(a sequence) a ``BatchNorm1d`` normalizes dim 1, not the ``Linear``'s features, and does not fold.
The layout is not in the module graph, so such a norm is replaced by a guard (an ``nn.Identity``
that raises on input that is not 2-D) instead of silently giving wrong outputs; pass an
``example`` input to :func:`fold` to have the layout seen and such norms kept.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ._common import own_class, running_affine
from .registry import OTHER_NORMS, norm_types
from .std_loss import _Probe

__all__ = ["fold", "fold_report", "FoldReport"]

_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_Pairs = list[tuple[str, str, tuple[Tensor, Tensor]]]  # (norm name, conv/linear name, (scale, shift))
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


@dataclass
class FoldReport:
    """What :func:`fold` does to a model (all names are qualified module names).

    ``folded`` maps each folded norm to the conv/linear it went into; ``kept`` maps each
    normalization layer that stays to the reason; ``probes`` lists the std-loss probes removed;
    ``baked`` the parametrized tensors baked into plain ones (``"conv.weight"``); ``hooks`` counts
    the module hooks removed; ``tracer`` is ``"fx"`` or ``"sequential"`` (the fallback).
    """

    folded: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)
    hooks: int = 0
    tracer: str = "fx"

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} layer(s) (found by {self.tracer}); removed {len(self.probes)} "
                 f"probe(s), {self.hooks} hook(s); baked {len(self.baked)} parametrization(s)"]
        lines += [f"  {n} -> {c}" for n, c in self.folded.items()]
        lines += [f"  kept {n or '(the model)'}: {why}" for n, why in self.kept.items()]
        return "\n".join(lines)


def _affine(m: nn.Module) -> tuple[Tensor, Tensor] | str:
    """``(scale, shift)`` of an eval-mode per-channel affine norm, or the reason it has none."""
    if callable(getattr(m, "eval_affine", None)):  # the protocol first, also for BatchNorm subclasses
        try:
            scale, shift = m.eval_affine()
        except (RuntimeError, ValueError) as err:  # e.g. a layer configured without running estimates
            return f"eval_affine() failed: {err}"
        return scale.detach().double(), shift.detach().double()
    if isinstance(m, _BatchNorm):
        if m.running_mean is None or m.running_var is None or not m.track_running_stats:
            return "uses batch statistics in eval (track_running_stats=False)"
        return running_affine(m.running_mean.double(), m.running_var.double(),
                              None if m.weight is None else m.weight.double(),
                              None if m.bias is None else m.bias.double(), m.eps)
    return f"{type(m).__name__} is not a per-channel affine map in eval"


def _is_foldable_kind(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or callable(getattr(m, "eval_affine", None))


def _is_norm(m: nn.Module) -> bool:
    return _is_foldable_kind(m) or isinstance(m, OTHER_NORMS + norm_types())


@torch.no_grad()
def _fold_pair(conv: nn.Module, scale: Tensor, shift: Tensor) -> None:
    w = conv.weight
    out = w.shape[0]
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        g = conv.groups
        view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])  # (groups, in/g, out/g, *k)
        s = scale.view(g, 1, -1, *([1] * (w.dim() - 2)))
        view.copy_((view.double() * s).to(w.dtype))
    else:
        w.copy_((w.double() * scale.view(out, *([1] * (w.dim() - 1)))).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(device=w.device, dtype=w.dtype))
    else:
        conv.bias.copy_((conv.bias.double() * scale + shift).to(conv.bias.dtype))


class _FoldedAfterLinear(nn.Identity):
    """``nn.Identity`` in place of a norm folded into the ``Linear`` before it, which is right only for
    that ``Linear``'s ``(N, C)`` output: on any other input it raises, naming the layers (with
    ``torch._assert``, so that the folded model still traces with ``torch.fx``)."""

    def __init__(self, norm: str, linear: str) -> None:
        super().__init__()
        self.norm, self.linear = norm, linear
        self.message = (
            f"fold: '{norm}' was folded into the Linear '{linear}' for its (N, C) output, but gets input that is "
            "not 2-D: there it normalizes dim 1, not the Linear's features, and does not fold, so this folded "
            "model is wrong for such input. Fold with an example input, fold(model, example=x), which keeps "
            "that layer, or run the model unfolded in eval mode")

    def forward(self, x: Tensor) -> Tensor:
        torch._assert(x.dim() == 2, self.message)
        return x

    def extra_repr(self) -> str:
        return f"folded into {self.linear!r} for (N, C) input"


def _linear_layouts(model: nn.Module, names: set[str], example: object) -> dict[str, int]:
    # The number of dims of each named Linear's output when model (in eval mode) runs on example.
    dims: dict[str, int] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: dims.__setitem__(n, out.dim() if isinstance(out, Tensor) else -1)) for n in names]
    try:
        with torch.no_grad():
            model(*example) if isinstance(example, tuple) else model(example)
    except Exception as err:
        raise ValueError(f"example: the model did not run on it ({type(err).__name__}: {err}); pass an input "
                         "the model takes (a tensor, or a tuple of its positional arguments)") from err
    finally:
        for h in handles:
            h.remove()
    return dims


def _out_channels(conv: nn.Module) -> int:
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


@torch.no_grad()
def _check(norm: nn.Module, conv: nn.Module, conv_name: str) -> tuple[Tensor, Tensor] | str:
    """``(scale, shift)`` to fold ``norm`` into ``conv``, or the reason it cannot fold."""
    affine = _affine(norm)
    if isinstance(affine, str):
        return affine
    scale, shift = affine
    if scale.shape != (_out_channels(conv),) or shift.shape != scale.shape:
        return f"its {tuple(scale.shape)} channels do not match the {_out_channels(conv)} outputs of {conv_name}"
    return affine


def _not_alone(model: nn.Module) -> dict[int, str]:
    """Why a module must not be folded into or replaced, by ``id``: it is reachable under more than
    one name (replacing one name would leave it in use under the other), or owns a parameter that
    another module also owns (folding would change that module too)."""
    names: dict[int, list[str]] = {}
    owners: dict[int, set[int]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name or "<root>")
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    why: dict[int, str] = {}
    for name, m in model.named_modules():
        if len(names[id(m)]) > 1:
            why[id(m)] = f"{name} is reachable under {len(names[id(m)])} names ({', '.join(names[id(m)])})"
        elif any(p is not None and len(owners[id(p)]) > 1 for p in m._parameters.values()):
            why[id(m)] = f"{name} shares a parameter with another module (tied weights)"
    return why


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_norm(m) or isinstance(m, _INTO) or super().is_leaf_module(m, qualname)


def _pairs_fx(model: nn.Module, graph: torch.fx.Graph) -> tuple[_Pairs, dict[str, str]]:
    """(norm, conv, (scale, shift)) in forward order, and the reasons for norms that cannot fold."""
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, kept, transparent = [], {}, set()
    alone = _not_alone(model)
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(mods[node.target]):
            continue
        name = node.target
        if id(mods[name]) in alone:
            kept[name] = alone[id(mods[name])]
            continue
        if calls[name] > 1:
            kept[name] = f"called {calls[name]} times in forward (shared module)"
            continue
        if not _is_foldable_kind(mods[name]):
            kept[name] = _affine(mods[name])
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            kept[name] = "called with extra arguments"
            continue
        prev, sole = node.args[0], True
        # skip nn.Identity and norms already folded into the producer
        while prev.op == "call_module" and (isinstance(mods[prev.target], nn.Identity) or prev.target in transparent):
            sole &= len(prev.users) == 1
            if len(prev.args) != 1 or not isinstance(prev.args[0], torch.fx.Node):
                break
            prev = prev.args[0]
        if not (prev.op == "call_module" and isinstance(mods[prev.target], _INTO)):
            kept[name] = "not directly after a conv/linear"
        elif len(prev.users) != 1 or not sole:
            kept[name] = f"the output of {prev.target} has other users besides this norm"
        elif calls[prev.target] > 1:
            kept[name] = f"{prev.target} is called {calls[prev.target]} times in forward (shared module)"
        elif id(mods[prev.target]) in alone:
            kept[name] = alone[id(mods[prev.target])]
        else:
            affine = _check(mods[name], mods[prev.target], prev.target)
            if isinstance(affine, str):
                kept[name] = affine
            else:
                pairs.append((name, prev.target, affine))
                transparent.add(name)
    return pairs, kept


def _pairs_sequential(model: nn.Module) -> tuple[_Pairs, dict[str, str]]:
    """Fallback: adjacent (conv/linear, norm) children of plain ``nn.Sequential`` containers."""
    alone = _not_alone(model)
    pairs: _Pairs = []
    kept: dict[str, str] = {}
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        prefix = f"{name}." if name else ""
        prev: tuple[str, nn.Module] | None = None
        for child_name, child in seq.named_children():
            full = prefix + child_name
            if isinstance(child, nn.Identity):
                continue
            if _is_foldable_kind(child) and prev is not None and isinstance(prev[1], _INTO):
                reason = alone.get(id(child)) or alone.get(id(prev[1]))
                affine = reason if reason is not None else _check(child, prev[1], prev[0])
                if isinstance(affine, str):
                    kept[full] = affine
                else:
                    pairs.append((full, prev[0], affine))
                    continue  # a folded norm is transparent: the conv stays the producer
            prev = (full, child)
    return pairs, kept


def _bake_and_strip(model: nn.Module, report: FoldReport) -> None:
    for name, m in list(model.named_modules()):
        for hook in list(m._forward_pre_hooks.values()):  # legacy hook-based weight/spectral norm
            kind = type(hook).__name__
            if kind in ("WeightNorm", "SpectralNorm"):
                remover = nn.utils.remove_weight_norm if kind == "WeightNorm" else nn.utils.remove_spectral_norm
                remover(m, hook.name)
                report.baked.append(f"{name}.{hook.name}" if name else hook.name)
        if parametrize.is_parametrized(m):
            own_class(m)
            for tensor_name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, tensor_name, leave_parametrized=True)
                report.baked.append(f"{name}.{tensor_name}" if name else tensor_name)
    for name, m in model.named_modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks:
                report.hooks += len(hooks)
                hooks.clear()
    for name, m in list(model.named_modules()):
        if name and type(m) is _Probe:
            model.set_submodule(name, nn.Identity().eval())
            report.probes.append(name)


def _copy(model: nn.Module) -> nn.Module:
    # A legacy hook-based weight/spectral norm keeps a non-leaf weight tensor, which deepcopy
    # refuses; copy that tensor detached (fold bakes it anyway).
    memo: dict[int, object] = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if type(hook).__name__ not in ("WeightNorm", "SpectralNorm"):
                continue
            t = getattr(m, hook.name, None)
            if isinstance(t, Tensor) and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _fold(model: nn.Module, example: object = None) -> tuple[nn.Module, FoldReport]:
    report = FoldReport()
    model.eval()
    _bake_and_strip(model, report)
    try:
        graph = _Tracer().trace(model)
    except Exception:  # tracing fails on data-dependent control flow: fall back to Sequentials
        pairs, kept = _pairs_sequential(model)
        report.tracer = "sequential"
    else:
        pairs, kept = _pairs_fx(model, graph)
    linears = {conv for _, conv, _ in pairs if isinstance(model.get_submodule(conv), nn.Linear)}
    if example is not None and linears:
        dims = _linear_layouts(model, linears, example)
        for norm_name, conv_name, _ in pairs:
            if dims.get(conv_name, 2) != 2:
                kept[norm_name] = (f"after the Linear {conv_name}, whose output on the example has {dims[conv_name]} "
                                   "dims: a norm normalizes dim 1 there, not the Linear's features")
        pairs = [pair for pair in pairs if pair[0] not in kept]
    for norm_name, conv_name, (scale, shift) in pairs:
        _fold_pair(model.get_submodule(conv_name), scale, shift)
        guard = _FoldedAfterLinear(norm_name, conv_name) if conv_name in linears else nn.Identity()
        model.set_submodule(norm_name, guard.eval())
        report.folded[norm_name] = conv_name
    for name, m in model.named_modules():
        if name and _is_norm(m) and name not in report.folded and name not in kept:
            kept[name] = ("not found in the traced forward" if report.tracer == "fx"
                          else "not directly after a conv/linear in an nn.Sequential")
    if _is_norm(model):
        kept[""] = "the model itself is the normalization layer; there is no conv/linear to fold it into"
    report.kept = dict(sorted(kept.items()))
    return model, report


def fold(model: nn.Module, *, inplace: bool = False, warn: bool = True, example: object = None) -> nn.Module:
    """An eval-mode copy of ``model`` (or ``model`` itself with ``inplace=True``) with every
    batch-statistics layer folded into the conv/linear before it.

    ``W'[o] = W[o] * s[o]`` and ``b'[o] = b[o] * s[o] + t[o]`` for each norm that is ``y = x * s + t``
    in eval (see the module docstring for ``s, t`` of each layer type); the conv gets a bias if it
    had none and the norm becomes ``nn.Identity``. Also removes std-loss probes and all module
    hooks and bakes weight parametrizations into plain weights. Normalization layers that cannot
    fold stay and, with ``warn=True``, are listed in a ``UserWarning``; :func:`fold_report` gives
    the details without changing anything.

    ``example``: an input of the model (a tensor, or a tuple of its positional arguments), run once
    in eval mode without gradients to see each ``Linear``'s output layout; a norm after a ``Linear``
    whose output is not ``(N, C)`` then stays (see the module docstring). Without it such a norm is
    folded as if the output were ``(N, C)``, behind a guard that raises on any other input.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _copy(model)
    model, report = _fold(model, example)
    if warn and report.kept:
        listed = "; ".join(f"{n or '(the model)'} ({why})" for n, why in report.kept.items())
        warnings.warn(f"fold: {len(report.kept)} normalization layer(s) could not be folded and stay in "
                      f"the model: {listed}", UserWarning, stacklevel=2)
    return model


def fold_report(model: nn.Module, *, example: object = None) -> FoldReport:
    """What :func:`fold` would do to ``model`` (computed on a copy; ``model`` is not changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _fold(_copy(model), example)[1]
