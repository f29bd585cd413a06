"""The cramming loop against the design's semantics, on seeded random models (same code path as real ones)."""

import dataclasses

import pytest
import torch

from cram_sweep.engine.cram import Heartbeat, SampleResult, cram
from cram_sweep.engine.scores import leading_matches, reduce_scores, token_scores
from cram_sweep.report.decode import decode_row, greedy_decode

from .helpers import assert_bit_identical, assert_same_result, by_sample, naive_cram, specs_for, tiny_config

CFG = tiny_config()
OPTIM = CFG.optim


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_neox"])
def test_engine_matches_naive_paper_loop(fixture, request):
    lm = request.getfixturevalue(fixture)
    specs = specs_for(lm, 8, 3)
    engine = by_sample(cram(lm.model, specs, 2, OPTIM, "fp32", batch_size=3))
    for spec in specs:
        naive = naive_cram(lm.model, spec.token_ids, 2, spec.init_seed, OPTIM)
        assert_same_result(engine[spec.sample], naive)


def test_full_cramming_with_the_first_token_predicted_is_its_naive_loop(tiny_llama):
    """method.predict_first=true: the last vector predicts token 0 too, as the progressive reference's full trainer;
    the rows record it, and a decode from no given token reproduces the stored greedy prefix."""
    # 60 steps: sample 0 needs ~110 at lr 0.1, and past ~60 the first rounding grows until the step that first fits
    # moves (109 against 110 on an AMX Xeon, the vectors 4e-2 apart); at 60 they are 1.1e-4 apart there.
    cfg = tiny_config("method.predict_first=true", "optim.max_steps=60")
    specs = specs_for(tiny_llama, 8, 3)
    rows = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=3, method=cfg.method))
    for spec in specs:
        row = rows[spec.sample]
        naive = naive_cram(tiny_llama.model, spec.token_ids, 2, spec.init_seed, cfg.optim, predict_first=True)
        assert_same_result(row, naive, ce_rel=1e-3)
        assert row.predict_first and row.greedy_exact == (row.greedy_prefix == 8)
        decoded, prefix = decode_row(tiny_llama, {**dataclasses.asdict(row), "n_mem": 2, "precision": "fp32"}, 0)
        assert prefix == row.greedy_prefix and decoded[:prefix] == spec.token_ids[:prefix]


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.hybrid_alpha=0.5"],  # l2 over every hidden state, the input embeddings' included
        ["optim.hybrid_alpha=1.0", "optim.alignment_loss=l1", "optim.alignment_layers=2", "optim.alignment_from=last"],
        ["optim.hybrid_alpha=0.5", "method.prefix_tokens=3"],  # aligned from the first token after the prefix
        ["optim.hybrid_alpha=0.5", "method.predict_first=true", "optim.max_steps=60"],  # 60: as the test above
    ],
    ids=["l2-all", "l1-last-2", "l2-after-a-prefix", "l2-predicting-the-first-token"],  # cosine: tests/test_progressive.py's hybrid case
)
def test_the_hybrid_loss_is_its_naive_loop(tiny_llama, overrides):
    """optim.hybrid_alpha: CE plus the alignment of the crammed forward's hidden states with the text's own; the
    trajectory is the reference's loss's, and it is not the CE's alone."""
    cfg = tiny_config(*overrides)
    specs = specs_for(tiny_llama, 8, 3)
    rows = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=3, method=cfg.method))
    plain = by_sample(cram(tiny_llama.model, specs, 2, tiny_config().optim, "fp32", batch_size=3, method=cfg.method))
    for spec in specs:
        method = dict(predict_first=cfg.method.predict_first, prefix=cfg.method.prefix_tokens)
        naive = naive_cram(tiny_llama.model, spec.token_ids, 2, spec.init_seed, cfg.optim, **method)
        assert_same_result(rows[spec.sample], naive, ce_rel=2e-3)  # a lowest CE on the steep side (measured: 6e-4)
    assert any(rows[s].memory != plain[s].memory for s in plain), "the alignment changed the trajectory"


