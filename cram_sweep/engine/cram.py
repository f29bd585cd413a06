"""The cramming loop: optimize `n_mem` input vectors per text so a frozen LM reproduces the text.

Waiting samples join the batch (engine/batch.py) as its layout admits them (layout.py); each step runs every row's
forward and update; a finished sample leaves at once, as a `SampleResult`, and the next waiting one takes its slot.
What a forward means and when a sample ends is its method's (methods/); what is trained, its parametrization's
(param.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Optional, Union

from ..config import AnalysisConfig, MethodConfig, OptimConfig
from .batch import Batch
from .layout import MAX_PADDING
from .param import Direct
from .runtime import attention_implementation, graphs_compiled
from .samples import Heartbeat, SampleResult, SampleSpec


def cram(
    model,
    samples: Iterable[SampleSpec],
    n_mem: int,
    optim: OptimConfig,
    precision: str = "fp32",
    batch_size: int = 16,
    check_every: int = 1,
    cast_cache: bool = True,
    attention: Optional[str] = None,
    heartbeat_seconds: Optional[float] = None,
    method: Optional[MethodConfig] = None,
    parametrization=Direct,
    analysis: Optional[AnalysisConfig] = None,
    batch_invariant: bool = True,
    max_padding: float = MAX_PADDING,
    compile_mode: Optional[str] = None,
) -> Iterator[Union[SampleResult, Heartbeat]]:
    """Optimize every sample (texts of any lengths, in the order given; shortest first keeps the batches full);
    yield one `SampleResult` per sample as it finishes. `method`: full cramming when None; `parametrization`:
    what is trained (param.py); `analysis`: what is measured on each finished sample (None: nothing, as
    `analysis.bits=false`: the bits columns are empty).

    `batch_invariant` (layout.py): every forward at shapes that depend on its rows alone, so a sample's result is
    bit-identical whatever its batch-mates (false: packed batches, `max_padding` bounding their padding).
    Options that change no result: `check_every` (steps between host syncs; rows whose stage or sample ended are
    frozen on the device meanwhile), `cast_cache` (bf16 weight copies). Options that change only rounding:
    `batch_size` (the row count of every forward: docs/determinism.md), `attention` (the attention implementation;
    None: as the model was loaded) and `compile_mode` (torch.compile's mode for the optimization forwards, model.py;
    None: eager). With `heartbeat_seconds`, also yields a `Heartbeat` at most that often, so a caller can show
    progress within long samples.
    """
    waiting = deque(samples)
    batch = Batch(
        model,
        n_mem,
        optim,
        method or MethodConfig(),
        precision,
        cast_cache,
        parametrization,
        analysis,
        batch_size,
        batch_invariant,
        max_padding,
        compile_mode,
    )
    last_heartbeat, compile_seconds = time.perf_counter(), 0.0
    with attention_implementation(model, attention):
        while waiting or len(batch):
            admitted = _admit(batch, waiting)
            if admitted:
                batch.add(admitted)
            started, graphs = time.perf_counter(), compile_mode and graphs_compiled()
            for _ in range(check_every):
                batch.step()
            seconds = time.perf_counter() - started
            if compile_mode and graphs_compiled() > graphs:
                compile_seconds += seconds  # a step that compiled: not the samples' time
            else:
                batch.add_seconds(seconds)
            yield from batch.take_finished()
            if heartbeat_seconds is not None and len(batch) and time.perf_counter() - last_heartbeat >= heartbeat_seconds:
                last_heartbeat = time.perf_counter()
                steps = int(batch.step_rows.steps.max())
                yield Heartbeat(len(batch), steps, batch.rule.stage_length(batch.targets), compile_seconds)


def _admit(batch: Batch, waiting: deque) -> list[SampleSpec]:
    """The waiting samples that take the free slots: in order, while the layout admits them (an empty batch always
    takes the first)."""
    lengths, targets = [len(s.token_ids) for s in batch.specs], list(batch.targets)
    admitted: list[SampleSpec] = []
    while waiting:
        length = len(waiting[0].token_ids)
        target = batch.rule.first_target(length)
        if not batch.layout.admits(lengths, targets, length, target):
            break
        admitted.append(waiting.popleft())
        lengths.append(length)
        targets.append(target)
    return admitted
