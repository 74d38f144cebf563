"""The finetune stage: one ingredient per trial, each keyed by what it reads (the train split's
content, the zero-shot head's sha256, its own hyperparameters and the settings that change
training). Trials whose key is in the registry are reused; the rest are trained under Ray Tune
(a sweep interrupted under the same plan is restored, not restarted). Imported ingredients stay."""
from __future__ import annotations

import math
import os
import time

import numpy as np
from ray import tune

from .. import console, layout, storage
from ..config import Config
from ..data import shards
from ..errors import UserError
from ..ingredients import RunModel, read_registry, registry_key, usable
from ..keys import digest, result_settings
from ..metrics import current_run
from ..raycluster import PLACEMENT_FIELDS
from .import_ingredients import begin_publish, finish_publish
from .trainable import MODEL_FILE, resolved_loader, train_ingredient


class FinetuneError(UserError, RuntimeError):
    """A sweep that did not produce a full set of ingredients; the message says what to do."""


# ---- what every trial gets ---------------------------------------------------------------

def start_uri(cfg: Config) -> str:
    """The classifier every trial starts from: prepare's zero-shot one, or the linear probe (probe.py)."""
    return layout.probe_uri(cfg) if cfg.finetune.init == "linear_probe" else layout.zeroshot_uri(cfg)


def start_sha256(cfg: Config) -> str | None:
    """The start classifier's sha256 (None: a linear probe not trained yet for the current inputs)."""
    from ..prepared import zero_shot_record
    from .linear_probe import current_record

    zero_shot = zero_shot_record(cfg)["sha256"]  # fails, naming prepare, when there is no zero-shot head
    if cfg.finetune.init == "zero_shot":
        return zero_shot
    record = current_record(cfg)
    return None if record is None else record["sha256"]


def trial_setup(cfg: Config) -> dict:
    """The fixed part of a trial's config: inputs by URI, optimiser settings, the test hook."""
    ft = cfg.finetune
    _, train = layout.split_of_role(cfg, "train")
    _, val = layout.split_of_role(cfg, "val")
    return {"start_uri": start_uri(cfg), "train_uri": train.uri, "val_uri": val.uri,
            "batch_size": ft.batch_size, "warmup_steps": ft.warmup_steps, "grad_clip": ft.grad_clip,
            "threads": ft.threads, "seed": ft.seed, "inject_failure": ft.inject_failure,
            "loader": ft.loader, "memory_limit_gb": ft.memory_limit_gb, "loader_workers": ft.loader_workers,
            "shuffle_buffer": ft.shuffle_buffer, "train_crop": ft.train_crop}


def check_train_order(cfg: Config, preprocess: dict) -> None:
    """A train split streamed shard by shard must have been written in shuffled order: a stream
    mixes only the shards a worker has open, so a split written class folder by class folder
    gives batches of a few classes. The memory loader shuffles the whole split itself."""
    setup = trial_setup(cfg)
    info = shards.split_info(setup["train_uri"])
    if info.get("order") == "shuffled":
        return
    if resolved_loader(setup, preprocess) != "stream":
        return
    name, _ = layout.split_of_role(cfg, "train")
    raise FinetuneError(f"train split {name!r} ({setup['train_uri']}) would be streamed shard by shard but its rows "
                        f"were not shuffled (dataset.json order: {info.get('order', 'not recorded')}), so a batch "
                        f"would hold a few classes: import it with --shuffle-seed N (or finetune.loader: memory)")


def trial_hparams(cfg: Config, trial: int) -> dict:
    """Model soups' sweep (log-uniform lr and weight decay, choices for the rest), drawn from a
    generator seeded by (finetune.seed, trial) alone: trial 3's hyperparameters are the same
    whether the sweep has 4 trials or 12."""
    space = cfg.finetune.space
    rng = np.random.default_rng([cfg.finetune.seed, trial])

    def log_uniform(bounds):
        return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))

    def choice(options):
        return options[int(rng.integers(len(options)))]

    return {"lr": log_uniform(space.lr), "weight_decay": log_uniform(space.weight_decay),
            "epochs": int(choice(space.epochs)), "label_smoothing": float(choice(space.label_smoothing)),
            "randaugment_magnitude": float(choice(space.randaugment_magnitude)),
            "mix_prob": float(choice(space.mix_prob)), "randaugment_ops": int(choice(space.randaugment_ops))}