def test_batch_does_not_change_a_sample(tiny_llama):
    """Another batch size is another row count in every product: the same trajectory within rounding (bit for bit at one
    batch size: test_invariance)."""
    specs = specs_for(tiny_llama, 8, 5)
    alone = {s.sample: next(iter(cram(tiny_llama.model, [s], 2, OPTIM, "fp32", batch_size=1))) for s in specs}
    for batch_size, order in ((2, specs), (5, specs[::-1]), (3, specs[2:] + specs[:2])):
        batched = by_sample(cram(tiny_llama.model, order, 2, OPTIM, "fp32", batch_size=batch_size))
        assert sorted(batched) == sorted(alone)
        for sample, row in batched.items():
            assert_same_result(row, alone[sample])


def test_continuous_batching_refills_slots(tiny_llama):
    """A finished sample leaves at once and a waiting one takes its slot while its batch-mate runs on:
    every step runs a full batch until the last sample has entered. Every forward has the batch size's rows; the
    live ones are those whose vectors are not the inert rows' zeros."""
    specs = specs_for(tiny_llama, 8, 5)
    by_ids = {tuple(s.token_ids): s.sample for s in specs}
    events = []  # ("enter", samples) when texts join the batch, ("step", batch size) per optimization forward

    def on_embed(module, inputs, output):  # the engine embeds each text once, when its sample enters the batch
        events.append(("enter", [by_ids[tuple(row)] for row in inputs[0].tolist()]))

    def on_forward(module, args, kwargs):  # optimization steps run the text plus its 2 vectors
        embeds = kwargs["inputs_embeds"]
        if embeds.shape[1] == 8 + 2:
            assert embeds.shape[0] == 2, "every forward at the batch size's rows"
            events.append(("step", int(embeds[:, :2].flatten(1).any(dim=1).sum())))

    hooks = [
        tiny_llama.model.get_input_embeddings().register_forward_hook(on_embed),
        tiny_llama.model.base_model.register_forward_pre_hook(on_forward, with_kwargs=True),
    ]
    try:
        rows = list(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=2))
    finally:
        for hook in hooks:
            hook.remove()
    entries = [samples for kind, samples in events if kind == "enter"]
    assert entries[0] == [0, 1] and sorted(sum(entries, [])) == list(range(5)) == sorted(r.sample for r in rows)
    assert [len(samples) for samples in entries[1:]] == [1, 1, 1], f"each waiting sample took a single freed slot: {entries}"
    last_entry = max(i for i, (kind, _) in enumerate(events) if kind == "enter")
    assert {size for kind, size in events[:last_entry] if kind == "step"} == {2}, "full batch until the queue is empty"
    assert sum(size for kind, size in events if kind == "step") == sum(r.steps for r in rows)


def test_short_text_converges_and_greedy_reproduces_it(tiny_llama):
    rows = list(cram(tiny_llama.model, specs_for(tiny_llama, 6, 3), 2, OPTIM, "fp32", batch_size=3))
    converged = [r for r in rows if r.converged]
    assert converged, [r.acc for r in rows]
    for row in converged:
        assert row.acc == 1.0 and row.greedy_exact and row.greedy_prefix == 5
        assert row.gain_tokens == pytest.approx((1.0 - row.acc_no_mem) * 5)
        assert row.info_gain_bits == pytest.approx(row.ce_no_mem_bits - row.ce_bits)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_neox"])
