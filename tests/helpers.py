"""Helpers shared by the test modules: tiny configs, result comparison, naive references, row factories. (Processes:
tests/processes.py.)"""

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cram_sweep.config import compose_config
from cram_sweep.engine.param import initial_vectors
from cram_sweep.engine.rows import RowState
from cram_sweep.results.columns import Cell
from cram_sweep.results.store import FailureRow, ResultRow

ROOT = Path(__file__).resolve().parent.parent

# A tiny sweep that converges within a few hundred steps on the seeded random models.
TINY = [
    "grid.models=[tiny_llama]",
    "grid.datasets=[pydoc]",
    "grid.lengths=[4,8]",
    "grid.n_mem=[2]",
    "grid.samples=3",
    "optim.lr=0.1",
    "optim.max_steps=150",
    "optim.patience=60",
    "precision=fp32",
    "batch_size=2",
    "cluster.num_cpus=1",
    "report=false",
    "flush_seconds=0.5",
]

# Progressive cramming that grows a few stages on the tiny models within seconds: +1 per stage, cosine without
# warm-up, randn init (from U[0, 0.02) with a warm-up they hardly get past the first token).
TINY_PROGRESSIVE = [
    "method=progressive",
    "method.step=1",
    "method.steps_per_stage=40",
    "optim.max_steps=300",
    "optim.warmup_steps=0",
    "optim.init=embed_std",
]


def tiny_config(*overrides):
    return compose_config(TINY + list(overrides))


@functools.lru_cache
def _dataset_config(dataset: str):
    return tiny_config(f"grid.datasets=[{dataset}]").datasets[dataset]


def specs_for(lm, length, count, n_mem=2, dataset="pydoc", cell="", seed_n_mem=None):
    """The first `count` samples of `dataset` at `length` tokens for model `lm`, seeded as a sweep seeds them
    (cell `lm.name/dataset/n_mem/length`, or `seed_n_mem`'s), all named `cell`."""
    from cram_sweep.data import sample_token_ids
    from cram_sweep.engine.cram import SampleSpec
    from cram_sweep.sweep.grid import sample_seed

    ids = sample_token_ids(_dataset_config(dataset), dataset, lm.tokenizer, count, length, seed=0)
    seeded = Cell(lm.name, dataset, n_mem if seed_n_mem is None else seed_n_mem, length)
    return [SampleSpec(i, ids[i], sample_seed(0, seeded, i), cell) for i in range(count)]


def by_sample(rows) -> dict:
    return {r.sample: r for r in rows}


def cosine_lambda(optim):
    """Hugging Face's cosine_with_min_lr, as a LambdaLR factor (written here from its definition)."""

    def factor(step):
        if step < optim.warmup_steps:
            return step / max(1, optim.warmup_steps)
        progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)) * (1 - optim.min_lr / optim.lr) + optim.min_lr / optim.lr)

    return factor


def fields(result) -> dict:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result


def assert_same_result(a, b, atol=1e-3, ce_rel=1e-4, steps_within=0):
    """Two results of one sample agree: same trajectory length and accuracy, CE and vectors within fp rounding.

    Another GEMM shape (batch size) or CPU rounds differently, and ~100 steps amplify it: the vectors by ~1e-4.
    The lowest summed CE near convergence sits on the steep side of the softmax and can move 100x more; pass
    `ce_rel=1e-2` where the trajectory is more sensitive (another CPU, a larger effective step), and `steps_within`
    where two different computations of one update race to the same accuracy (the step that first reaches it moves)."""
    import torch

    a, b = fields(a), fields(b)
    assert abs(a["steps"] - b["steps"]) <= steps_within, (a["steps"], b["steps"])
    assert a["acc"] == pytest.approx(b["acc"], abs=1e-6, nan_ok=True)  # NaN: a progressive sample without a horizon
    assert a["acc_no_mem"] == pytest.approx(b["acc_no_mem"], abs=1e-6, nan_ok=True)
    assert a["ce_bits"] == pytest.approx(b["ce_bits"], rel=ce_rel, abs=atol)
    assert a["ce_no_mem_bits"] == pytest.approx(b["ce_no_mem_bits"], rel=1e-5)
    assert torch.allclose(torch.tensor(a["memory"]), torch.tensor(b["memory"]), atol=atol)


# Columns that measure time, or the batch size a row ran with, not what was computed.
NOT_COMPUTED = ("seconds", "bits_seconds", "forward_rows")


