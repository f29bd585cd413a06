"""Progressive cramming against an independent batch-size-1 loop written the way the reference runs it,
and the batching it adds: mixed lengths in one right-padded batch, snapshots, greedy decoding of the horizon."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cram_sweep.engine.batch import Batch
from cram_sweep.engine.cram import cram
from cram_sweep.engine.scores import token_scores
from cram_sweep.errors import UserError
from cram_sweep.report.decode import greedy_decode

from .helpers import TINY_PROGRESSIVE, assert_bit_identical, cosine_lambda, naive_alignment, naive_parameters, tiny_config
from .helpers import specs_for as shared_specs_for

GIVEN_FIRST = ["method.predict_first=false", "method.min_length=2"]
RESET = [*GIVEN_FIRST, "method.reset_lr_on_failure=true", "method.steps_per_stage=12"]


def progressive_config(*overrides):
    return tiny_config(*TINY_PROGRESSIVE, *overrides)


def specs_for(lm, cap, count, cell="c"):
    return shared_specs_for(lm, cap, count, n_mem=1, cell=cell)


def naive_progressive(model, token_ids, n_mem, init_seed, optim, method, k=None):
    """The reference's stage loop at batch size 1: torch AdamW with a LambdaLR, a stage is judged on the forward
    before each update, warm starts keep the optimizer, geometric back-offs reload a deep-copied snapshot.
    `k`: param=lowdim, the vectors are an nn.Linear of z, and one AdamW covers z, W and b (the reference's).
    `optim.hybrid_alpha`: the hybrid loss, the text's own hidden states computed once and sliced to each stage."""
    embed = model.get_input_embeddings()
    params, vectors = naive_parameters(model, n_mem, init_seed, optim, k)
    init = vectors().detach().clone()
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(optim))
    ids = torch.tensor(token_ids)[None]
    given = 0 if method.predict_first else 1
    steps, stages, best, snapshot = 0, [], 0, None
    with torch.no_grad():
        alone = model(inputs_embeds=embed(ids), output_hidden_states=True).hidden_states

    def stage(length, retry=False):
        nonlocal steps, snapshot, opt, sched
        text = embed(ids[:, :length])
        targets = ids[0, given:length]
        for stage_steps in range(method.steps_per_stage + 1):
            memory = vectors()
            crammed = model(inputs_embeds=torch.cat([memory[None], text], 1), output_hidden_states=True)
            logits = crammed.logits[0, n_mem - 1 + given : n_mem + length - 1]
            loss = F.cross_entropy(logits, targets)
            if optim.hybrid_alpha:
                loss = loss + optim.hybrid_alpha * naive_alignment(crammed.hidden_states, [h[:, :length] for h in alone], n_mem, optim)
            acc = (logits.argmax(-1) == targets).float().mean().item()
            if acc >= method.threshold:
                snapshot = (
                    [p.detach().clone() for p in params],
                    copy.deepcopy(opt.state_dict()),
                    copy.deepcopy(sched.state_dict()),
                    memory.detach().clone(),
                )
                stages.append((length, True, stage_steps))
                return True
            if stage_steps == method.steps_per_stage or steps == optim.max_steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
        if method.reset_lr_on_failure and not retry and steps < optim.max_steps:  # once: a fresh optimizer and schedule
            opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(optim))
            return stage(length, retry=True)
        stages.append((length, False, stage_steps))
        return False

    def restore():
        with torch.no_grad():
            for param, saved in zip(params, snapshot[0]):
                param.copy_(saved)
        opt.load_state_dict(
            copy.deepcopy(snapshot[1])
        )  # torch aliases the loaded state: a second restore would see the first probe's moments
        sched.load_state_dict(snapshot[2])

    length, cap = min(method.min_length, len(token_ids)), len(token_ids)
    if method.growth == "linear":
        while stage(length) and steps < optim.max_steps and length < cap:
            best, length = length, min(length + method.step, cap)
        best = max([s[0] for s in stages if s[1]], default=0)
    else:
        lo, hi = None, None
        while True:  # ramp: double until a stage fails
            if stage(length):
                lo = length
                if length >= cap or steps >= optim.max_steps:
                    break
                length = min(2 * length, cap)
            else:
                hi = length
                break
        while lo is not None and hi is not None and hi - lo > method.step and steps < optim.max_steps:  # bisect
            mid = (lo + hi) // 2
            restore()
            if stage(mid):
                lo = mid
            else:
                hi = mid
        best = lo or 0
    stored = snapshot[3] if snapshot else init
    return {"stages": stages, "horizon": best, "steps": steps, "memory": stored.flatten()}


