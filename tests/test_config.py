"""Every config file composes into a checked SweepConfig; each section checks its own keys."""

import pytest

from cram_sweep.config import CONF_DIR, SweepConfig, available, compose_config
from cram_sweep.errors import UserError

from .helpers import tiny_config


@pytest.mark.parametrize("group", ["model", "dataset", "cluster", "tracking"])
def test_every_config_file_composes(group):
    names = available(group)
    assert names == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) and names
    for name in names:
        if group == "model":
            cfg = compose_config([f"grid.models=[{name}]"])
            assert cfg.models[name].source in ("hf", "gguf_package", "random")
        elif group == "dataset":
            extra = ["datasets.files.path=*.md"] if name == "files" else []
            cfg = compose_config([f"grid.datasets=[{name}]", *extra])
            assert cfg.datasets[name].source == name
        else:
            cfg = compose_config([f"{group}={name}"])
            assert getattr(cfg, group).kind == ("ray" if name == "ray" else name)
        assert isinstance(cfg, SweepConfig)


@pytest.mark.parametrize(
    "override, message",
    [
        ("grid.samples=0", "grid.samples=0: need at least 1 sample per cell"),
        ("optim.patience=0", "optim.patience=0: must be >= 1"),
        ("worker.gpus=0", "worker.gpus must be > 0"),
        ("cluster.kind=slurm", "cluster.kind=slurm: choose cluster=local or cluster=ray"),
        ("tracking.kind=none", "tracking.kind=none: choose tracking=local or tracking=server"),
        ("models.tiny_llama.architecture=gpt2", "models.tiny_llama.architecture=gpt2: a random model needs one of llama, gpt_neox"),
        ("datasets.pydoc.source=web", "datasets.pydoc.source=web: choose pydoc, pg19, files, random"),
        ("name=a/b", "name='a/b': a sweep name must be a plain directory name"),
    ],
)
def test_each_section_checks_its_keys(override, message):
    with pytest.raises(UserError) as raised:
        tiny_config(override)
    assert str(raised.value).startswith(message)


def test_the_config_is_plain_dataclasses_once_composed():
    cfg = tiny_config()
    assert type(cfg.optim).__name__ == "OptimConfig" and type(cfg.models["tiny_llama"]).__name__ == "ModelConfig"
    assert cfg.grid.lengths == [4, 8] and isinstance(cfg.grid.lengths, list)


@pytest.mark.parametrize(
    "name, params",
    [("shape_smollm2_135m", 134_515_008), ("shape_llama_3_2_1b", 1_235_814_400), ("shape_llama_3_1_8b", 8_030_261_248)],
)
def test_shape_models_have_the_published_architectures(name, params):
    """The parameter counts of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cfg = compose_config([f"grid.models=[{name}]"]).models[name]
    config = AutoConfig.for_model(model_cfg.architecture, **model_cfg.arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params


def test_method_files_compose_as_a_grid_axis():
    """Each file alone: tests/test_methods.py."""
    assert {"full", "progressive", "progressive_reference", "onestep"} <= set(available("method"))
    three = compose_config(["grid.methods=[full,progressive,onestep]", "grid.n_mem=[2]"])
    assert sorted(three.methods) == ["full", "onestep", "progressive"]
    both = compose_config(["grid.methods=[full,progressive_reference]", "optim.max_steps=300", "methods.full.optim.lr=0.05"])
    assert sorted(both.methods) == ["full", "progressive"]
    assert both.methods["progressive"].method.predict_first and both.methods["progressive"].optim.lr == 0.1, "the method file's own optim"
    assert both.methods["full"].optim.lr == 0.05 and {m.optim.max_steps for m in both.methods.values()} == {300}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grid.methods=[progressive,progressive_reference]"], "grid.methods names two progressive methods"),
        (["grid.methods=[fulll]"], "unknown method 'fulll' in grid.methods: choose from"),
        (["methods.full.optim.lr=0.1"], "methods.full.optim.lr=0.1: methods.* overrides need grid.methods"),
        (["grid.methods=[full]", "methods.full.optim.lrr=0.1"], "methods.full.optim.lrr=0.1: Key 'lrr' not in 'OptimConfig'"),
        (
            ["grid.methods=[full,progressive]", "methods.progressive.method.min_length=99"],
            "methods.progressive.method.min_length=99 exceeds",
        ),
    ],
)
def test_bad_method_axis_is_one_clear_line(overrides, message):
    with pytest.raises(UserError) as raised:
        tiny_config(*overrides)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_make_runs_demo_composes_into_both_methods():
    """`make run`'s overrides (the Makefile's DEMO) are a valid sweep of both protocols."""
    import shlex

    from .helpers import ROOT

    makefile = (ROOT / "Makefile").read_text()
    demo = makefile.split("\nDEMO = ", 1)[1].split("\nrun:", 1)[0].replace("\\\n", " ")
    cfg = compose_config(shlex.split(demo))
    assert sorted(cfg.methods) == ["full", "progressive"] and cfg.grid.models == ["smollm2"]
    assert cfg.methods["full"].optim.lr == 0.1 and cfg.methods["progressive"].method.step == 4


@pytest.mark.parametrize(
    "out_dir, message",
    [
        ("{file}", "is a file, not a directory: give out_dir=DIR"),
        ("/proc/cram-sweep-test", "cannot be created"),
        ("{file}/below", "cannot be created (Not a directory)"),
    ],
)
def test_an_out_dir_that_cannot_hold_a_sweep_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, out_dir, message):
    from cram_sweep.cli import main

    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    out_dir = out_dir.format(file=afile)
    code = main(["run", "name=x", f"out_dir={out_dir}", "grid.models=[tiny_llama]", "grid.lengths=[4]", "grid.samples=1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert afile.read_text() == "not a directory"