def assert_bit_identical(a, b, ignore=NOT_COMPUTED):
    """Two results of one sample (engine results or stored rows) agree in every column they share, bit for bit: vectors,
    steps, CE, stages and the rest (NaN equals NaN), but for the time they took and `ignore`."""
    a, b = fields(a), fields(b)
    for name in sorted(set(a) & set(b) - set(ignore)):
        x, y = a[name], b[name]
        same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        if name == "stage_records":
            same = [fields(r) for r in x] == [fields(r) for r in y]
        assert same, f"{name} differs: {x if not isinstance(x, list) else x[:4]} against {y if not isinstance(y, list) else y[:4]}"


def uninterrupted_rows(cfg, batch_size: int, skip: frozenset = frozenset()) -> dict:
    """(cell, sample) -> the engine's result for every sample of a one-method sweep on a tiny model but those whose
    (cell, sample, restart) is in `skip`, run in this process through the sweep's work items without interruption, as
    a worker runs them (one thread, eager attention)."""
    from cram_sweep.engine.cram import cram
    from cram_sweep.engine.model import load_model
    from cram_sweep.sweep.items import prepare_tokens, work_items

    rows = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for item in work_items(cfg, prepare_tokens(cfg), set(skip)):
            lm = load_model(item.model, cfg.models[item.model], "cpu")
            options = dict(attention="eager", method=cfg.method, analysis=cfg.analysis)
            for row in cram(lm.model, item.specs, item.n_mem, cfg.optim, "fp32", batch_size=batch_size, **options):
                rows[row.cell, row.sample] = row
    finally:
        torch.set_num_threads(threads)
    return rows


def naive_parameters(model, n_mem, init_seed, optim, k=None):
    """What a batch-size-1 loop trains, written independently of param.py: the vectors (k None), or (param=lowdim)
    z at width k and an nn.Linear(k, hidden) seeded as the engine seeds it. Returns (parameters, vectors())."""
    from cram_sweep.engine.param import derived_seed

    embed = model.get_input_embeddings()
    width = embed.weight.shape[1] if k is None else k
    gen = torch.Generator().manual_seed(init_seed)
    if optim.init == "uniform":
        start = torch.rand(n_mem, width, generator=gen) * optim.init_scale
    else:
        start = torch.randn(n_mem, width, generator=gen) * embed.weight.std().item()
    first = torch.nn.Parameter(start.to(embed.weight.device))
    if k is None:
        return [first], lambda: first
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(init_seed, "projection"))
        linear = torch.nn.Linear(k, embed.weight.shape[1])
    return [first, linear.weight, linear.bias], lambda: linear(first)


def naive_cram(model, token_ids, n_mem, init_seed, optim, k=None, keep_last=False, one_step=False, predict_first=False, prefix=0):
    """The paper's procedure, one sample at a time, written independently of the engine. `keep_last`: the toy method's
    (tests/toy_method.py): exactly `optim.max_steps` forwards, the last one's vectors and CE kept. `one_step`
    (Mezentsev & Oseledets): [e, m, ..., m] without the text, every token predicted, token 0 included. `predict_first`:
    the last vector predicts token 0 too (the progressive reference's full-cramming trainer). `prefix`: that many text
    tokens fed and not predicted (the reference's prefix_len). `optim.hybrid_alpha`: the reference's hybrid loss,
    written from its train/loss.py."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    params, vectors = naive_parameters(model, n_mem, init_seed, optim, k)
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
    ids = torch.tensor(token_ids, device=device)[None]
    text = embed(ids)
    first = 0 if one_step or predict_first else max(prefix, 1)  # the first token predicted
    target, baseline = ids[0, first:], max(first, 1)  # token 0 has no prediction without an input
    with torch.no_grad():
        alone = model(inputs_embeds=text, output_hidden_states=True)
        logits = alone.logits[0, baseline - 1 : -1]
        ce0 = F.cross_entropy(logits, ids[0, baseline:]).item()
        acc0 = (logits.argmax(-1) == ids[0, baseline:]).float().mean().item()
    best_acc, best_step, best_ce, best_memory, step = -1.0, 0, math.inf, None, 0
    for step in range(1, optim.max_steps + 1):
        memory = vectors()
        if one_step:
            logits = model(inputs_embeds=torch.cat([memory[:1], memory[1:].expand(len(token_ids) - 1, -1)])[None]).logits[0]
        else:
            crammed = model(inputs_embeds=torch.cat([memory[None], text], 1), output_hidden_states=True)
            logits = crammed.logits[0, n_mem - 1 + first : -1]
        ce = F.cross_entropy(logits, target)
        loss = (
            ce + optim.hybrid_alpha * naive_alignment(crammed.hidden_states, alone.hidden_states, n_mem, optim, prefix)
            if optim.hybrid_alpha
            else ce
        )
        acc = (logits.argmax(-1) == target).float().mean().item()
        if acc > best_acc or keep_last:
            best_acc, best_step, best_memory = acc, step, memory.detach().clone()
        best_ce = ce.item() if keep_last else min(best_ce, ce.item())
        if not keep_last and (acc == 1.0 or step - best_step >= optim.patience):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "acc_no_mem": acc0,
        "ce_no_mem_bits": ce0 * (len(token_ids) - baseline) / math.log(2),
        "acc": best_acc,
        "steps": step,
        "ce_bits": best_ce * len(target) / math.log(2),
        "memory": best_memory.flatten().tolist(),
    }


def naive_alignment(crammed, alone, n_mem, optim, prefix=0):
    """The reference's activation alignment: per chosen layer (of HF's hidden states, the embeddings first) the mean
    over the text's positions after the `prefix` of a distance, summed over the layers."""
    total = len(alone)
    count = min(optim.alignment_layers, total) if optim.alignment_layers > 0 else total
    chosen = range(total - count, total) if optim.alignment_from == "last" else range(count)
    loss = 0.0
    for i in chosen:
        mine, theirs = crammed[i][:, n_mem + prefix :], alone[i][:, prefix:]
        if optim.alignment_loss == "l2":
            loss = loss + F.mse_loss(mine, theirs, reduction="none").sum(dim=-1).sqrt().mean()
        elif optim.alignment_loss == "l1":
            loss = loss + F.l1_loss(mine, theirs, reduction="none").sum(dim=-1).mean()
        else:
            loss = loss + (1.0 - F.cosine_similarity(mine, theirs, dim=-1)).mean()
    return loss


