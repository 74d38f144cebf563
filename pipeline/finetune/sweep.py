"""The finetune stage: N trials of `train_ingredient` under Ray Tune, then the ingredient
registry. A sweep interrupted or crashed under the same settings is restored, not restarted."""
from __future__ import annotations

import os
import time

from ray import tune

from .. import layout, storage
from ..config import Config
from ..errors import UserError
from . import registry as registry_lib
from .trainable import HPARAM_KEYS, MODEL_FILE, parse_failure, train_ingredient


class FinetuneError(UserError, RuntimeError):
    """A sweep that did not produce a full set of ingredients; the message says what to do."""


# ---- what every trial gets ---------------------------------------------------------------

def trial_setup(cfg: Config) -> dict:
    """The fixed part of a trial's config: inputs by URI, optimiser settings, the test hook."""
    from ..prepare import zeroshot_uri

    ft = cfg.finetune
    try:
        parse_failure(ft.inject_failure)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    _, train = layout.split_of_role(cfg, "train")
    _, val = layout.split_of_role(cfg, "val")
    return {"zeroshot_uri": zeroshot_uri(cfg), "train_uri": train.uri, "val_uri": val.uri,
            "batch_size": ft.batch_size, "warmup_steps": ft.warmup_steps, "grad_clip": ft.grad_clip,
            "threads": ft.threads, "seed": ft.seed, "inject_failure": ft.inject_failure,
            "loader": ft.loader, "memory_limit_gb": ft.memory_limit_gb, "loader_workers": ft.loader_workers,
            "shuffle_buffer": ft.shuffle_buffer}


def param_space(cfg: Config) -> dict:
    """Model soups' sweep: log-uniform lr and weight decay, choices for the rest. `trial` is a
    grid over 0..N-1 so each trial has a stable index (its seed and its ingredient id)."""
    space = cfg.finetune.space
    return {
        "trial": tune.grid_search(list(range(cfg.finetune.num_trials))),
        "lr": tune.loguniform(*space.lr),
        "weight_decay": tune.loguniform(*space.weight_decay),
        "epochs": tune.choice(space.epochs),
        "label_smoothing": tune.choice(space.label_smoothing),
        "randaugment_magnitude": tune.choice(space.randaugment_magnitude),
        "mix_prob": tune.choice(space.mix_prob),
        "setup": trial_setup(cfg),
    }


# ---- where Tune keeps the experiment -------------------------------------------------------

def experiment_name(cfg: Config) -> str:
    # one experiment per stage key: other settings never restore this sweep
    return f"sweep-{layout.stage_key(cfg, 'finetune')}"


def experiment_location(cfg: Config) -> tuple[str, object | None, str]:
    """(storage_path, storage_filesystem or None, experiment path) for Tune. Remote storage
    goes through our own pyarrow filesystem, so AWS_ENDPOINT_URL & co. apply as everywhere."""
    loc = storage.resolve(layout.tune_storage(cfg))
    name = experiment_name(cfg)
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

            self._metrics = RunMetrics(self.run)
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


