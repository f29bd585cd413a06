"""The methods: each module of this folder is one protocol and holds all that is particular to it (its rule, what its
row stores, its capacity definition, report lines and plots, its decode), registered here by the `METHOD` it
defines. Nothing outside this folder tests a method's name: it asks `method(name)` (base.Method's questions).

A new method is one module here that defines `METHOD`, plus its conf/method/<name>.yaml.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import UserError
from .base import Method

_REGISTRY: dict[str, Method] = {}


def register(one: Method) -> Method:
    """Add a method (the modules of this folder are added on first use; a test may add its own)."""
    _REGISTRY[one.name] = one
    return one


def registered() -> dict[str, Method]:
    """Every method by name: this folder's modules that define `METHOD`, and any registered."""
    _discover()
    return _REGISTRY


@functools.cache
def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "METHOD", None), Method):
            _REGISTRY.setdefault(module.METHOD.name, module.METHOD)


def method(name: str) -> Method:
    """The method called `name`; one error line naming the choices where there is none."""
    methods = registered()
    if name not in methods:
        raise UserError(f"method.name={name}: choose {' or '.join(f'method={n}' for n in methods)} (or add cram_sweep/methods/{name}.py)")
    return methods[name]
