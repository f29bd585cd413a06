"""How a loaded model runs: its forward under bf16 autocast (the frozen weights' casts kept), its attention
implementation, and torch.compile (the graphs it keeps, and how many it has compiled)."""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

# The precisions whose forward runs under bf16 autocast: `bf16` keeps the frozen weights in fp32 (a bf16 copy of each
# Linear's is cast once), `bf16-weights` holds the whole model in bf16 and nothing else (half the memory).
BF16_FORWARD = ("bf16", "bf16-weights")
# Graphs torch.compile keeps per compiled module: one per input shape; the fixed-shape layout (layout.py) gives one per
# (row count, n_mem + text length) a worker meets. Past it dynamo would run new shapes eagerly, silently rounding them
# otherwise than a compiled run: that is an error instead.
COMPILED_SHAPES = 256
COMPILE_MODES = {True: "default", "reduce-overhead": "reduce-overhead"}  # compile=true | reduce-overhead (CUDA graphs)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_compile(compile_setting, device: torch.device):
    """`compile=auto`: on CUDA (where launches and elementwise kernels are a step's time); the mode, or None: eager."""
    if compile_setting == "auto":
        compile_setting = device.type == "cuda"
    return COMPILE_MODES.get(compile_setting)


def compiled(module: torch.nn.Module, mode: str):
    """`module` through torch.compile (inductor, static shapes), built once per module: it compiles a graph the first
    time it meets an input shape (and grad mode), then reuses it."""
    if module not in _COMPILED:
        import torch._dynamo

        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, COMPILED_SHAPES)
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4 * COMPILED_SHAPES)
        for fail_on_limit in ("fail_on_cache_limit_hit", "fail_on_recompile_limit_hit"):  # its name in torch 2.4 / later
            if hasattr(config, fail_on_limit):
                setattr(config, fail_on_limit, True)
        _COMPILED[module] = torch.compile(module, dynamic=False, mode=mode)
    return _COMPILED[module]


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (its counters)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


_BF16_LINEAR_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def autocast(model, precision: str, cast_cache: bool = True):
    """bf16: the forward under bf16 autocast, as the reference runs Llama-family models.

    Autocast re-casts frozen (requires_grad=False) fp32 weights on every call; with `cast_cache` each
    Linear's weight is cast once and kept, which gives the same numbers without the per-step casts.
    """
    if precision not in BF16_FORWARD:
        yield
        return
    device_type = model.get_input_embeddings().weight.device.type
    if not cast_cache:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:  # per Linear: a truncated model (engine/model.truncated) shares its layers' casts
        if m not in _BF16_LINEAR_WEIGHTS:
            _BF16_LINEAR_WEIGHTS[m] = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
    originals = [m.weight for m in linears]
    for module in linears:
        module.weight = _BF16_LINEAR_WEIGHTS[module]
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        for module, weight in zip(linears, originals):
            module.weight = weight


@contextlib.contextmanager
def attention_implementation(model, implementation: Optional[str]):
    """Run the model with this attention implementation (None: as loaded), then restore it."""
    loaded = model.config._attn_implementation
    if implementation is None or implementation == loaded:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(loaded)
