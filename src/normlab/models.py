"""The models of the standardization-loss paper's MNIST experiments (Collins et al. 2019, appendix A).

Every model takes its normalization from the method registry by name (``norm="bn"``, ``"none"``,
``"bn_shift"``, ``"gn"``, ...) or as a factory ``norm(num_features, dims) -> nn.Module``; none of them
names a normalization itself. Each normalization layer sits where batch norm would: right after a
conv/linear, before the nonlinearity, which is where the standardization loss probes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .methods._common import LAYERS
from .methods.registry import norm_layer

__all__ = ["cnn", "mlp", "build", "init_weights", "MODELS", "INITS"]

Norm = str | Callable[[int, int], nn.Module]
INITS = ("torch", "glorot")


def init_weights(model: nn.Module, init: str = "torch") -> nn.Module:
    """Re-initialize every conv and linear layer of ``model`` in place, and return it.

    ``"torch"`` keeps PyTorch's default (kaiming-uniform with ``a = sqrt(5)``, i.e.
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, for weights and biases). ``"glorot"`` draws weights from
    ``U(-b, b)`` with ``b = sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010) and sets biases to
    zero: the default of TensorFlow's layers, which the standardization-loss paper used (it does not
    state its init).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "glorot":
        for m in model.modules():
            if isinstance(m, LAYERS):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


def _norm(norm: Norm, num_features: int, dims: int) -> nn.Module:
    if callable(norm):
        return norm(num_features, dims)
    return norm_layer(norm, num_features, dims)


def cnn(norm: Norm = "bn", channels: Sequence[int] = (32, 16, 8), kernel_size: int = 3,
        in_channels: int = 1, image_size: int = 28, num_classes: int = 10, init: str = "torch") -> nn.Sequential:
    """The paper's 3-layer CNN: ``[conv(k, stride 2, padding k//2) -> norm -> ReLU] x 3 -> linear``.

    32, 16 and 8 filters by default (Collins et al. 2019, appendix A.1); on 28x28 inputs the feature
    maps are 14, 7 and 4 pixels wide, and the head sees ``8 * 4 * 4 = 128`` features. ``init``: see
    :func:`init_weights`.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number (padding is k//2), got {kernel_size}")
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size, stride=2, padding=kernel_size // 2),
                   _norm(norm, out, 2), nn.ReLU()]
        c, size = out, (size - 1) // 2 + 1
    layers += [nn.Flatten(), nn.Linear(c * size * size, num_classes)]
    return init_weights(nn.Sequential(*layers), init)


def mlp(norm: Norm = "bn", hidden: Sequence[int] = (100, 100, 100), in_features: int = 784,
        num_classes: int = 10, init: str = "torch") -> nn.Sequential:
    """The paper's 3-layer MLP: ``flatten -> [linear(100) -> norm -> ReLU] x 3 -> linear``
    (Collins et al. 2019, appendix A.2). ``init``: see :func:`init_weights`."""
    layers: list[nn.Module] = [nn.Flatten()]
    f = in_features
    for h in hidden:
        layers += [nn.Linear(f, h), _norm(norm, h, 0), nn.ReLU()]
        f = h
    layers.append(nn.Linear(f, num_classes))
    return init_weights(nn.Sequential(*layers), init)


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": cnn, "mlp": mlp}


def build(name: str, **options) -> nn.Module:
    """Build the model called ``name`` (``"cnn"`` or ``"mlp"``) with its keyword options."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name](**options)
