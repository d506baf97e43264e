"""One registry of normalization methods and one way to apply them to any model.

A method registers itself once, with a name, a one-line description and either

* a ``layer`` factory ``layer(num_features, dims, **options) -> nn.Module``: a normalization layer.
  Models are built with it (``norm="bn"``) and ``apply`` swaps it in for every normalization layer
  of an existing model (``BatchNorm*d`` and every registered normalization layer type), or
* an ``apply`` function ``fn(handle, **options)`` that prepares ``handle.model`` and adds auxiliary
  losses or optimizer-step hooks to the handle (the standardization loss, weight transforms, ...).

``apply(model, "ws+gn", **options)`` applies one method or a ``+`` combination and returns a
:class:`Handle`, which the training engine uses the same way for every method::

    handle = normlab.apply(model, "std_loss", weight=1.0)
    loss = task_loss(handle.model(x), y) + handle.aux_loss()
    loss.backward(); handle.before_step(); opt.step(); handle.after_step()
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["Handle", "Method", "register", "register_norm_type", "list_methods", "apply", "norm_layer",
           "swap_norms", "strip_norms", "norm_types", "get_method", "OTHER_NORMS"]

# kinds: "norm" replaces normalization layers (at most one per combination), "weight" transforms
# weights, "loss" adds an auxiliary loss, "step" acts around the optimizer step.
KINDS = ("norm", "weight", "loss", "step")


@dataclass(frozen=True)
class Method:
    """A registered method: its name, one-line description, kind, and how to apply it."""

    name: str
    description: str
    kind: str
    apply: Callable[..., None]
    layer: Callable[..., nn.Module] | None = None
    options: tuple[str, ...] = ()
    writes_weights: bool = False
    defaults: dict[str, object] = field(default_factory=dict)  # the options' default values


_METHODS: dict[str, Method] = {}
# SyncBatchNorm takes any (N, C, ...) input; it is taken for images, its common use (a replacement
# built for 2-D input names the shape it gets otherwise).
_NORM_TYPES: dict[type, int | None] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: 2,
                                       nn.LazyBatchNorm1d: 1, nn.LazyBatchNorm2d: 2, nn.LazyBatchNorm3d: 3}
# Normalization layers that are not batch norm's kind (per sample, or over other dims): swap_norms
# leaves them, strip_norms removes them too.
OTHER_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
                                 nn.LocalResponseNorm, nn.RMSNorm)


@dataclass
class Handle:
    """What :func:`apply` returns: the prepared model, its auxiliary losses and step hooks.

    ``aux_loss()`` sums the auxiliary losses recorded during the last forward pass (a zero tensor
    when the methods add none), ``before_step()`` runs after ``backward`` and before
    ``optimizer.step()`` (gradient transforms), ``after_step()`` after it (weight projections).
    ``remove()`` takes off every hook the methods attached. ``swapped`` lists the replaced layers;
    ``state`` holds each method's own objects by method name (e.g. the ``StandardizationLoss``).
    """

    model: nn.Module
    spec: str = ""
    losses: list[Callable[[], Tensor]] = field(default_factory=list)
    pre_step: list[Callable[[], None]] = field(default_factory=list)
    post_step: list[Callable[[], None]] = field(default_factory=list)
    removers: list[Callable[[], None]] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    state: dict[str, object] = field(default_factory=dict)

    def aux_loss(self) -> Tensor:
        """Sum of the auxiliary losses recorded since the previous call, normally those of the last
        forward pass (a 0 tensor if none)."""
        total: Tensor | None = None
        for loss in self.losses:
            value = loss()
            total = value if total is None else total + value
        return torch.zeros(()) if total is None else total

    def before_step(self) -> None:
        """Run the methods' gradient hooks (call between ``backward()`` and ``optimizer.step()``)."""
        for fn in self.pre_step:
            fn()

    def after_step(self) -> None:
        """Run the methods' post-update hooks (call right after ``optimizer.step()``)."""
        for fn in self.post_step:
            fn()

    def remove(self) -> None:
        """Remove every hook the methods attached (layer swaps stay), in the order they were applied:
        weight parametrizations stacked on one weight (``ws+bwn``) are baked from the first, the only
        one that can be baked alone, so the weights keep the values the model computes with."""
        for fn in self.removers:
            fn()
        self.removers.clear()
        self.losses.clear()
        self.pre_step.clear()
        self.post_step.clear()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_norm_type(cls: type, dims: int | None = None) -> type:
    """Declare ``cls`` a normalization layer that :func:`swap_norms` must find (``dims``: spatial dims)."""
    _NORM_TYPES[cls] = dims
    return cls


