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


def auto_batch_size(lm, length: int, n_mem: int) -> int:
    """CPU: 4 samples per core keeps the matmuls large. GPU: what fits in GPU_MEMORY_SHARE of free memory, by
    an estimate per sample of the activations kept for the backward (per layer and position, ~40 values of the
    hidden width) and of the vocabulary projection's logits and their gradient (~12 bytes per vocabulary entry)."""
    if lm.device.type != "cuda":
        return 4 * torch.get_num_threads()
    free, _ = torch.cuda.mem_get_info(lm.device)
    tokens = length + n_mem
    layers = getattr(lm.model.config, "num_hidden_layers", 32)
    per_sample = tokens * (lm.hidden * layers * 40 + lm.vocab_size * 12)
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