def compare(result, naive):
    engine_stages = [(r.length, r.converged, r.steps) for r in result.stage_records]
    assert engine_stages == naive["stages"]
    assert result.horizon == naive["horizon"] and result.steps == naive["steps"]
    # the naive forward computes every position's logits, the engine only the predicting ones: float rounding
    # differs from the first step, and Adam carries it along (~1e-2 after 100 steps at lr 0.05)
    assert torch.allclose(torch.tensor(result.memory), naive["memory"], atol=5e-2)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [*GIVEN_FIRST, "method.growth=geometric", "optim.warmup_steps=10"],
        [*GIVEN_FIRST, "optim.schedule=constant", "optim.lr=0.05", "optim.init=uniform"],
        RESET,
        ["optim.hybrid_alpha=0.2", "optim.alignment_loss=cosine", "optim.alignment_layers=2"],
    ],
    ids=["linear-cosine", "geometric-bisect-warmup", "constant-lr-uniform-init-first-token-given", "reset-lr-on-failure", "hybrid-loss"],
)
def test_engine_matches_naive_reference_loop(tiny_llama, overrides):
    cfg = progressive_config(*overrides)
    specs = specs_for(tiny_llama, 12, 3)
    results = {r.sample: r for r in cram(tiny_llama.model, specs, 1, cfg.optim, "fp32", batch_size=3, method=cfg.method)}
    growth = []
    for spec in specs:
        naive = naive_progressive(tiny_llama.model, spec.token_ids, 1, spec.init_seed, cfg.optim, cfg.method)
        compare(results[spec.sample], naive)
        growth.append(len(naive["stages"]))
    assert max(growth) >= 3, f"the samples grew through several stages: {growth}"


def test_a_failed_stage_is_retried_once_with_a_fresh_optimizer(tiny_llama):
    """method.reset_lr_on_failure: a stage that fails runs once more from the tensors it reached, with zero moments and
    the schedule from its start (the reference's progressive_reset_lr_scheduler_on_non_convergence); its record is the
    retry's, and the attempt before shows in the total steps."""
    specs = specs_for(tiny_llama, 12, 3)
    reset = {
        r.sample: r
        for r in cram(
            tiny_llama.model, specs, 1, progressive_config(*RESET).optim, "fp32", batch_size=3, method=progressive_config(*RESET).method
        )
    }
    retried = [
        (before.total_steps, record)
        for row in reset.values()
        for before, record in zip([None, *row.stage_records], row.stage_records)
        if before and record.total_steps - before.total_steps > record.steps
    ]
    assert retried, "some stage failed once and was retried"
    with pytest.raises(UserError, match="method.reset_lr_on_failure=true: a stage to retry is progressive cramming's"):
        tiny_config("method.reset_lr_on_failure=true")


def test_mixed_lengths_in_one_batch_give_each_sample_its_solo_trajectory(tiny_llama):
    """Caps 6, 9 and 12 and samples at different stages share one batch; each sample's stages, horizon, steps and
    vectors are those it has alone in a batch of the same size, bit for bit."""
    cfg = progressive_config(*GIVEN_FIRST, "method.growth=geometric", "method.backoff=linear")
    specs = specs_for(tiny_llama, 6, 2, "a") + specs_for(tiny_llama, 9, 2, "b") + specs_for(tiny_llama, 12, 2, "c")
    batched = {(r.cell, r.sample): r for r in cram(tiny_llama.model, specs, 1, cfg.optim, "fp32", batch_size=4, method=cfg.method)}
    for spec in specs:
        (alone,) = cram(tiny_llama.model, [spec], 1, cfg.optim, "fp32", batch_size=4, method=cfg.method)
        row = batched[spec.cell, spec.sample]
        assert [(r.length, r.converged, r.steps, r.phase) for r in row.stage_records] == [
            (r.length, r.converged, r.steps, r.phase) for r in alone.stage_records
        ]
        assert_bit_identical(row, alone)
    assert len({r.horizon for r in batched.values()}) > 1


