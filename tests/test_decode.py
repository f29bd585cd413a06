"""decode: greedy decoding of a stored row's vectors reproduces its stored greedy prefix, for every method, direct and
lowdim, with and without a plain-text prefix (issue 33: decode fed one given token where the prefix was given)."""

import dataclasses

import pytest

from cram_sweep.config import ParamConfig
from cram_sweep.engine.cram import cram
from cram_sweep.engine.param import parametrization
from cram_sweep.report.decode import decode_row

from .helpers import TINY_PROGRESSIVE, specs_for, tiny_config


@pytest.mark.parametrize("prefix_tokens", [0, 3])
@pytest.mark.parametrize("param", ["direct", "lowdim"])
@pytest.mark.parametrize("method", ["full", "progressive"])
def test_decoding_a_stored_row_gives_its_greedy_prefix(tiny_llama, method, param, prefix_tokens):
    cfg = tiny_config(
        *(TINY_PROGRESSIVE if method == "progressive" else []),
        f"method.prefix_tokens={prefix_tokens}",
        "optim.max_steps=80",
        "grid.lengths=[10]",
    )
    specs = specs_for(tiny_llama, 10, 2)
    rows = cram(
        tiny_llama.model,
        specs,
        2,
        cfg.optim,
        "fp32",
        batch_size=2,
        method=cfg.method,
        parametrization=parametrization(ParamConfig(name=param, k=8)),
    )
    for row in rows:
        stored = {**dataclasses.asdict(row), "n_mem": 2, "precision": "fp32"}
        decoded, prefix = decode_row(tiny_llama, stored, cfg.method.given)
        # progressive stores the greedy prefix within its horizon stage; decoding runs on over the cap
        assert prefix == row.greedy_prefix if method == "full" else prefix >= row.greedy_prefix, (row.sample, prefix, row.greedy_prefix)
        assert decoded[:prefix] == row.token_ids[cfg.method.given : cfg.method.given + prefix]