def test_stored_vectors_give_stored_accuracy_and_greedy_prefix(request, model):
    """The kept vectors are those of the best forward pass, so re-running them reproduces `acc`, and
    greedy decoding from them reproduces exactly `greedy_prefix` text tokens."""
    lm = request.getfixturevalue(model)
    rows = list(cram(lm.model, specs_for(lm, 8, 3), 2, OPTIM, "fp32", batch_size=3))
    for row in rows:
        ids = torch.tensor(row.token_ids)[None]
        memory = torch.tensor(row.memory).view(1, 2, -1)
        with torch.no_grad():
            _, acc, _ = reduce_scores(*token_scores(lm.model, memory, lm.model.get_input_embeddings()(ids), ids[:, 1:], "fp32")[:2])
        assert acc.item() == pytest.approx(row.acc, abs=1e-6)
        decoded = greedy_decode(lm.model, memory, ids[:, :1], ids.shape[1] - 1, "fp32")
        assert leading_matches(decoded == ids[:, 1:]).item() == row.greedy_prefix
        assert row.greedy_exact == (row.greedy_prefix == ids.shape[1] - 1)
    if model == "tiny_llama":  # converged samples and one that is not
        assert [r.greedy_exact for r in sorted(rows, key=lambda r: r.sample)] == [True, True, False]


def test_bf16_autocast_keeps_fp32_vectors_and_restores_the_weights(tiny_llama):
    """Under bf16 the vectors (and the text embeddings they join) enter the model in fp32, the Linear layers run
    on bf16 copies of their weights during the forward, and the original fp32 weights are back afterwards."""
    model = tiny_llama.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    originals = [m.weight for m in linears]
    inputs_dtypes, weight_dtypes = set(), set()
    hooks = [
        model.base_model.register_forward_pre_hook(
            lambda mod, args, kwargs: inputs_dtypes.add(kwargs["inputs_embeds"].dtype), with_kwargs=True
        ),
        linears[0].register_forward_pre_hook(lambda mod, args: weight_dtypes.add(mod.weight.dtype)),
    ]
    try:
        rows = list(cram(model, specs_for(tiny_llama, 6, 2), 2, OPTIM, "bf16", batch_size=2))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(rows) == 2 and all(0.0 <= r.acc <= 1.0 for r in rows)
    assert inputs_dtypes == {torch.float32}
    assert weight_dtypes == {torch.bfloat16}
    assert all(m.weight is w and w.dtype == torch.float32 for m, w in zip(linears, originals))


def test_nonfinite_sample_fails_alone(tiny_llama):
    """A sample whose loss turns NaN (its token embedding is poisoned by a forward hook) fails; its batch-mates are
    untouched, bit for bit."""
    specs = specs_for(tiny_llama, 6, 3)
    clean = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=3))
    poisoned_token = specs[1].token_ids[3]
    assert all(poisoned_token not in s.token_ids for s in (specs[0], specs[2])), "pick a token unique to sample 1"

    def poison(module, inputs, output):
        return output.masked_fill((inputs[0] == poisoned_token)[..., None], float("nan"))

    handle = tiny_llama.model.get_input_embeddings().register_forward_hook(poison)
    try:
        rows = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=3))
    finally:
        handle.remove()
    assert "non-finite" in rows[1].error
    for sample in (0, 2):
        assert rows[sample].error is None
        assert_bit_identical(rows[sample], clean[sample])


def test_speed_options_leave_results_unchanged(tiny_llama):
    """bf16 weight-cast cache and fewer host syncs give the results of the plain loop, bit for bit; batching within
    rounding (another row count)."""
    specs = specs_for(tiny_llama, 8, 4)
    plain = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "bf16", batch_size=1, check_every=1, cast_cache=False))
    fast = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "bf16", batch_size=4, check_every=7, cast_cache=True))
    synced = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "bf16", batch_size=4, check_every=1, cast_cache=False))
    for sample in plain:
        assert_bit_identical(fast[sample], synced[sample])  # cast cache and check_every change nothing
        assert_same_result(fast[sample], plain[sample], atol=5e-2)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_implementation_leaves_results_unchanged(tiny_llama, attention):
    """The engine's attention choice (eager on CPU by default) follows the model's own trajectory."""
    specs = specs_for(tiny_llama, 8, 3)
    loaded = tiny_llama.model.config._attn_implementation
    as_loaded = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=3))
    chosen = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=3, attention=attention))
    assert tiny_llama.model.config._attn_implementation == loaded, "the model's setting is restored"
    for sample in as_loaded:
        assert_same_result(chosen[sample], as_loaded[sample])


