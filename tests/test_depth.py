"""grid.layers: capacity against depth, the model cut to its first k decoder layers, then its final norm and head."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cram_sweep.engine.cram import cram
from cram_sweep.engine.model import truncated
from cram_sweep.errors import UserError
from cram_sweep.results.store import SweepDir, read_results

from .helpers import TINY, by_sample, specs_for, tiny_config
from .processes import run_cli
from .test_sweep import mlflow_runs


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_neox"])
def test_a_truncated_model_is_the_model_built_with_its_first_layers(fixture, request):
    """The same modules, no copy: its logits are those of a model built with k layers from the same weights, bit for
    bit; the full model is untouched, and a truncation is made once."""
    lm = request.getfixturevalue(fixture)
    short = truncated(lm.model, 1)
    config = lm.model.config.__class__(**{**lm.model.config.to_dict(), "num_hidden_layers": 1})
    built = AutoModelForCausalLM.from_config(config)
    built.load_state_dict({k: v for k, v in lm.model.state_dict().items() if ".layers.1." not in k})
    inputs = torch.randn(2, 5, lm.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(short(inputs_embeds=inputs).logits, built(inputs_embeds=inputs).logits)
        assert not torch.allclose(short(inputs_embeds=inputs).logits, lm.model(inputs_embeds=inputs).logits)
    assert len(lm.model.base_model.layers) == 2 and truncated(lm.model, 1) is short and truncated(lm.model, 0) is lm.model
    assert short.get_output_embeddings() is lm.model.get_output_embeddings(), "the head is shared"


def test_a_truncated_sample_starts_from_the_same_init_and_learns_otherwise(tiny_llama):
    cfg = tiny_config("optim.max_steps=20", "optim.patience=20")
    specs = specs_for(tiny_llama, 8, 2)
    whole = by_sample(cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=2))
    one = by_sample(cram(truncated(tiny_llama.model, 1), specs, 2, cfg.optim, "fp32", batch_size=2))
    assert all(whole[s].ce_no_mem_bits != one[s].ce_no_mem_bits and whole[s].memory != one[s].memory for s in whole)


@pytest.mark.parametrize(
    "layers,message",
    [
        ("[0]", "grid.layers contains 0: give decoder-layer counts >= 1, or all"),
        ("[1,1]", "grid.layers=[1, 1]: each count once"),
        ("[some]", "grid.layers contains some"),
    ],
)
def test_bad_layer_counts_are_one_line(layers, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(f"grid.layers={layers}")


@pytest.mark.slow
def test_a_depth_axis_sweep_reports_capacity_against_layers(tmp_path, capsys):
    """One sweep over grid.layers=[1,all]: a cell per depth (the whole model's ids as before the axis), the layers in
    the rows, the report's table and plot against layers, MLflow's by_layers curve, and decode on the cut model; more
    layers than the model has is one line, before any work."""
    from cram_sweep.cli import main

    args = [f"out_dir={tmp_path}", *TINY, "grid.lengths=[6]", "grid.samples=2", "worker.progress_seconds=0"]
    assert main(["run", "name=deep", *args, "grid.layers=[3]"]) == 2
    assert "grid.layers contains 3: model tiny_llama has 2 decoder layers" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()
    run_cli("run", "name=depth", *args, "grid.layers=[1,all]", "report=true")
    sweep = SweepDir(tmp_path / "depth")
    rows = read_results(sweep).to_pylist()
    assert sorted({(r["cell"], r["layers"]) for r in rows}) == [
        ("tiny_llama/pydoc/full/n_mem=2/L=6", 0),
        ("tiny_llama/pydoc/full/n_mem=2/layers=1/L=6", 1),
    ]
    text = (sweep.report / "capacity.md").read_text()
    assert "## Capacity against layers" in text and "| 1 layers | all layers |" in text
    assert (sweep.report / "capacity_vs_layers.png").exists()
    parents, children = mlflow_runs(tmp_path)
    assert "max_tokens/tiny_llama/pydoc/full/n_mem_2/by_layers" in parents[0].data.metrics
    assert sorted(c.data.tags["layers"] for c in children) == ["0", "1"]
    cut = next(r for r in rows if r["layers"] == 1)
    assert main(["decode", str(sweep.path), "--cell", cut["cell"], "--sample", str(cut["sample"])]) == 0
    assert f"(stored: greedy_prefix {cut['greedy_prefix']}," in capsys.readouterr().out
