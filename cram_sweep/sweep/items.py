"""The sweep's work: every sample's tokens (read once, on the driver), and the pending (sample, restart) runs in work
items, one `cram` call on a worker each."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from ..config import SweepConfig
from ..data import sample_token_ids
from ..engine.cram import SampleSpec
from ..engine.model import load_tokenizer, model_shape
from ..errors import UserError
from ..results.init_from import Starts
from .grid import cells, layer_counts, sample_seed
from .worker import WorkItem


def prepare_tokens(cfg: SweepConfig) -> dict[tuple[str, str], dict[int, list[int]]]:
    """Token ids of every sample, at the grid's longest length; all input errors surface here, before any work."""
    longest, deepest = max(cfg.grid.lengths), max(layer_counts(cfg.grid))
    tokens = {}
    for model in cfg.grid.models:
        shape = model_shape(model, cfg.models[model])
        if longest + max(cfg.grid.n_mem) > shape.context:
            raise UserError(
                f"grid.lengths max {longest} + grid.n_mem max {max(cfg.grid.n_mem)} exceeds the context of model {model} ({shape.context} positions): lower them"
            )
        if deepest > shape.layers:
            raise UserError(f"grid.layers contains {deepest}: model {model} has {shape.layers} decoder layers: lower it or use all")
        tokenizer = load_tokenizer(model, cfg.models[model])
        for dataset in cfg.grid.datasets:
            tokens[model, dataset] = sample_token_ids(cfg.datasets[dataset], dataset, tokenizer, cfg.grid.samples, longest, cfg.seed)
    return tokens


def samples_per_item(cfg: SweepConfig) -> int:
    """How many samples one work item (one `cram` call on a worker) holds."""
    return cfg.worker.samples_per_item or (4 * cfg.batch_size if cfg.batch_size != "auto" else 64)


def work_items(cfg: SweepConfig, tokens, done: set, starts: Optional[Starts] = None) -> list[WorkItem]:
    """The pending (sample, restart) runs not in `done` (their (cell, sample, restart) keys), grouped by (model, method,
    n_mem, layers) across cells and datasets, shortest text first, in items of `worker.samples_per_item`: a worker's batch runs
    full from one cell into the next. A sample's restarts are specs like its other samples', each with its own seed."""
    per_item, starts = samples_per_item(cfg), starts or Starts()
    groups: dict[tuple[str, str, int, int], list[SampleSpec]] = defaultdict(list)
    for cell in sorted(cells(cfg), key=lambda c: c.length):
        groups[cell.model, cell.method, cell.n_mem, cell.layers] += [
            SampleSpec(
                i,
                tokens[cell.model, cell.dataset][i][: cell.length],
                sample_seed(cfg.seed, cell, i, restart),
                cell.id,
                starts.vectors.get((cell.id, i)),
                restart,
            )
            for i in range(cfg.grid.samples)
            for restart in range(cfg.grid.restarts)
            if (cell.id, i, restart) not in done
        ]
    return [
        WorkItem(model, method, n_mem, specs[start : start + per_item], basis=starts.bases.get((method, model)), layers=layers)
        for (model, method, n_mem, layers), specs in groups.items()
        for start in range(0, len(specs), per_item)
    ]
