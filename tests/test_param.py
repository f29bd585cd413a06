"""What is optimized (param.py) and the reference's options around it: the low-dimensional parametrization against
an independent batch-size-1 loop, its frozen projection, the inits (mvnormal, from_sweep, pca), the uncompressed
prefix and leading-token weighting, and their bad input."""

import pytest
import torch

from cram_sweep import cli
from cram_sweep.config import ParamConfig
from cram_sweep.engine.batch import Batch
from cram_sweep.engine.cram import cram
from cram_sweep.engine.param import LowDim, parametrization
from cram_sweep.engine.scores import weighted_ce
from cram_sweep.results.init_from import load_starts
from cram_sweep.results.store import SweepDir, read_results

from .helpers import (
    TINY,
    TINY_PROGRESSIVE,
    assert_bit_identical,
    assert_same_result,
    by_sample,
    naive_cram,
    specs_for,
    tiny_config,
)
from .processes import run_cli
from .test_progressive import compare, naive_progressive

LOWDIM = ["param=lowdim", "param.k=8"]


def lowdim(cfg):
    return parametrization(cfg.param)


def test_lowdim_full_cramming_is_the_naive_loop_over_z_w_and_b(tiny_llama):
    cfg = tiny_config(*LOWDIM)
    specs = specs_for(tiny_llama, 8, 3)
    engine = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=3, parametrization=lowdim(cfg)))
    for spec in specs:
        naive = naive_cram(tiny_llama.model, spec.token_ids, 2, spec.init_seed, cfg.optim, k=8)
        # nn.Linear (z @ W.T + b) against bmm rounds differently, and ~100 steps at two tensors per update amplify it:
        # the same accuracy, reached within a few steps of each other (AVX2 kernels: 97 against 94-96 at 1-2 threads),
        # the vectors (|x| ~ 20) within 5 % of their scale
        assert_same_result(engine[spec.sample], naive, atol=1.0, ce_rel=2e-2, steps_within=5)
        assert engine[spec.sample].trained_numbers == 2 * 8 + 9 * 64 and engine[spec.sample].param == "lowdim(k=8,train_projection=true)"


@pytest.mark.parametrize("growth", ["linear", "geometric"])
def test_lowdim_progressive_is_the_naive_reference_loop(tiny_llama, growth):
    cfg = tiny_config(*TINY_PROGRESSIVE, *LOWDIM, f"method.growth={growth}")
    specs = specs_for(tiny_llama, 12, 3, n_mem=1)
    results = by_sample(cram(tiny_llama.model, specs, 1, cfg.optim, "fp32", batch_size=3, method=cfg.method, parametrization=lowdim(cfg)))
    for spec in specs:
        compare(results[spec.sample], naive_progressive(tiny_llama.model, spec.token_ids, 1, spec.init_seed, cfg.optim, cfg.method, k=8))
    assert max(r.horizon for r in results.values()) >= 3


@pytest.mark.parametrize("train_projection", [True, False])
def test_lowdim_samples_do_not_feel_their_batch(tiny_llama, train_projection):
    """Mixed lengths in one batch, progressive stages apart: each sample's result is its solo one in a batch of the
    same size, bit for bit."""
    cfg = tiny_config(*TINY_PROGRESSIVE, *LOWDIM, f"param.train_projection={train_projection}", "method.growth=geometric")
    specs = specs_for(tiny_llama, 6, 2, cell="a") + specs_for(tiny_llama, 12, 2, cell="b")
    run = dict(method=cfg.method, parametrization=lowdim(cfg))
    alone = {(s.cell, s.sample): next(iter(cram(tiny_llama.model, [s], 2, cfg.optim, "fp32", batch_size=4, **run))) for s in specs}
    batched = {(r.cell, r.sample): r for r in cram(tiny_llama.model, specs[::-1], 2, cfg.optim, "fp32", batch_size=4, **run)}
    assert sorted(batched) == sorted(alone)
    for key, row in batched.items():
        assert_bit_identical(row, alone[key])


