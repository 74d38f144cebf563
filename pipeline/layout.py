"""Where each stage writes under ``output_uri`` — the code twin of docs/outputs.md — and the
stage markers that let `frankensoup run` skip a stage finished under the same settings."""
from __future__ import annotations

import hashlib
import json
import time

from . import storage
from .config import Config, SplitConfig

DEMO_ROLES = {"pretrain": "pretrain", "train": "train", "val": "val", "id_test": "id_test"}


def data_uri(cfg: Config, name: str) -> str:
    return storage.join(cfg.output_uri, "data", name)


def splits(cfg: Config) -> dict[str, SplitConfig]:
    """Every shard set of the run, by name. The demo's live under output_uri/data/."""
    if cfg.data.source == "shards":
        return dict(cfg.data.splits)
    out = {name: SplitConfig(uri=data_uri(cfg, name), role=role) for name, role in DEMO_ROLES.items()}
    for shift in cfg.data.demo.shifts:
        out[shift] = SplitConfig(uri=data_uri(cfg, shift), role="ood")
    out.update(cfg.data.splits)  # a demo run may add the user's own ood sets
    return out


def split_of_role(cfg: Config, role: str) -> tuple[str, SplitConfig]:
    found = [(n, s) for n, s in splits(cfg).items() if s.role == role]
    if len(found) != 1:
        from .config import ConfigError

        raise ConfigError(f"data.splits: need exactly one split with role {role!r}, found {len(found)}")
    return found[0]


def ood_splits(cfg: Config) -> dict[str, SplitConfig]:
    return {n: s for n, s in splits(cfg).items() if s.role == "ood"}


def base_dir(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "base")


def stage_dir(cfg: Config, stage: str) -> str:
    return storage.join(cfg.output_uri, stage)


def tune_storage(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "finetune", "tune")


def registry_uri(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "finetune", "ingredients.json")


def ingredient_uri(cfg: Config, ingredient_id: str) -> str:
    return storage.join(cfg.output_uri, "finetune", "ingredients", f"{ingredient_id}.safetensors")


def evaluations_uri(cfg: Config, ext: str = "parquet") -> str:
    return storage.join(cfg.output_uri, "evaluate", f"results.{ext}")


def soup_root(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup")


def journal_root(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup", "journal")


def latest_pointer(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup", "LATEST")


# ---- stage markers -------------------------------------------------------------------------

STAGES = ("prepare", "finetune", "evaluate", "soup")
# the config sections each stage's result depends on (besides the previous stage's result)
STAGE_SECTIONS = {
    "prepare": ("data", "model"),
    "finetune": ("finetune",),
    "evaluate": ("evaluate",),
    "soup": ("soup",),
}
# fields that change how a stage runs but never what it produces
_NEUTRAL = {"soup": ("num_evaluators", "evaluator_resources"), "evaluate": ("num_actors", "resources", "batch_size"),
            "finetune": ("max_concurrent", "resources", "inject_failure")}


def _marker(cfg: Config, stage: str) -> str:
    return storage.join(stage_dir(cfg, stage), "_DONE.json")


def stage_key(cfg: Config, stage: str) -> str:
    """Hash of everything a stage's result depends on: its config sections and, through the
    previous stage's key, everything upstream."""
    dump = cfg.model_dump(mode="json")
    parts = {}
    for section in STAGE_SECTIONS[stage]:
        sec = dict(dump[section])
        for k in _NEUTRAL.get(stage, ()):
            sec.pop(k, None)
        parts[section] = sec
    i = STAGES.index(stage)
    if i > 0:
        parts["upstream"] = stage_key(cfg, STAGES[i - 1])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def stage_done(cfg: Config, stage: str) -> dict | None:
    """The marker of a stage finished under the current settings, else None."""
    uri = _marker(cfg, stage)
    if not storage.exists(uri):
        return None
    marker = storage.read_json(uri)
    return marker if marker.get("key") == stage_key(cfg, stage) else None


def mark_done(cfg: Config, stage: str, info: dict | None = None, key: str | None = None) -> None:
    storage.write_json(_marker(cfg, stage), {"stage": stage, "key": key or stage_key(cfg, stage),
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                             **(info or {})})


def clear_done(cfg: Config, stage: str) -> None:
    """Withdraw a stage's marker before rewriting its outputs, so a crash midway reads as unfinished."""
    storage.delete(_marker(cfg, stage))
