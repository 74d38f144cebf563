"""Ray Tune's logger callbacks for the ``tracking:`` section: every finetune trial's metrics for
TensorBoard (``<tensorboard>/finetune/<ingredient id>-<key>``) and MLflow (one run per trial,
named after its ingredient). Built in the driver; the Tuner pickles them with its state."""
from __future__ import annotations

import time
from collections.abc import Sequence

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import TBXLoggerCallback

from .. import storage
from ..config import Config
from ..tracking import SYNC_EVERY_S, EventDir, mlflow_uri, tensorboard_uri


def tune_callbacks(cfg: Config, todo: Sequence[dict], sweep: str) -> list:
    """The logger callbacks ``tracking`` asks for, for the sweep named ``sweep`` over the trials
    ``todo`` (trial_plan rows): TensorBoard and/or MLflow."""
    trials = {t["trial"]: {"id": t["id"], "key": t["key"], "hparams": t["hparams"]} for t in todo}
    callbacks: list = []
    tb = tensorboard_uri(cfg)
    if tb is not None:
        callbacks.append(TrialTensorBoard(storage.join(tb, "finetune"), trials))
    uri = mlflow_uri(cfg)
    if uri is not None:
        callbacks.append(TrialMLflow(trials, tracking_uri=uri, experiment_name=cfg.tracking.mlflow_experiment,
                                     tags={"frankensoup.stage": "finetune", "frankensoup.sweep": sweep,
                                           "frankensoup.output_uri": storage.normalise(cfg.output_uri)}))
    return callbacks


class TrialTensorBoard(TBXLoggerCallback):
    """Tune's TensorBoard logger, writing each trial to ``<root>/<ingredient id>-<key>`` (one run
    per distinct training, a restored trial continuing its own) instead of Tune's trial folder."""

    def __init__(self, root: str, trials: dict[int, dict]):
        super().__init__()
        self.root, self.trials = root, trials
        self._dirs: dict = {}

    def _dir(self, trial) -> EventDir:
        if trial not in self._dirs:
            t = self.trials.get(trial.config.get("trial"))
            name = f"{t['id']}-{t['key'][:8]}" if t else str(trial)
            self._dirs[trial] = EventDir(storage.join(self.root, name))
        return self._dirs[trial]

    def log_trial_start(self, trial):
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        self._trial_writer[trial] = self._summary_writer_cls(self._dir(trial).path, flush_secs=30)
        self._trial_result[trial] = {}

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, result)
        d = self._dir(trial)
        if d.remote and time.monotonic() - d.synced >= SYNC_EVERY_S:
            d.sync()

    def log_trial_end(self, trial, failed=False):
        super().log_trial_end(trial, failed)
        if trial in self._dirs:
            self._dirs[trial].sync()


class TrialMLflow(MLflowLoggerCallback):
    """Ray's MLflow logger with each trial's run named after its ingredient, its content key as
    a tag and its hyperparameters as params."""

    def __init__(self, trials: dict[int, dict], **kwargs):
        super().__init__(**kwargs)
        self.trials = trials

    def log_trial_start(self, trial):
        t = self.trials.get(trial.config.get("trial"))
        if trial not in self._trial_runs and t is not None:
            tags = {**self.tags, "trial_name": str(trial), "frankensoup.key": t["key"]}
            run = self.mlflow_util.start_run(tags=tags, run_name=t["id"])
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=t["hparams"])
        super().log_trial_start(trial)