def test_a_frozen_projection_trains_n_mem_times_k_numbers_and_never_moves(tiny_llama):
    cfg = tiny_config(*LOWDIM, "param.train_projection=false")
    batch = Batch(tiny_llama.model, 2, cfg.optim, cfg.method, "fp32", cast_cache=False, parametrization=lowdim(cfg))
    batch.add(specs_for(tiny_llama, 8, 2))
    z, projection, bias = (t.detach().clone() for t in batch.params.tensors())
    for _ in range(5):
        batch.step()
    assert batch.param.trained_numbers == 2 * 8
    assert sum(t[0].numel() for t in batch.params.tensors() if t.requires_grad) == 2 * 8
    assert torch.equal(batch.params.projection, projection) and torch.equal(batch.params.bias, bias)
    assert not torch.equal(batch.params.z, z), "z trains"
    linear = torch.nn.Linear(8, 64)
    bound = 1 / 8**0.5  # nn.Linear's default init: U(-1/sqrt(k), 1/sqrt(k)) for W and b
    assert projection.abs().max() <= bound and bias.abs().max() <= bound and projection.shape[1:] == linear.weight.T.shape


def test_mvnormal_draws_around_the_embeddings_mean(tiny_llama):
    cfg = tiny_config("optim.init=mvnormal")
    param = parametrization(cfg.param)(1, tiny_llama.model.get_input_embeddings().weight, cfg.optim, "cpu")
    drawn = torch.cat([param.init([spec]).vectors[0] for spec in specs_for(tiny_llama, 8, 3, n_mem=1)])
    mean = tiny_llama.model.get_input_embeddings().weight[:-3].mean(dim=0)
    spread = (drawn - mean).norm(dim=1) / mean.norm()
    assert torch.all(spread < 0.1) and not torch.equal(drawn[0], drawn[1]), "the reference's covariance is scaled by 1e-5"
    again = torch.cat([param.init([spec]).vectors[0] for spec in specs_for(tiny_llama, 8, 3, n_mem=1)])
    assert torch.equal(drawn, again), "a function of the sample's seed alone"


@pytest.fixture(scope="module")
def stored_sweep(tmp_path_factory):
    """A finished full-cramming sweep stopped early by max_steps: samples that did not converge."""
    out = tmp_path_factory.mktemp("stored")
    run_cli("run", "name=short", f"out_dir={out}", *TINY, "grid.lengths=[8]", "optim.max_steps=20", "optim.patience=20")
    return out / "short"


@pytest.mark.slow  # stored_sweep: a sweep in a process of its own
def test_from_sweep_continues_a_stored_sample_from_its_accuracy(tiny_llama, stored_sweep):
    stored = {r["sample"]: r for r in read_results(SweepDir(stored_sweep)).to_pylist()}
    assert any(not r["converged"] for r in stored.values())
    cfg = tiny_config("grid.lengths=[8]", "optim.init=from_sweep", f"optim.init_from={stored_sweep}", "optim.max_steps=1")
    starts = load_starts(cfg)
    specs = specs_for(tiny_llama, 8, 3)
    for spec in specs:
        spec.init_vectors = starts.vectors["tiny_llama/pydoc/full/n_mem=2/L=8", spec.sample]
    first = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=3))
    for sample, row in first.items():
        assert row.acc == pytest.approx(stored[sample]["acc"], abs=1e-6), "the first forward is the stored vectors'"
        assert row.memory == pytest.approx(stored[sample]["memory"], abs=1e-6)


@pytest.mark.slow  # stored_sweep: a sweep in a process of its own
def test_a_from_sweep_sweep_goes_on_where_the_stored_one_stopped(tmp_path, stored_sweep):
    """Through the CLI and the workers: more steps from the stored vectors reach at least the stored accuracy."""
    run_cli(
        "run", "name=more", f"out_dir={tmp_path}", *TINY, "grid.lengths=[8,10]", "optim.init=from_sweep", f"optim.init_from={stored_sweep}"
    )
    stored = {r["sample"]: r["acc"] for r in read_results(SweepDir(stored_sweep)).to_pylist()}
    more = read_results(SweepDir(tmp_path / "more")).to_pylist()
    assert all(r["acc"] >= stored[r["sample"]] - 1e-6 for r in more if r["length"] == 8)
    assert {r["length"] for r in more} == {8, 10}, "length 10 starts from the stored length 8 (a shorter cap)"