def norm_types() -> tuple[type, ...]:
    """Every layer type that counts as a normalization layer for swapping and stripping."""
    return tuple(_NORM_TYPES)


def _options(fn: Callable[..., object], skip: int) -> dict[str, object]:
    # The keyword options of fn after its first `skip` parameters, with their defaults (or empty).
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p.default for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def register(name: str, description: str, *, kind: str = "norm",
             layer: Callable[..., nn.Module] | None = None, writes_weights: bool = False):
    """Register a method under ``name``; use as a decorator on its apply function ``fn(handle, **opts)``.

    For a plain normalization layer pass ``layer=`` and call ``register(...)(None)``: the apply
    function is then the generic swap of every normalization layer for ``layer(num_features, dims)``.
    ``writes_weights=True`` says that the apply function changes parameter or buffer values in
    place, so that :func:`apply` keeps a copy to put back if a later part of a spec fails.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: Callable[..., None] | None):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if fn is None:
            if layer is None:
                raise ValueError(f"method {name!r} needs an apply function or a layer factory")

            def fn(handle: Handle, **options) -> None:
                _swap_apply(handle, name, layer, options)

            options = _options(layer, 2)
        else:
            options = _options(fn, 1)
        defaults = {k: v for k, v in options.items() if v is not inspect.Parameter.empty}
        _METHODS[name] = Method(name, description, kind, fn, layer, tuple(options), writes_weights, defaults)
        return fn

    return deco


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error listing the names otherwise."""
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> dict[str, str]:
    """Every registered method name with its one-line description, sorted by name."""
    _load_builtin()
    return {name: _METHODS[name].description for name in sorted(_METHODS)}


def norm_layer(name: str, num_features: int, dims: int | None = 2, **options) -> nn.Module:
    """Build the normalization layer of method ``name`` for ``num_features`` channels.

    ``dims`` is the number of spatial dims of the input (0 for (N, C), 1 for (N, C, L), 2 for
    images). Used by :mod:`normlab.models`, which never name a normalization themselves.
    """
    method = get_method(name)
    if method.layer is None:
        layered = sorted(n for n, m in _METHODS.items() if m.layer is not None)
        raise ValueError(
            f"method {name!r} is not a normalization layer and cannot be built into a model; "
            f"build the model with one of {layered} and then call normlab.apply(model, {name!r})"
        )
    _check_options(method, options)
    return method.layer(num_features, dims, **options)


def _features_and_dims(module: nn.Module) -> tuple[int, int | None]:
    # The registered type itself or its nearest registered base (a subclass of nn.BatchNorm2d).
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise TypeError(f"{type(module).__name__} has not seen an input yet, so its channel count is unknown: "
                        "run one forward pass before converting the model")
    dims = next((_NORM_TYPES[c] for c in type(module).__mro__ if c in _NORM_TYPES), None)
    if dims is None:
        dims = getattr(module, "spatial_dims", None)
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr)), dims
    raise TypeError(f"cannot tell the channel count of {type(module).__name__}")


def swap_norms(model: nn.Module, factory: Callable[[int, int | None], nn.Module]) -> list[str]:
    """Replace every normalization layer of ``model`` in place by ``factory(num_features, dims)``.

    Finds ``BatchNorm*d`` and every registered normalization type at any depth (nested modules,
    ``nn.Sequential``, ``nn.ModuleList``/``ModuleDict``), keeps channel counts, device and dtype,
    and returns the qualified names of the replaced layers (the first name of a layer reachable
    under several). The root module itself is not replaced.
    """
    # All replacements are built before any is put in, so a factory that fails leaves the model as it was.
    targets = _outermost(model, norm_types())
    new_of: dict[int, nn.Module] = {}
    for name, old in targets:
        if id(old) in new_of:
            continue
        try:
            new = factory(*_features_and_dims(old))
        except (TypeError, ValueError) as e:
            raise type(e)(f"cannot replace {name} ({type(old).__name__}): {e}") from None
        # Device and dtype from the layer's own tensors; a layer without any (affine=False and no
        # running statistics) takes the model's.
        ref = next(itertools.chain(old.parameters(), old.buffers()), None)
        if ref is None:
            ref = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
        if ref is not None:
            new = new.to(device=ref.device)
            if ref.is_floating_point():
                new = new.to(dtype=ref.dtype)
        new.train(old.training)
        new_of[id(old)] = new
    firsts: dict[int, str] = {}
    for name, old in targets:
        model.set_submodule(name, new_of[id(old)])
        firsts.setdefault(id(old), name)
    return list(firsts.values())


