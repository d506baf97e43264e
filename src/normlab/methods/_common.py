"""Small helpers shared by the method modules (not a method itself; not part of the public API)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = CONVS + (nn.Linear,)  # the layers with a weight to standardize, bound or probe


def running_affine(running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
    """The eval-mode map of a running-statistics norm as ``y = x * scale + shift``:
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale`` (the
    folding protocol's ``eval_affine()``; a missing weight or bias counts as 1 or 0)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def pick_by_dims(name: str, one: type, two: type, dims: int | None) -> type:
    """The 1d class for ``dims`` 0 or 1 ((N, C) or (N, C, L) input), the 2d class for images."""
    if dims in (0, 1):
        return one
    if dims == 2:
        return two
    raise ValueError(f"{name} supports dims 0 or 1 ((N, C) or (N, C, L) input) and 2 (images), got dims={dims!r}")


def check_number(value: float, name: str, *, positive: bool, why: str = "") -> float:
    """``float(value)``; a ``ValueError`` naming ``name`` unless ``value`` is a finite real number,
    ``> 0`` when ``positive`` else ``>= 0`` (``why``, if given, is said in parentheses)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value)
                                       and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}"
                         f"{f' ({why})' if why else ''}, got {value!r}")
    return float(value)


def check_layer_args(num_features: int, eps: float) -> None:
    """Raise ``ValueError`` unless ``num_features`` is a positive int and ``eps`` a finite number > 0
    (the arguments every normalization layer takes)."""
    if isinstance(num_features, bool) or not (isinstance(num_features, int) and num_features > 0):
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    check_number(eps, "eps", positive=True, why="it is added to the variance")


def check_input(module: nn.Module, x: Tensor, ndims: tuple[int, ...]) -> None:
    """Raise a clear error unless ``x`` is a floating-point tensor with one of ``ndims`` dims and
    ``module.num_features`` channels."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{type(module).__name__} normalizes floating-point tensors, got {got}; convert the input "
                        "with .float()")
    if x.dim() not in ndims:
        shapes = " or ".join({2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}[d] for d in ndims)
        name = type(module).__name__
        hint = ""
        if name.endswith("2d") and x.dim() in (2, 3):
            hint = "; use the 1d variant for that shape"
        elif name.endswith("1d") and x.dim() == 4:
            hint = "; use the 2d variant for that shape"
        raise ValueError(f"{name} expects {shapes} input, got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != module.num_features:
        raise ValueError(f"{type(module).__name__}({module.num_features}) got {x.shape[1]} channels "
                         f"(dim 1) in input of shape {tuple(x.shape)}")


def values_per_channel(x: Tensor) -> int:
    """Values per channel of ``x`` in training (every dim but dim 1); raises the ``ValueError`` of
    ``nn.BatchNorm`` when there is one, as batch statistics then have no variance."""
    n = x.numel() // x.shape[1]
    if n < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}")
    return n


def init_running_stats(module: nn.Module, num_features: int, affine: bool, device=None, dtype=None,
                       prefix: str = "") -> None:
    """Register BN-style ``<prefix>weight``/``<prefix>bias`` (ones/zeros, or None without ``affine``)
    and the ``running_mean`` (0), ``running_var`` (1) and ``num_batches_tracked`` buffers."""
    factory = {"device": device, "dtype": dtype}
    for pname, init in (("weight", torch.ones), ("bias", torch.zeros)):
        module.register_parameter(prefix + pname, nn.Parameter(init(num_features, **factory)) if affine else None)
    module.register_buffer("running_mean", torch.zeros(num_features, **factory))
    module.register_buffer("running_var", torch.ones(num_features, **factory))
    module.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))


def own_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of its class. ``parametrize.remove_parametrizations`` deletes the
    parametrized property from the module's class, which a deep copy of the model shares with the
    original; with its own class, removing it from a copy leaves the original intact."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__,
                            {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})


def remove_one_parametrization(module: nn.Module, name: str, cls: type, bake: bool, what: str) -> None:
    """Remove the parametrization of type ``cls`` from ``module.<name>``, keeping any others;
    ``bake=True`` keeps its effect in the weight (possible only when it is the first of the stack)."""
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"{what}: {type(module).__name__}.{name} carries no {cls.__name__} (it is not parametrized)")
    plist = module.parametrizations[name]
    idx = [i for i, p in enumerate(plist) if isinstance(p, cls)]
    if not idx:
        raise ValueError(f"{what}: {type(module).__name__}.{name} carries no {cls.__name__}")
    i = idx[0]
    if len(plist) == 1:
        own_class(module)
        parametrize.remove_parametrizations(module, name, leave_parametrized=bake)
        return
    if bake and i != 0:
        raise ValueError(f"{what}: {cls.__name__} is not the first of the parametrizations of "
                         f"{type(module).__name__}.{name}, so it cannot be baked alone; pass bake=False "
                         "or remove the parametrizations applied before it first")
    if bake:
        with torch.no_grad():
            plist.original.copy_(plist[0](plist.original))
    del plist[i]


def weight_of(module: nn.Module, name: str, what: str) -> Tensor:
    """``module.<name>``, checked to be a tensor of at least 2 dims (out, in, *kernel)."""
    w = getattr(module, name, None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{what}: {type(module).__name__} has no tensor {name!r}")
    if w.dim() < 2:
        raise ValueError(f"{what}: {type(module).__name__}.{name} has shape {tuple(w.shape)}; it needs "
                         "(out, in, *kernel) with at least 2 dims")
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and name == "weight":
        raise ValueError(f"{what}: {type(module).__name__} stores its weight as (in, out / groups, *kernel), so a "
                         "per-output-filter transform would act on its input channels; leave it out (modules=[...])")
    return w


def resolve_modules(model: nn.Module, modules: Sequence[nn.Module | str] | nn.Module | str,
                    what: str) -> list[tuple[str, nn.Module]]:
    """``modules`` (modules of ``model`` or qualified names) as ``(name, module)`` pairs."""
    if isinstance(modules, (nn.Module, str)):
        modules = [modules]
    if not isinstance(modules, Iterable):
        raise TypeError(f"{what}: pass a module, a qualified name, or a list of them; got {type(modules).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for m in modules:
        if isinstance(m, str):
            try:
                sub = model.get_submodule(m)
            except AttributeError:
                avail = [n for n, mm in model.named_modules() if isinstance(mm, LAYERS)]
                raise ValueError(f"{what}: model has no submodule {m!r}; conv/linear layers: {avail}") from None
            out.append((m, sub))
        elif isinstance(m, nn.Module):
            if id(m) not in names:
                raise ValueError(f"{what}: a {type(m).__name__} given is not a submodule of the model")
            out.append((names[id(m)], m))
        else:
            raise TypeError(f"{what}: entries must be nn.Module or qualified names, got {type(m).__name__}")
        if any(other is out[-1][1] for _, other in out[:-1]):
            raise ValueError(f"{what}: module '{out[-1][0]}' is listed twice (by name and by object?); list each once")
    return out