@pytest.mark.slow  # stored_sweep: a sweep in a process of its own
def test_pca_takes_w_and_b_from_the_stored_vectors(tiny_llama, stored_sweep):
    cfg = tiny_config("grid.lengths=[8]", *LOWDIM, "param.k=4", "optim.init=pca", f"optim.init_from={stored_sweep}")
    basis = load_starts(cfg).bases["full", "tiny_llama"]
    points = torch.cat([torch.tensor(r["memory"]).view(2, -1) for r in read_results(SweepDir(stored_sweep)).to_pylist()])
    assert basis.components.shape == (4, 64) and torch.allclose(basis.mean, points.mean(dim=0), atol=1e-6)
    assert torch.allclose(basis.components @ basis.components.T, torch.eye(4), atol=1e-5), "orthonormal directions"
    param = LowDim(cfg.param, basis, 2, tiny_llama.model.get_input_embeddings().weight, cfg.optim, "cpu")
    rows = param.init(specs_for(tiny_llama, 8, 1))
    assert torch.equal(rows.projection[0], basis.components) and torch.equal(rows.bias[0], basis.mean)
    (result,) = cram(tiny_llama.model, specs_for(tiny_llama, 8, 1), 2, cfg.optim, "fp32", parametrization=parametrization(cfg.param, basis))
    assert result.steps >= 1 and result.acc >= 0


@pytest.mark.parametrize("method", ["full", "progressive"])
def test_no_prefix_token_is_ever_a_target(tiny_llama, monkeypatch, method):
    from cram_sweep.engine import batch as engine

    prefix = 3
    cfg = tiny_config(*(TINY_PROGRESSIVE if method == "progressive" else []), f"method.prefix_tokens={prefix}", "grid.lengths=[10]")
    specs = specs_for(tiny_llama, 10, 2)
    seen = []
    scores = engine.token_scores

    def recording(model, memory, text_embeds, targets, *args):
        if memory is not None:
            seen.append(targets.clone())
        return scores(model, memory, text_embeds, targets, *args)

    monkeypatch.setattr(engine, "token_scores", recording)
    rows = list(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=2, method=cfg.method))
    after_prefix = [spec.token_ids[prefix:] for spec in specs]
    assert seen
    for targets in seen:  # each live row, of whichever samples are still in the batch, starts right after the prefix
        live = [row for row in targets.tolist() if any(row)]  # inert rows (layout.py) are zeros
        assert live and all(any(row == ids[: len(row)] for ids in after_prefix) for row in live), targets
    for row in rows:
        assert row.horizon <= 10 - prefix and not row.predict_first
        if method == "progressive":
            assert all(r.length <= 10 - prefix for r in row.stage_records), "stages count the tokens after the prefix"


def test_a_zero_prefix_changes_nothing(tiny_llama):
    cfg, zero = tiny_config(*TINY_PROGRESSIVE), tiny_config(*TINY_PROGRESSIVE, "method.prefix_tokens=0")
    specs = specs_for(tiny_llama, 8, 2)
    plain = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=2, method=cfg.method))
    for sample, row in by_sample(cram(tiny_llama.model, specs, 2, zero.optim, "fp32", batch_size=2, method=zero.method)).items():
        assert row.memory == plain[sample].memory and row.stage_records == plain[sample].stage_records