def strip_norms(model: nn.Module) -> list[str]:
    """Replace every normalization layer of ``model`` in place by ``nn.Identity`` (``y = x``): those
    :func:`swap_norms` finds and the per-sample ones it leaves (``GroupNorm``, ``LayerNorm``,
    ``InstanceNorm*d``, ``LocalResponseNorm``, ``RMSNorm``). Returns the qualified names replaced
    (the first name of a layer reachable under several); the root module is not replaced."""
    firsts: dict[int, str] = {}
    for name, old in _outermost(model, norm_types() + OTHER_NORMS):
        model.set_submodule(name, nn.Identity())
        firsts.setdefault(id(old), name)
    return list(firsts.values())


def _outermost(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    # Every name of every layer of `types` (a layer reachable as self.bn and self.blocks[0] is
    # listed under both), except those inside another such layer, under any of that one's names:
    # a registered norm built from a BatchNorm2d is replaced whole, not also from within.
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if name and isinstance(m, types)]
    names = {name for name, _ in found}
    return [(name, m) for name, m in found
            if not any(".".join(name.split(".")[:i]) in names for i in range(1, name.count(".") + 1))]


def _swap_apply(handle: Handle, name: str, layer: Callable[..., nn.Module], options: dict) -> None:
    swapped = swap_norms(handle.model, lambda nf, dims: layer(nf, dims, **options))
    if not swapped:
        if isinstance(handle.model, norm_types()):
            raise ValueError(f"method {name!r} replaces normalization layers inside a model, never the model "
                             f"itself, which is a {type(handle.model).__name__}: wrap it (nn.Sequential(layer))")
        raise ValueError(
            f"method {name!r} replaces normalization layers, but the model has none "
            f"(looked for {', '.join(t.__name__ for t in norm_types())}); build the model with "
            "norm='bn' placeholders (normlab.models do) or insert BatchNorm layers where the "
            "normalization should go"
        )
    handle.swapped.extend(swapped)


def _check_options(method: Method, options: dict) -> None:
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        allowed = ", ".join(method.options) or "none"
        raise TypeError(f"method {method.name!r} got unknown option(s) {unknown}; allowed: {allowed}")