def build_tuner(cfg: Config, force: bool = False, log=print):
    """A fresh Tuner, or the restored one when this sweep's experiment can be restored."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    ft = cfg.finetune
    trainable = tune.with_resources(train_ingredient, {"cpu": ft.resources.cpu, "gpu": ft.resources.gpu})
    storage_path, fs, path = experiment_location(cfg)
    # every epoch's checkpoint forces an experiment snapshot (num_to_keep is set): that keeps a
    # crashed sweep's restore current, so Tune's warning about it is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if force and tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"finetune: --force: discarding the previous sweep at {path}")
        storage.delete(storage.join(layout.tune_storage(cfg), experiment_name(cfg)))
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log(f"finetune: restoring the interrupted sweep at {path} (finished trials are kept)")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            num_samples=1,  # the `trial` grid makes the N trials
            metric="val_acc", mode="max",
            # Tune ignores TuneConfig.max_concurrent_trials once a search_alg is given
            search_alg=BasicVariantGenerator(random_state=ft.seed, max_concurrent=ft.max_concurrent)),
        run_config=tune.RunConfig(
            name=experiment_name(cfg), storage_path=storage_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[TrialGauges(experiment_name(cfg))]),
    )


# ---- from Tune's results to the registry -------------------------------------------------

def ingredient_id(trial: int) -> str:
    return f"ft-{trial:03d}"


def check_complete(results) -> None:
    """Refuse to register a sweep with failed or unfinished trials (the rerun resumes them)."""
    failed = [(r.config.get("trial"), r.error) for r in results if r.error is not None]
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


def publish_results(cfg: Config, results) -> tuple[dict, list[dict]]:
    """Copy each trial's final model to ingredients/<id>.safetensors (one at a time, so a big
    sweep never holds every checkpoint in memory), then write the registry."""
    meta = registry_lib.zero_shot_metadata(cfg)
    registry_lib.begin_publish(cfg)
    rows = []
    for result in sorted(results, key=lambda r: r.config["trial"]):
        iid = ingredient_id(result.config["trial"])
        data = final_checkpoint_bytes(result)
        dest = layout.ingredient_uri(cfg, iid)
        storage.write_bytes(dest, data)
        rows.append({"id": iid, "hparams": {k: result.config[k] for k in HPARAM_KEYS},
                     "val_acc": float(result.metrics["val_acc"]), "checkpoint_uri": dest,
                     "sha256": storage.sha256(data), "status": "ok", "source": "tune",
                     "trial_id": result.metrics.get("trial_id")})
    return registry_lib.finish_publish(cfg, rows, meta["model_name"], meta["class_names"]), rows


def print_summary(rows: list[dict], log=print) -> None:
    log(f"finetune: {len(rows)} ingredients")
    log(f"  {'id':<8} {'val_acc':>7}  {'lr':>8} {'wd':>8} {'ep':>3} {'ls':>4} {'ra':>3} {'mix':>4}")
    for r in rows:
        h = r["hparams"]
        log(f"  {r['id']:<8} {r['val_acc']:>7.4f}  {h['lr']:>8.2e} {h['weight_decay']:>8.2e} "
            f"{h['epochs']:>3} {h['label_smoothing']:>4} {h['randaugment_magnitude']:>3} {h['mix_prob']:>4}")


def run_finetune(cfg: Config, force: bool = False, log=print) -> dict:
    """Run (or restore) the sweep, publish the ingredients and the registry; returns the registry."""
    if not layout.stage_done(cfg, "prepare"):
        raise FinetuneError(f"finetune needs a finished prepare stage under {cfg.output_uri!r} "
                            f"with these settings: run `frankensoup prepare` first")
    done = layout.stage_done(cfg, "finetune")
    if done and not force:
        log(f"finetune: already done under these settings ({done['finished']}, source "
            f"{done.get('source', 'tune')}), skipping")
        return registry_lib.read_registry(cfg)
    from ..raycluster import init_ray

    init_ray(cfg)
    t0 = time.time()
    tuner = build_tuner(cfg, force=force, log=log)
    results = tuner.fit()
    check_complete(results)
    registry, rows = publish_results(cfg, results)
    print_summary(rows, log=log)
    best = max(rows, key=lambda r: r["val_acc"])
    _, _, path = experiment_location(cfg)
    layout.mark_done(cfg, "finetune", {"source": "tune", "experiment": path, "ingredients": len(rows),
                                       "best": {"id": best["id"], "val_acc": best["val_acc"]},
                                       "seconds": round(time.time() - t0, 1)})
    log(f"finetune: best {best['id']} val_acc={best['val_acc']:.4f}; registry at "
        f"{layout.registry_uri(cfg)} ({time.time() - t0:.1f}s)")
    return registry