def training_settings(cfg: Config) -> dict:
    """The finetune settings that change what a trial learns (not how many trials, not the space:
    a trial's hyperparameters stand for their draw; not the start, whose sha256 the key holds)."""
    settings = result_settings(cfg.finetune)
    for name in ("num_trials", "space", "init", "linear_probe"):
        settings.pop(name)
    return settings


def trial_key(train_content: str, base_sha256: str, trial: int, hparams: dict, settings: dict) -> str:
    return digest({"train": train_content, "base": base_sha256, "trial": trial, "hparams": hparams,
                   "settings": settings})


def trial_plan(cfg: Config) -> list[dict]:
    """Every trial of the sweep: its index, ingredient id, hyperparameters and key (keyed by the
    start classifier's sha256: a linear probe not trained yet keys every trial as new)."""
    base = start_sha256(cfg)
    _, train = layout.split_of_role(cfg, "train")
    content = shards.split_content(train.uri)
    settings = training_settings(cfg)
    plan = []
    for trial in range(cfg.finetune.num_trials):
        hp = trial_hparams(cfg, trial)
        plan.append({"trial": trial, "id": ingredient_id(trial), "hparams": hp,
                     "key": trial_key(content, base, trial, hp, settings)})
    return plan


# ---- where Tune keeps the experiment -------------------------------------------------------

def experiment_name(todo: list[dict]) -> str:
    # one experiment per set of trials to train: another plan never restores this sweep
    return f"sweep-{digest(sorted(t['key'] for t in todo))[:16]}"


def experiment_location(cfg: Config, todo: list[dict]) -> tuple[str, object | None, str]:
    """(storage_path, storage_filesystem or None, experiment path) for Tune. Remote storage
    goes through our own pyarrow filesystem, so AWS_ENDPOINT_URL & co. apply as everywhere."""
    loc = storage.resolve(layout.tune_storage(cfg))
    name = experiment_name(todo)
    if storage.is_remote(loc.uri):
        return loc.path, loc.fs, f"{loc.path}/{name}"
    return loc.path, None, storage.join(loc.path, name)


class TrialGauges(tune.Callback):
    """Dashboard gauges of trials running/finished. The metrics are built in `setup`, in the
    driver, because the Tuner pickles its callbacks and a live metrics thread cannot be."""

    def __init__(self, run: str):
        self.run, self._inner, self._metrics = run, None, None

    def __getstate__(self):
        return {"run": self.run, "_inner": None, "_metrics": None}

    def setup(self, **info):
        try:
            from ..metrics import RunMetrics, tune_callback

            self._metrics = RunMetrics(self.run, "finetune")
            self._inner = tune_callback(self._metrics)
        except Exception as e:  # metrics are a nicety: no metrics agent must not stop the sweep
            print(f"finetune: dashboard metrics unavailable ({e})")

    def _forward(self, hook: str, **info):
        if self._inner is not None:
            getattr(self._inner, hook)(**info)

    def on_trial_start(self, **info):
        self._forward("on_trial_start", **info)

    def on_trial_restore(self, **info):
        self._forward("on_trial_restore", **info)

    def on_trial_complete(self, **info):
        self._forward("on_trial_complete", **info)

    def on_trial_error(self, **info):
        self._forward("on_trial_error", **info)

    def on_experiment_end(self, trials, **info):
        if self._metrics is not None:
            self._metrics.close()