def test_leading_targets_weigh_more_in_the_loss_only(tiny_llama):
    cfg = tiny_config("optim.leading_weight=3.0", "optim.leading_count=2")
    ce_tok = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    expected = torch.tensor([(3 * 1 + 3 * 2 + 3 + 4) / 4, (3 + 3 + 1) / 3])
    assert torch.allclose(weighted_ce(ce_tok, mask, cfg.optim), expected) and torch.allclose(
        weighted_ce(ce_tok[:1], torch.ones_like(mask[:1]), cfg.optim), expected[:1]
    )
    weighted = by_sample(cram(tiny_llama.model, specs_for(tiny_llama, 8, 2), 2, cfg.optim, "fp32", batch_size=2))
    plain = by_sample(cram(tiny_llama.model, specs_for(tiny_llama, 8, 2), 2, tiny_config().optim, "fp32", batch_size=2))
    assert any(weighted[s].memory != plain[s].memory for s in plain), "the loss changed the trajectory"
    for row in weighted.values():
        assert row.acc <= 1.0 and row.ce_bits > 0, "accuracy and CE stay the unweighted ones"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["param=lowdim", "param.k=0"], "param.k=0: the low-dimensional width must be >= 1"),
        (
            ["optim.init=pca", "optim.init_from=outputs"],
            "optim.init=pca draws the low-dimensional coefficients' subspace: it needs param=lowdim",
        ),
        (["optim.init=from_sweep", "optim.init_from=/nonexistent"], "optim.init_from=/nonexistent: not a sweep directory"),
        (["method.prefix_tokens=4"], "method.prefix_tokens=4 leaves nothing to predict at the shortest length"),
        (["optim.leading_count=-1"], "optim.leading_count=-1: must be >= 0"),
        (["optim.hybrid_alpha=-0.5"], "optim.hybrid_alpha=-0.5: must be >= 0"),
        (["optim.alignment_loss=mse"], "optim.alignment_loss=mse: choose l2, l1, cosine"),
        (["method=onestep", "method.prefix_tokens=1"], "method=onestep feeds no text: it takes neither method.prefix_tokens"),
        (["method=onestep", "optim.hybrid_alpha=0.1"], "optim.hybrid_alpha=0.1: method=onestep feeds no text"),
        (["method=onestep", "grid.n_mem=[1]"], "grid.n_mem=[1]: method=onestep trains two vectors, e and m"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    assert cli.main(["run", f"out_dir={tmp_path}", *TINY, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir()), "nothing written before the error"


@pytest.mark.slow  # stored_sweep: a sweep in a process of its own
def test_a_sample_missing_from_the_init_sweep_is_one_line(tmp_path, capsys, stored_sweep):
    args = [
        "run",
        f"out_dir={tmp_path}",
        *TINY,
        "grid.lengths=[8]",
        "grid.samples=5",
        "optim.init=from_sweep",
        f"optim.init_from={stored_sweep}",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"optim.init_from={stored_sweep} has no stored sample 3 of tiny_llama/pydoc with n_mem=2 at length <= 8" in err
    assert err.count("\n") == 1


def test_the_param_label_names_its_settings():
    assert ParamConfig().label == "direct"
    assert ParamConfig(name="lowdim", k=32, train_projection=False).label == "lowdim(k=32,train_projection=false)"


@pytest.mark.slow
def test_a_lowdim_progressive_sweep_as_a_user_runs_it(tmp_path, capsys):
    """`cram-sweep run param=lowdim param.k=8 method=progressive ...`: rows say what was trained, the report counts
    it, and decode reproduces the horizon from the stored vectors (z @ W + b)."""
    run_cli("run", "name=low", f"out_dir={tmp_path}", *TINY, *TINY_PROGRESSIVE, *LOWDIM, "grid.lengths=[8]", "report=true")
    sweep = SweepDir(tmp_path / "low")
    rows = read_results(sweep).to_pylist()
    assert {(r["param"], r["trained_numbers"]) for r in rows} == {("lowdim(k=8,train_projection=true)", 2 * 8 + 9 * 64)}
    assert all(len(r["memory"]) == 2 * 64 for r in rows)
    capacity = (sweep.report / "capacity.csv").read_text()
    assert '"lowdim(k=8,train_projection=true)",592,' in capacity
    best = max(rows, key=lambda r: r["horizon"])
    assert cli.main(["decode", str(sweep.path), "--cell", best["cell"], "--sample", str(best["sample"])]) == 0
    assert "the horizon prefix decodes exactly: yes" in capsys.readouterr().out
