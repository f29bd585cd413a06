"""Fault injection for the reliability tests (docs/reliability.md); inert in normal use.

CRAM_SWEEP_FAULT holds comma-separated `kind:arg[:arg]` entries:

    store_write_sleep:SECONDS        sleep between writing a store file's hidden .tmp and renaming it
    nan_sample:CELL_SUBSTRING:SAMPLE (worker) that sample's text embedding turns NaN
    oom_above_batch:N                (worker) a forward with more than N samples raises torch.OutOfMemoryError
    sleep_in_item:SECONDS            (worker) the first forward of each work item sleeps SECONDS, in a worker
                                     Ray has not restarted: a hang that only the driver's stall check ends

Normal code consults this module at exactly two places: `pause_before_rename()` in the store's atomic
write and `injected(...)` around a worker's work item.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings


def active() -> dict[str, list[str]]:
    """CRAM_SWEEP_FAULT parsed to {kind: [args]}; empty when unset."""
    parsed = {}
    for entry in filter(None, (e.strip() for e in os.environ.get("CRAM_SWEEP_FAULT", "").split(","))):
        kind, _, args = entry.partition(":")
        parsed[kind] = args.split(":") if args else []
    return parsed


def pause_before_rename() -> None:
    pause = active().get("store_write_sleep")
    if pause:
        time.sleep(float(pause[0]))


def restarted() -> bool:
    """Whether this process is a Ray actor that Ray restarted (after it died or was killed)."""
    import ray

    with warnings.catch_warnings():  # Ray's property reads its own deprecated `actor_id`
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.is_initialized() and bool(ray.get_runtime_context().was_current_actor_reconstructed)


@contextlib.contextmanager
def injected(model, specs):
    """The worker-side faults, as forward hooks on `model` while one work item runs."""
    import torch

    found = active()
    handles = []
    if "nan_sample" in found:
        cell_part, sample = found["nan_sample"]
        target = [s.token_ids for s in specs if s.sample == int(sample) and cell_part in s.cell]
        if target:
            poisoned = torch.tensor(target[0], device=model.device)

            def poison(module, inputs, output):  # rows of the input ids equal to that sample's ids (then padding) -> NaN embeddings
                ids, n = inputs[0], poisoned.numel()
                if ids.dim() != 2 or ids.shape[1] < n:
                    return output
                rows = (ids[:, :n] == poisoned).all(dim=1) & (ids[:, n:] == 0).all(dim=1)
                return output.masked_fill(rows[:, None, None], float("nan"))

            handles.append(model.get_input_embeddings().register_forward_hook(poison))
    if "oom_above_batch" in found:
        limit = int(found["oom_above_batch"][0])

        def oom(module, args, kwargs):
            x = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
            if x is None and args:
                x = args[0]
            if x is not None and x.shape[0] > limit:
                raise torch.OutOfMemoryError(f"injected out of memory: a batch of {x.shape[0]} > {limit} samples")

        handles.append(model.base_model.register_forward_pre_hook(oom, with_kwargs=True))
    if "sleep_in_item" in found and not restarted():
        seconds = float(found["sleep_in_item"][0])

        def hang(module, args):  # once per item: the hook removes itself (removing a handle twice is a no-op)
            sleeper.remove()
            time.sleep(seconds)

        sleeper = model.base_model.register_forward_pre_hook(hang)
        handles.append(sleeper)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
