"""Experiment tracking (the ``tracking:`` section, docs/tracking.md): each soup run's search
trace and method scores, for TensorBoard (event files under ``<output_uri>/tracking/tensorboard``
by default) and MLflow (``tracking.mlflow_uri``); the finetune trials' metrics go to the same
places through Ray Tune's logger callbacks (finetune/callbacks.py). Tracking records results; it
never changes one."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import storage
from .config import Config, redact

Log = Callable[[str], None]
# a remote event folder is copied up at most this often while a trial runs (and when it ends)
SYNC_EVERY_S = 60.0
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def tensorboard_uri(cfg: Config) -> str | None:
    """The root of the TensorBoard event folders (finetune/<trial>, soup/<run id>), or None."""
    t = cfg.tracking
    if not t.tensorboard:
        return None
    return storage.normalise(t.tensorboard_uri) if t.tensorboard_uri else storage.join(cfg.output_uri, "tracking", "tensorboard")


def mlflow_uri(cfg: Config) -> str | None:
    """The MLflow tracking URI (a path as an absolute file:// URI), or None. A file store is
    allowed explicitly: MLflow 3 refuses one unless MLFLOW_ALLOW_FILE_STORE is set."""
    uri = cfg.tracking.mlflow_uri
    if uri is None:
        return None
    if "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).expanduser().absolute().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class EventDir:
    """A folder of tensorboardX event files at ``uri``: written in place when local; when remote,
    written to a local staging folder that ``sync`` copies up."""

    def __init__(self, uri: str):
        loc = storage.resolve(uri)
        self.uri, self.remote = loc.uri, storage.is_remote(loc.uri)
        self.path = tempfile.mkdtemp(prefix="frankensoup-tensorboard-") if self.remote else loc.path
        self.synced = time.monotonic()

    def sync(self) -> None:
        self.synced = time.monotonic()
        if not self.remote:
            return
        for root, _, files in os.walk(self.path):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.path)
                with open(os.path.join(root, name), "rb") as f:
                    storage.write_bytes(storage.join(self.uri, *rel.split(os.sep)), f.read())

    def close(self) -> None:
        """Copy up what is left and drop the staging folder (a remote folder's)."""
        self.sync()
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)


# ---- soup: the search trace and the methods' scores ----------------------------------------

def soup_scalars(report: Mapping) -> tuple[list[tuple[int, float]], dict[str, float]]:
    """(search trace as (evaluations, best val), {"<method>/<val|id_test|ood_avg>": accuracy})."""
    trace = [(int(n), float(v)) for n, v in report.get("search_trace") or [] if v is not None]
    scores = {f"{name}/{k}": float(entry[k]) for name, entry in report["methods"].items()
              for k in ("val", "id_test", "ood_avg") if entry.get(k) is not None}
    return trace, scores


def log_soup(cfg: Config, report: Mapping, log: Log = print) -> None:
    """The soup run ``report`` (report.json's content) for TensorBoard (``soup/<run id>``:
    ``search/best_val`` by evaluations, ``<method>/val|id_test|ood_avg``) and MLflow (one run
    named after the run id, in ``tracking.mlflow_experiment``). A run already logged is not
    logged again. Called after publishing: a tracking failure is a warning, not a failed run."""
    run_id = report["run_id"]
    trace, scores = soup_scalars(report)
    where = []
    try:
        tb = tensorboard_uri(cfg)
        if tb is not None:
            where.append(_soup_tensorboard(storage.join(tb, "soup", run_id), trace, scores))
        uri = mlflow_uri(cfg)
        if uri is not None:
            where.append(_soup_mlflow(uri, cfg.tracking.mlflow_experiment, report, trace, scores))
    except Exception as e:  # the run is published; tracking servers and stores fail in their own ways
        print(f"frankensoup: warning: soup run {run_id} not tracked: {type(e).__name__}: {redact(str(e))}",
              file=sys.stderr)
        return
    if where:
        log(f"soup: tracked run {run_id} in " + redact(", ".join(where)))


def _soup_tensorboard(uri: str, trace: list[tuple[int, float]], scores: dict[str, float]) -> str:
    if storage.listdir(uri):
        return f"{uri} (already there)"
    from tensorboardX import SummaryWriter

    d = EventDir(uri)
    with SummaryWriter(d.path) as w:
        for n, best in trace:
            w.add_scalar("search/best_val", best, global_step=n)
        for tag, value in scores.items():
            w.add_scalar(tag, value, global_step=0)
    d.close()
    return uri


def _flat(prefix: str, value) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}", sub).items()}
    return {prefix: str(value)}


def _soup_mlflow(uri: str, experiment: str, report: Mapping, trace: list[tuple[int, float]],
                 scores: dict[str, float]) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run_id = report["run_id"]
    if client.search_runs([exp_id], filter_string=f"tags.`frankensoup.run_id` = '{run_id}'", max_results=1):
        return f"MLflow {redact(uri)} (already there)"
    run = client.create_run(exp_id, run_name=run_id, tags={"frankensoup.stage": "soup", "frankensoup.run_id": run_id})
    now = int(time.time() * 1000)
    metrics = [Metric("search/best_val", best, now, n) for n, best in trace]
    metrics += [Metric(tag, value, now, 0) for tag, value in scores.items()]
    params = [Param(k, v) for k, v in _flat("soup", report.get("config", {}).get("soup", {})).items()]
    tags = [RunTag("frankensoup.soup_key", str(report.get("soup_key", "")))]
    for i in range(0, max(len(metrics), 1), METRICS_PER_BATCH):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + METRICS_PER_BATCH],
                         params=params if i == 0 else [], tags=tags if i == 0 else [])
    client.set_terminated(run.info.run_id)
    return f"MLflow {redact(uri)} (experiment {experiment!r}, run {run.info.run_id})"