def test_right_padding_changes_nothing(tiny_llama):
    """A short text right-padded into a batch with a longer one has the CE, predictions and gradient it has alone."""
    embed = tiny_llama.model.get_input_embeddings()
    short, long = specs_for(tiny_llama, 5, 1)[0].token_ids, specs_for(tiny_llama, 11, 2)[1].token_ids
    padded_ids = torch.tensor([short + [0] * 6, long])
    memory = torch.randn(2, 1, embed.weight.shape[1], requires_grad=True)
    ce, correct, _ = token_scores(tiny_llama.model, memory, embed(padded_ids), padded_ids[:, 1:], "fp32")
    ce[0, :4].mean().backward()
    alone_memory = memory.detach()[:1].clone().requires_grad_()
    ids = torch.tensor([short])
    ce_alone, correct_alone, _ = token_scores(tiny_llama.model, alone_memory, embed(ids), ids[:, 1:], "fp32")
    ce_alone.mean().backward()
    assert torch.allclose(ce[0, :4], ce_alone[0], atol=1e-5) and torch.equal(correct[0, :4], correct_alone[0])
    assert torch.allclose(memory.grad[0], alone_memory.grad[0], atol=1e-6) and memory.grad[1].abs().sum() == 0


def test_the_engines_restore_brings_back_a_rows_tensors_moments_and_schedule_position(tiny_llama):
    """Batch.restore, as a geometric back-off calls it: the restored row gets the snapshot's trainable tensors,
    moments and step count; the other row keeps its own."""
    cfg = progressive_config(
        "method.steps_per_stage=100", "method.min_length=8", "grid.lengths=[8]", "optim.lr=1e-4", "optim.min_lr=0"
    )  # no stage ends in 13 steps
    batch = Batch(tiny_llama.model, 1, cfg.optim, cfg.method, "fp32", cast_cache=False)
    batch.add(specs_for(tiny_llama, 8, 2))
    for _ in range(5):
        batch.step()
    snapshot_params = batch.params.map(lambda t: t.detach().clone())
    snapshot_adam = batch.adamw.state.map(torch.clone)
    for _ in range(7):
        batch.step()
    after_params, after_adam = batch.params.map(lambda t: t.detach().clone()), batch.adamw.state.map(torch.clone)
    batch.restore(torch.tensor([True, False]), snapshot_params, snapshot_adam)
    for now, snapshot, after in zip(
        batch.params.tensors() + batch.adamw.state.tensors(),
        snapshot_params.tensors() + snapshot_adam.tensors(),
        after_params.tensors() + after_adam.tensors(),
    ):
        assert torch.equal(now[0], snapshot[0]) and torch.equal(now[1], after[1])
    assert batch.adamw.count.tolist() == [5, 12] and all(t.is_leaf and t.requires_grad for t in batch.params.tensors())
    batch.step()  # and it trains on from there
    assert batch.adamw.count.tolist() == [6, 13]


def test_greedy_decode_of_the_stored_vectors_reproduces_the_horizon_prefix(tiny_llama):
    for overrides in ([], GIVEN_FIRST):
        cfg = progressive_config(*overrides)
        given = 0 if cfg.method.predict_first else 1
        results = list(cram(tiny_llama.model, specs_for(tiny_llama, 12, 3), 1, cfg.optim, "fp32", batch_size=3, method=cfg.method))
        assert any(r.horizon >= 3 for r in results), [r.horizon for r in results]
        for r in results:
            if r.horizon == 0:
                continue
            ids = torch.tensor(r.token_ids)[None]
            memory = torch.tensor(r.memory).view(1, 1, -1)
            decoded = greedy_decode(tiny_llama.model, memory, ids[:, :given], r.horizon - given, "fp32")
            assert torch.equal(decoded, ids[:, given : r.horizon]), (r.sample, r.horizon)
            assert r.greedy_exact and r.greedy_prefix == r.horizon - given
            assert r.info_gain_bits == pytest.approx(r.ce_no_mem_bits - r.ce_bits)
