"""The sweep's MLflow runs: the parent run (created, or reused from SWEEP_DIR/tracking.json on a resume) with the
config as its params, and the ids of the cells' child runs (`RunIds`)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ..config import SweepConfig
from ..redact import redact
from ..results.store import SweepDir, write_atomically
from .connection import why

log = logging.getLogger("cram_sweep")

# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces), not on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass
class RunIds:
    """SWEEP_DIR/tracking.json: the MLflow ids of a sweep's runs, so `resume` and `report` reuse them.

    `uri` is where they live, redacted (the file never holds a secret); `cells` maps a cell id to its child run."""

    uri: str
    experiment: str
    parent: str
    cells: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Optional[RunIds]:
        """The ids `path` holds; None where there is no file."""
        if not path.is_file():
            return None
        ids = json.loads(path.read_text())
        return cls(uri=ids.get("uri", ""), experiment=ids["experiment"], parent=ids["parent"], cells=ids.get("cells", {}))

    def save(self, path: Path) -> None:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))


def open_parent(client, experiment, cfg: SweepConfig, sweep: SweepDir, shown_uri: str) -> RunIds:
    """The sweep's parent run: the one tracking.json names, if it still exists on this server, else a new one (in a
    new experiment where `experiment` is None) with the config as params and sweep.yaml as an artifact."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    ids = RunIds.load(sweep.tracking)
    if ids is not None and redact(ids.uri) == shown_uri:  # redact: tracking.json of older versions holds the real URI
        try:
            client.update_run(ids.parent, status="RUNNING")
            return replace(ids, uri=shown_uri)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("the sweep's MLflow runs are gone from %s: creating new ones", shown_uri)
    if experiment is None:
        location = (sweep.path.resolve().parent / "mlartifacts").as_uri() if cfg.tracking.kind == "local" else None
        experiment_id = client.create_experiment(
            cfg.tracking.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier cram-sweep
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    parent = client.create_run(experiment_id, run_name=cfg.name, tags={"cram_sweep.sweep_dir": str(sweep.path.resolve())})
    ids = RunIds(uri=shown_uri, experiment=experiment_id, parent=parent.info.run_id)
    ids.save(sweep.tracking)
    params = [Param(k, v) for k, v in flat_params(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(ids.parent, params=params[i : i + 100])
    try:  # an artifact store that fails must not stop the sweep: the config is in SWEEP_DIR too
        client.log_artifact(ids.parent, str(sweep.config))
    except Exception as err:
        log.warning("could not log sweep.yaml to MLflow's artifact store (%s)", why(err))
    return ids


def flat_params(cfg: SweepConfig) -> dict[str, str]:
    """The config as MLflow params: one per leaf key, values redacted and cut to MLflow's 500 characters."""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = redact(str(node))[:500]

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return flat