def parse_spec(spec: str) -> list[Method]:
    """Split ``"ws+gn"`` into registered methods and check the combination is compatible."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a method name or names joined by '+', got {spec!r}; "
                         f"available: {', '.join(list_methods())}")
    parts = [get_method(p.strip()) for p in spec.split("+")]
    names = [m.name for m in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"spec {spec!r} names a method twice")
    norms = [m.name for m in parts if m.kind == "norm"]
    if len(norms) > 1:
        raise ValueError(
            f"spec {spec!r} combines {norms}, which each replace the normalization layers; "
            "keep one of them (combine it with weight/loss/step methods such as ws, bwn, msr)"
        )
    return parts


def _route(parts: Iterable[Method], options: dict) -> dict[str, dict]:
    parts = list(parts)
    routed: dict[str, dict] = {m.name: {} for m in parts}
    for key, value in options.items():
        if "." in key:
            target, _, opt = key.partition(".")
            if target not in routed:
                raise TypeError(f"option {key!r} names method {target!r}, which is not in the spec")
            routed[target][opt] = value
            continue
        takers = [m.name for m in parts if key in m.options]
        if not takers:
            allowed = {m.name: list(m.options) for m in parts}
            raise TypeError(f"unknown option {key!r}; options by method: {allowed}")
        if len(takers) > 1:
            raise TypeError(f"option {key!r} is accepted by {takers}; pass it as "
                            f"'{takers[0]}.{key}' to say which")
        routed[takers[0]][key] = value
    for m in parts:
        _check_options(m, routed[m.name])
    return routed


def normalize_options(spec: str, options: dict) -> dict:
    """``options`` with every int given for an option whose default is a float made that float
    (``weight=1`` and ``weight=1.0`` are one setting, so they give one run id). Keys and values are
    otherwise left as they are, for :func:`apply` to check."""
    try:
        parts = {m.name: m for m in parse_spec(spec)}
    except (ValueError, KeyError, TypeError):
        return dict(options)
    out = {}
    for key, value in options.items():
        if isinstance(value, int) and not isinstance(value, bool):
            target, _, opt = key.rpartition(".")
            owners = [parts[target]] if target in parts else [m for m in parts.values() if opt in m.options]
            defaults = [m.defaults.get(opt) for m in owners]
            if defaults and all(isinstance(d, float) for d in defaults):
                value = float(value)
        out[key] = value
    return out


def apply(model: nn.Module, spec: str, **options) -> Handle:
    """Apply method ``spec`` (a registered name or a ``+`` combination) to ``model`` in place.

    Options go to the method that accepts them; ``"name.option"`` keys say which method when
    several accept the same option. Normalization-layer methods are applied first, then the
    others in the order given. Returns a :class:`Handle` with the model, auxiliary losses and
    optimizer-step hooks. Unknown names, incompatible combinations, unknown options and models with
    nothing to convert raise errors listing what is available.

    All or nothing: when a part raises (a bad option value found by the method itself, a model it
    cannot convert), every module's class, children, parameters, buffers and hooks are put back
    before the error propagates, so the same model can be passed again. Parameter values are put
    back too when a part is registered with ``writes_weights`` (``msr`` initializes the weights in
    place): for such a spec, ``apply`` keeps a copy of the parameters and buffers while it runs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    parts = parse_spec(spec)
    routed = _route(parts, options)
    handle = Handle(model=model, spec=spec)
    restore = _snapshot(model, copy_values=any(m.writes_weights for m in parts))
    try:
        for method in sorted(parts, key=lambda m: m.kind != "norm"):
            method.apply(handle, **routed[method.name])
    except BaseException as e:
        # Not handle.remove(): the removers bake parametrizations into the weights and can refuse;
        # putting the dicts back removes everything the parts attached.
        lost = restore()
        restore = None  # the snapshot is not kept alive by the traceback
        if lost:
            e.add_note(f"apply({spec!r}) was rolled back, but the values of {lost} had been changed in "
                       "place by a method not registered with writes_weights=True and stay changed")
        raise
    return handle


def _snapshot(model: nn.Module, copy_values: bool) -> Callable[[], list[str]]:
    # What a failed apply() puts back: each module's attributes (its class, and the contents of its
    # own dicts: children, parameters, buffers, hooks, kept in the same dict objects so that hook
    # handles stay valid); the attributes of an already parametrized module's own class, to which
    # torch.nn.utils.parametrize adds a property for each new parametrized tensor; and, with
    # copy_values, the values of the parameters and buffers. restore() returns the names of the
    # tensors changed in place that it could not put back (no copy).
    modules = [(m, m.__class__, {k: (v, dict(v) if isinstance(v, dict) else None) for k, v in vars(m).items()})
               for m in model.modules()]
    classes = {type(m): dict(vars(type(m))) for m in model.modules() if parametrize.is_parametrized(m)}
    tensors = [(name, t, t._version, t.clone() if copy_values else None)
               for name, t in (*model.named_parameters(), *model.named_buffers()) if not nn.parameter.is_lazy(t)]

    def restore() -> list[str]:
        for cls, attrs in classes.items():
            for k in [k for k in vars(cls) if k not in attrs]:
                delattr(cls, k)
            for k, v in attrs.items():
                if vars(cls).get(k) is not v:
                    setattr(cls, k, v)
        for m, cls, attrs in modules:
            m.__class__ = cls
            vars(m).clear()
            for k, (v, content) in attrs.items():
                if content is not None:
                    v.clear()
                    v.update(content)
                vars(m)[k] = v
        lost = []
        with torch.no_grad():
            for name, t, version, saved in tensors:
                if t._version != version:
                    if saved is None:
                        lost.append(name)
                    else:
                        t.copy_(saved)
        return lost

    return restore


_LOADED = False


def _load_builtin() -> None:
    # Import the method modules once so that they register themselves.
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import importlib

        importlib.import_module("normlab.methods").load_all()