class TrialLog(tune.Callback):
    """One console line per trial event (start, each epoch, restore, finish, error) instead of
    Tune's status tables, which come back with ``-v``; a finished trial's line says the rate and
    ETA of the trials left (console.Progress, from the trials finished so far)."""

    def __init__(self, ids: dict[int, str], total: int):
        self.ids, self.total, self.finished = ids, total, 0
        self._progress: console.Progress | None = None

    def __getstate__(self):
        return {**self.__dict__, "_progress": None}  # the Tuner pickles its callbacks

    def setup(self, **info):
        self._progress = console.Progress(self.total, "finetune", "trial", bar=False)

    def _name(self, trial) -> str:
        return self.ids.get(trial.config.get("trial"), str(trial))

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"finetune: {self._name(trial)} started")

    def on_trial_restore(self, iteration, trials, trial, **info):
        print(f"finetune: {self._name(trial)} restored from its last checkpoint")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if console.verbosity() >= console.VERBOSE:  # each epoch's line with -v; its end always
            print(f"finetune: {self._name(trial)} epoch {result.get('epoch')} val_acc={result.get('val_acc', float('nan')):.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        if self._progress is None:
            self.setup()
        self._progress.update(self.finished, force=True,
                              text=f"{self._name(trial)} finished ({self.finished}/{self.total}; Tune trial "
                                   f"{trial.trial_id}){_last_result(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"finetune: {self._name(trial)} failed (retried from its last checkpoint while "
              "finetune.max_failures allows)")


def _last_result(trial) -> str:
    """": val_acc 0.9598 after 4 epochs" from a finished trial's last report, if it has one."""
    last = trial.last_result or {}
    if "val_acc" not in last:
        return ""
    return f": val_acc {last['val_acc']:.4f} after {last.get('epoch', '?')} epochs"


def build_tuner(cfg: Config, todo: list[dict], force: bool = False, log=print):
    """A fresh Tuner over the trials in ``todo``, or the restored one when that sweep was
    interrupted. Fixed inputs go through ``tune.with_parameters``; the only searched value is
    the trial index, so Tune's tables show one column."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .callbacks import tune_callbacks

    ft = cfg.finetune
    hparams = {t["trial"]: t["hparams"] for t in todo}
    trainable = tune.with_resources(tune.with_parameters(train_ingredient, setup=trial_setup(cfg), hparams=hparams),
                                    {"cpu": ft.resources.cpu, "gpu": ft.resources.gpu})
    storage_path, fs, path = experiment_location(cfg, todo)
    name = experiment_name(todo)
    # every epoch's checkpoint forces an experiment snapshot (num_to_keep is set): that keeps a
    # crashed sweep's restore current, so Tune's warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if console.verbosity() < console.VERBOSE:
        # Tune's new output engine prints its experiment box and paths even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if force and tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"finetune: --force: discarding the previous sweep at {path}")
        storage.delete(storage.join(layout.tune_storage(cfg), name))
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"finetune: restoring the interrupted sweep at {path} (finished trials are kept)")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t["trial"] for t in todo])},
        tune_config=tune.TuneConfig(
            num_samples=1, metric="val_acc", mode="max",
            # Tune ignores TuneConfig.max_concurrent_trials once a search_alg is given
            search_alg=BasicVariantGenerator(random_state=ft.seed, max_concurrent=ft.max_concurrent)),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # Tune's tables only with -v; our TrialLog gives one line per trial event
            verbose=None if console.verbosity() >= console.VERBOSE else 0,
            callbacks=[TrialGauges(current_run()), *tune_callbacks(cfg, todo, name)]
            + ([TrialLog({t["trial"]: t["id"] for t in todo}, len(todo))] if console.verbosity() > console.QUIET else [])),
    )


# ---- from Tune's results to the registry -------------------------------------------------

def ingredient_id(trial: int) -> str:
    return f"ft-{trial:03d}"


def check_complete(results) -> None:
    """Refuse to register a sweep with failed or unfinished trials (the rerun resumes them)."""
    # a trial that failed before its first report has no config in its result: name its folder
    failed = [((r.config or {}).get("trial", os.path.basename(str(r.path))), r.error)
              for r in results if r.error is not None]
    if failed:
        lines = "; ".join(f"trial {t}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
                          for t, e in failed)
        raise FinetuneError(f"{len(failed)} of {len(results)} finetune trials failed ({lines}); "
                            f"run `frankensoup finetune` again to retry them from their checkpoints")
    unfinished = len(results) - results.num_terminated
    if unfinished:
        raise FinetuneError(f"the sweep stopped with {unfinished} of {len(results)} trials unfinished; "
                            f"run `frankensoup finetune` again to resume it")


def final_checkpoint_bytes(result) -> bytes:
    ckpt = result.checkpoint
    if ckpt is None:
        raise FinetuneError(f"trial {result.config.get('trial')} finished without a checkpoint")
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{MODEL_FILE}") as f:
        return f.read()


def trained_rows(cfg: Config, results, todo: list[dict]) -> list[dict]:
    """Copy each trial's final model to ingredients/<id>.safetensors (one at a time, so a big
    sweep never holds every checkpoint in memory); its registry row, keyed."""
    by_trial = {t["trial"]: t for t in todo}
    _, val = layout.split_of_role(cfg, "val")
    val_content = shards.split_content(val.uri)
    rows = []
    for result in sorted(results, key=lambda r: r.config["trial"]):
        t = by_trial[result.config["trial"]]
        data = final_checkpoint_bytes(result)
        dest = layout.ingredient_uri(cfg, t["id"])
        storage.write_bytes(dest, data)
        rows.append({"id": t["id"], "hparams": t["hparams"], "val_acc": float(result.metrics["val_acc"]),
                     "val_content": val_content, "checkpoint_uri": dest, "sha256": storage.sha256(data),
                     "status": "ok", "source": "tune", "key": t["key"], "node_id": result.metrics.get("node_id"),
                     "placement": {k: result.metrics.get(k) for k in PLACEMENT_FIELDS if k != "node_id"},
                     "restored_from_epoch": result.metrics.get("restored_from_epoch", 0),
                     "trial_id": result.metrics.get("trial_id")})
    return rows


def print_summary(rows: list[dict], log=print) -> None:
    log(f"  {'id':<8} {'val_acc':>7}  {'lr':>8} {'wd':>8} {'ep':>3} {'ls':>4} {'randaug':>9} {'mix':>4}")
    for r in rows:
        h = r["hparams"]
        randaug = f"m{h['randaugment_magnitude']:g}-n{h.get('randaugment_ops', 2)}"  # timm's rand-m{M}-n{N}
        log(f"  {r['id']:<8} {r['val_acc']:>7.4f}  {h['lr']:>8.2e} {h['weight_decay']:>8.2e} "
            f"{h['epochs']:>3} {h['label_smoothing']:>4} {randaug:>9} {h['mix_prob']:>4}")


def reusable(cfg: Config, row: dict | None, key: str) -> bool:
    """A registered trial with this key whose checkpoint is still there."""
    return row is not None and row.get("key") == key and row["status"] == "ok" and storage.exists(row["checkpoint_uri"])


def run_finetune(cfg: Config, force: bool = False, log=print) -> dict:
    """Train the trials whose key is not in the registry (all of them with ``force``), keep the
    rest and every imported ingredient, write the registry; returns it."""
    t0 = time.time()
    probe = None
    if cfg.finetune.init == "linear_probe" and cfg.finetune.num_trials > 0:
        from .linear_probe import ensure_probe

        probe = ensure_probe(cfg, log=log)  # once, before any trial: every trial starts from it
    plan = trial_plan(cfg)  # fails, naming prepare, when there is no zero-shot head
    run = RunModel.of_run(cfg)
    old = read_registry(cfg) if storage.exists(layout.registry_uri(cfg)) else None
    old_rows = {r["id"]: r for r in old["ingredients"]} if old else {}
    if old and (old["model_name"], old["class_names"]) != (run.model_name, run.class_names):
        old_rows = {}  # another architecture or classes: nothing registered can be reused
    kept = [old_rows[t["id"]] for t in plan if not force and reusable(cfg, old_rows.get(t["id"]), t["key"])]
    todo = [t for t in plan if force or not reusable(cfg, old_rows.get(t["id"]), t["key"])]
    imported = [r for r in old_rows.values() if r["source"] != "tune"]
    trained: list[dict] = []
    if todo:
        from ..raycluster import init_ray

        check_train_order(cfg, run.preprocess)
        init_ray(cfg)
        log(f"finetune: training {len(todo)} of {len(plan)} trials "
            f"({', '.join(t['id'] for t in todo[:8])}{' ...' if len(todo) > 8 else ''})")
        begin_publish(cfg)
        results = build_tuner(cfg, todo, force=force, log=log).fit()
        check_complete(results)
        trained = trained_rows(cfg, results, todo)
    rows = sorted(kept + trained, key=lambda r: r["id"]) + imported
    if not rows:
        raise FinetuneError("no ingredients: finetune.num_trials is 0 and none were imported "
                            "(`frankensoup import-ingredients`)")
    registry = finish_publish(cfg, rows, run.model_name, run.class_names)
    seconds = round(time.time() - t0, 1)
    log(f"finetune: {len(kept)} reused, {len(trained)} trained"
        + (f", {len(imported)} imported kept" if imported else "") + f" ({seconds}s)")
    if trained:
        print_summary(trained, log=log)
    best = max(usable(registry), key=lambda i: i.val_acc)
    layout.mark_done(cfg, "finetune", registry_key(registry),
                     {"ingredients": len(rows), "best": {"id": best.id, "val_acc": best.val_acc},
                      "reused": len(kept), "computed": len(trained), "unit": "trials", "seconds": seconds,
                      **({"linear_probe": {k: probe[k] for k in ("sha256", "train_acc", "zero_shot_train_acc", "reused")}}
                         if probe else {})})
    return registry