BLANK = {"int": 0, "float": 0.0, "bool": False, "str": ""}  # by a column's type; lists: []


def result_row(model="m", n_mem=1, length=4, sample=0, acc=1.0, hidden=2, vocab_size=10, **values) -> ResultRow:
    """A stored row: every column blank (zero, false, empty) where it does not matter here, plausible where it does;
    `values` set any other column. A column added to the schema needs nothing here."""
    blank = {f.name: [] if f.type.startswith("list") else BLANK[f.type] for f in dataclasses.fields(ResultRow)}
    plausible = {
        "cell": Cell(model, "pydoc", n_mem, length).id,
        "model": model,
        "dataset": "pydoc",
        "precision": "fp32",
        "length": length,
        "n_mem": n_mem,
        "sample": sample,
        "token_ids": list(range(length)),
        "acc_no_mem": 0.1,
        "acc": acc,
        "ce_no_mem_bits": 100.0,
        "ce_bits": 100.0,
        "seconds": 2.0,
        "steps": 50,
        "converged": acc == 1.0,
        "greedy_prefix": length - 1,
        "greedy_exact": acc == 1.0,
        "memory": [0.0] * (n_mem * hidden),
        "hidden": hidden,
        "vocab_size": vocab_size,
        "method": "full",
        "horizon": length if acc == 1.0 else 0,
        "stages": 1,
        "fail_acc": math.nan if acc == 1.0 else acc,
        "param": "direct",
        "trained_numbers": n_mem * hidden,
        "batch_invariant": True,
        "forward_rows": 16,
        "bits_needed": 32,
        "stored_bits": n_mem * hidden * 32,
    }
    return ResultRow(**{**blank, **plausible, **values})


def failure_row(cell: str, sample: int, attempt: int = 1, error: str = "OOM", restart: int = 0) -> FailureRow:
    return FailureRow(cell=cell, sample=sample, restart=restart, attempt=attempt, error=error, time=0.0)


@dataclasses.dataclass
class TwoTensors(RowState):
    a: torch.Tensor  # (B, n_mem, hidden)
    b: torch.Tensor  # (B, hidden)


class SumOfTwo:
    """A toy parametrization with two per-row tensors: the vectors are a + b (b broadcast over the vectors), a from
    the sample's seed as `direct` draws it, b zero."""

    label = "sum_of_two"

    def __init__(self, n_mem, embed_weight, optim, device):
        self.n_mem, self.hidden, self.optim, self.device = n_mem, embed_weight.shape[1], optim, device
        self.embed_std = embed_weight.float().std().item()

    @property
    def trained_numbers(self) -> int:
        return (self.n_mem + 1) * self.hidden

    def init(self, specs):
        a = torch.stack([initial_vectors(self.n_mem, self.hidden, spec.init_seed, self.optim, self.embed_std) for spec in specs])
        return TwoTensors(a.requires_grad_(), torch.zeros(len(specs), self.hidden, requires_grad=True))

    def vectors(self, params):
        return params.a + params.b[:, None, :]