def test_heartbeats_report_running_steps_and_change_no_result(tiny_llama):
    specs = specs_for(tiny_llama, 8, 4)
    plain = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=2))
    stream = list(cram(tiny_llama.model, specs, 2, OPTIM, "fp32", batch_size=2, heartbeat_seconds=0))
    beats = [r for r in stream if isinstance(r, Heartbeat)]
    assert beats and all(1 <= b.live <= 2 and 1 <= b.steps <= OPTIM.max_steps and b.stage_length == 0 for b in beats)
    first_batch = [b.steps for b in beats[: min(r.steps for r in plain.values()) - 1]]
    assert first_batch == list(range(1, len(first_batch) + 1)), "one beat per step, counting the batch's steps"
    rows = by_sample(r for r in stream if isinstance(r, SampleResult))
    assert sorted(rows) == sorted(plain)
    for sample in plain:
        assert rows[sample].memory == plain[sample].memory


def test_leading_matches_counts_up_to_the_first_error():
    correct = torch.tensor([[True, True, False, True], [False, True, True, True], [True, True, True, True]])
    assert leading_matches(correct).tolist() == [2, 0, 4]


def test_full_cramming_results_are_those_from_before_progressive_cramming(tiny_llama, tiny_neox):
    """method=full through the batched row-wise AdamW and the padded-batch engine: the rows the engine gave
    before progressive cramming existed, on whatever x86 CPU and thread count this runs.

    The fixture was written on another machine, so it promises exactly only what does not depend on the matmul
    kernel: the decisions (steps, greedy prefix, accuracies). The floats carry the last-bit rounding of that
    machine's kernels, amplified by each sample's ~100 steps: on a Zen 4 (avx512_bf16) the vectors moved by at most 1.4e-4
    (|x| ~ 1; 7e-5 on an AMX Xeon), held here to 1e-3. The lowest summed CE moved by up to 0.4 %: near
    convergence it is a few tokens' log-probabilities on the steep side of the softmax, so a 1e-4 change of the
    vectors moves it by far more than their relative change; held to 1 %. Bit-identity is tested within one
    process (test_batch_does_not_change_a_sample and the others above)."""
    import json

    from .helpers import ROOT

    golden = json.loads((ROOT / "tests" / "fixtures" / "full_cramming_before_progressive.json").read_text())["rows"]
    models = {"tiny_llama": tiny_llama, "tiny_neox": tiny_neox}
    for key in sorted({(g["model"], g["length"], g["batch_size"], g["check_every"]) for g in golden}):
        name, length, batch_size, check_every = key
        lm = models[name]
        specs = specs_for(lm, length, 5)
        rows = by_sample(cram(lm.model, specs, 2, OPTIM, "fp32", batch_size=batch_size, check_every=check_every))
        for g in (g for g in golden if (g["model"], g["length"], g["batch_size"], g["check_every"]) == key):
            row = rows[g["sample"]]
            assert (row.steps, row.greedy_prefix) == (g["steps"], g["greedy_prefix"]), (key, g["sample"])
            assert_same_result(row, g, atol=1e-3, ce_rel=1e-2)


def test_the_engine_imports_neither_pandas_nor_matplotlib():
    """Every Ray worker imports the engine; pandas and matplotlib (the report's) would cost it ~2 s and 400 MB."""
    import subprocess
    import sys

    code = "import sys, cram_sweep, cram_sweep.engine.cram, cram_sweep.sweep.worker; print(sorted({'pandas', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # The driver and `status` read the cell table through the report module; only writing a report draws.
    code = "import sys, cram_sweep.cli, cram_sweep.sweep.orchestrate, cram_sweep.report.build; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    import cram_sweep

    assert cram_sweep.load_results.__module__ == "cram_sweep.report.build"


