"""compile: torch.compile (inductor, which runs on CPU too: it needs a C++ compiler) of the optimization forwards, once
per shape; the fixed-shape layout means no recompile in steady state whatever the batch-mates."""

import pytest
import torch

from cram_sweep.engine.cram import Heartbeat, SampleResult, cram
from cram_sweep.engine.runtime import graphs_compiled, resolve_compile

from .helpers import assert_bit_identical, assert_same_result, by_sample, specs_for, tiny_config

OPTIM = tiny_config("optim.max_steps=40", "optim.patience=40").optim


def test_compile_auto_means_on_cuda():
    assert resolve_compile("auto", torch.device("cpu")) is None and resolve_compile("auto", torch.device("cuda")) == "default"
    assert resolve_compile(True, torch.device("cpu")) == "default" and resolve_compile(False, torch.device("cuda")) is None
    assert resolve_compile("reduce-overhead", torch.device("cuda")) == "reduce-overhead"


@pytest.mark.slow  # inductor compiles the tiny model's forward and backward: ~30 s on 2 cores
def test_compiled_steps_compile_once_and_follow_the_eager_rows(tiny_llama):
    specs = specs_for(tiny_llama, 8, 6)
    eager = by_sample(cram(tiny_llama.model, specs[:3], 2, OPTIM, "fp32", batch_size=2))

    def compiled_run(chosen):
        out = list(cram(tiny_llama.model, chosen, 2, OPTIM, "fp32", batch_size=2, compile_mode="default", heartbeat_seconds=0))
        return by_sample(r for r in out if isinstance(r, SampleResult)), [b for b in out if isinstance(b, Heartbeat)]

    first, beats = compiled_run(specs[:3])
    assert beats[-1].compile_seconds > 0, "the first step compiled, and the heartbeats say for how long"
    graphs = graphs_compiled()
    again, beats = compiled_run(specs[::-1])  # other batch-mates, admissions and removals at the same shapes
    assert graphs_compiled() == graphs, "no recompile in steady state"
    assert all(b.compile_seconds == 0 for b in beats)
    for sample, row in first.items():
        assert_bit_identical(again[sample], row)  # compiled rows keep the promise
        assert_same_result(row, eager[sample])  # and follow the eager ones within rounding (fused kernels)
