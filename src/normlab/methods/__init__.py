"""normlab's methods: one module per method, each registering itself in :mod:`.registry`."""

from __future__ import annotations

import importlib
import pkgutil

_NOT_METHODS = {"registry", "fold"}


def load_all() -> None:
    """Import every method module of this package so that each registers itself."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