@pytest.mark.parametrize("method", ["full", "progressive"])
def test_a_parametrization_with_two_tensors_runs_through_the_engine_unchanged(tiny_llama, method):
    """A toy parametrization (vectors = a + b, two per-row tensors of different ranks) needs nothing of the rules,
    the batch or AdamW: both methods run it, batched like `direct`, and its stored vectors give its stored accuracy."""
    from cram_sweep.config import MethodConfig

    from .helpers import TINY_PROGRESSIVE, SumOfTwo

    cfg = tiny_config(*(TINY_PROGRESSIVE if method == "progressive" else []))
    specs = specs_for(tiny_llama, 8, 3)
    alone = {
        s.sample: next(iter(cram(tiny_llama.model, [s], 2, cfg.optim, "fp32", batch_size=1, method=cfg.method, parametrization=SumOfTwo)))
        for s in specs
    }
    batched = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=3, method=cfg.method, parametrization=SumOfTwo))
    assert isinstance(cfg.method, MethodConfig) and sorted(batched) == sorted(alone)
    for sample, row in batched.items():
        assert_same_result(row, alone[sample], ce_rel=1e-2)  # a and b both take each step: twice direct's step size
        if method == "full":
            ids = torch.tensor(row.token_ids)[None]
            memory = torch.tensor(row.memory).view(1, 2, -1)
            with torch.no_grad():
                _, acc, _ = reduce_scores(
                    *token_scores(tiny_llama.model, memory, tiny_llama.model.get_input_embeddings()(ids), ids[:, 1:], "fp32")[:2]
                )
            assert acc.item() == pytest.approx(row.acc, abs=1e-6)
    # it learns as `direct` does: every sample well above its no-vector accuracy of 0, most of its text reproduced
    assert all(r.acc_no_mem == 0 and r.acc >= 0.8 and r.horizon >= 3 for r in batched.values()), [
        (r.acc, r.horizon) for r in batched.values()
    ]
    assert (
        any(r.acc == 1.0 and r.greedy_exact for r in batched.values())
        if method == "full"
        else max(r.horizon for r in batched.values()) == 8
    )


def test_bf16_weights_hold_the_model_in_bf16_and_its_rows_reproduce_their_accuracy(tiny_llama):
    """precision=bf16-weights: no fp32 copy of the frozen model (half its memory); the vectors stay fp32 and the
    forward runs under bf16 autocast as with precision=bf16, whose Linear weights are the same bf16 numbers. What
    differs: the embeddings and norm weights are rounded to bf16 too, so the no-vector CE moves by bf16 rounding."""
    from cram_sweep.engine.model import load_model

    lm = load_model("tiny_llama", CFG.models["tiny_llama"], "cpu", "bf16-weights")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    specs = specs_for(lm, 8, 3)
    rows = by_sample(cram(lm.model, specs, 2, OPTIM, "bf16-weights", batch_size=3))
    autocast_rows = by_sample(cram(tiny_llama.model, specs, 2, OPTIM, "bf16", batch_size=3))
    for sample, row in rows.items():
        assert row.ce_no_mem_bits == pytest.approx(autocast_rows[sample].ce_no_mem_bits, rel=2e-2)
        ids = torch.tensor(row.token_ids)[None]
        memory = torch.tensor(row.memory).view(1, 2, -1)
        assert memory.dtype == torch.float32
        with torch.no_grad():
            scores = token_scores(lm.model, memory, lm.model.get_input_embeddings()(ids), ids[:, 1:], "bf16-weights")
        assert reduce_scores(*scores[:2])[1].item() == pytest.approx(row.acc, abs=1e-6)
