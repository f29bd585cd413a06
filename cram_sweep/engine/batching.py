"""How many samples share a batch: `auto_batch_size` from the device, and `cram_fitting`, the engine that halves
its batch on out of memory and starts the samples not yet returned again (same seeds: the same results).

Ray-free, so a GPU machine without Ray runs it (tests/test_gpu.py); the Ray worker (worker.py) wraps it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from typing import Union

import torch

from .cram import Heartbeat, SampleResult, cram

log = logging.getLogger("cram_sweep")

# Of the free memory `auto_batch_size` plans to fill. A constant, not a config key: an estimate's safety margin, and a
# batch that still does not fit is halved (cram_fitting); users who know better set batch_size themselves.
GPU_MEMORY_SHARE = 0.8
MAX_AUTO_BATCH = 512
# Bytes a sample keeps per position for the backward: per layer and hidden unit, and per vocabulary entry (the logits
# and their gradient). Fitted to the peak memory of the first H200 run (issue 31: SmolLM2-135M at L=512, Llama-3.2-1B
# at L=512, Llama-3.1-8B at L=1568, bf16 autocast): 33 and 5.3 fit the 1B and 8B peaks and over-predict the 135M one
# by 20 %; rounded up.
BYTES_PER_LAYER_UNIT = 34
BYTES_PER_VOCAB_ENTRY = 6


def auto_batch_size(lm, length: int, n_mem: int, precision: str = "fp32") -> int:
    """CPU: 4 samples per core keeps the matmuls large. GPU: what fits in GPU_MEMORY_SHARE of free memory, after the bf16
    copies of the weights that a bf16 forward casts once (runtime.autocast), by the fitted bytes per sample and position.
    Free memory changes from run to run: for bit-identical reruns on CUDA give batch_size as a number
    (docs/determinism.md)."""
    if lm.device.type != "cuda":
        return 4 * torch.get_num_threads()
    free, _ = torch.cuda.mem_get_info(lm.device)
    if precision == "bf16":  # bf16-weights holds no second copy
        free -= 2 * lm.n_params
    layers = getattr(lm.model.config, "num_hidden_layers", 32)
    per_sample = (length + n_mem) * (lm.hidden * layers * BYTES_PER_LAYER_UNIT + lm.vocab_size * BYTES_PER_VOCAB_ENTRY)
    return int(max(1, min(MAX_AUTO_BATCH, GPU_MEMORY_SHARE * free // per_sample)))


def is_oom(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), or the RuntimeError the CPU allocator raises."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))
    )


def cram_fitting(
    lm, specs, n_mem: int, optim, precision: str, batch_size: int, label: str = "", **options
) -> Iterator[Union[SampleResult, Heartbeat]]:
    """`cram` (options: check_every, attention, heartbeat_seconds, ...), halving the batch on out of memory,
    down to 1, for the samples not yet returned. `label` names the work in the warning."""
    pending = {spec.key: spec for spec in specs}
    while pending:
        try:
            for out in cram(lm.model, list(pending.values()), n_mem, optim, precision, batch_size, **options):
                if isinstance(out, SampleResult):
                    del pending[out.key]
                yield out
            return
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err) or batch_size == 1:
                raise
        # outside the except block, so the failed batch's tensors are no longer referenced
        batch_size //= 2
        log.warning("out of memory on %s: retrying %d samples with batch_size=%d", label, len(pending), batch_size)
        gc.collect()
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
