"""Where each stage writes under ``output_uri`` — the code twin of docs/outputs.md — and the
stage markers: each stage's content key (pipeline/keys.py) with a record of what it did."""
from __future__ import annotations

import time

from . import storage
from . import stages as stage_table
from .config import DEMO_SPLITS, Config, ConfigError, SplitConfig


def data_root(cfg: Config) -> str:
    """Where prepare writes the demo's shard sets."""
    return storage.join(cfg.output_uri, "data")


def data_uri(cfg: Config, name: str) -> str:
    return storage.join(data_root(cfg), name)


def splits(cfg: Config) -> dict[str, SplitConfig]:
    """Every shard set of the run, by name. The demo's live under output_uri/data/."""
    if cfg.data.source == "shards":
        return dict(cfg.data.splits)
    out = {name: SplitConfig(uri=data_uri(cfg, name), role=role) for name, role in DEMO_SPLITS.items()}
    for shift in cfg.data.demo.shifts:
        out[shift] = SplitConfig(uri=data_uri(cfg, shift), role="ood")
    out.update(cfg.data.splits)  # a demo run may add the user's own ood sets
    return out


def split_of_role(cfg: Config, role: str) -> tuple[str, SplitConfig]:
    found = [(n, s) for n, s in splits(cfg).items() if s.role == role]
    if len(found) != 1:
        raise ConfigError(f"data.splits: need exactly one split with role {role!r}, found {len(found)}")
    return found[0]


def ood_splits(cfg: Config) -> dict[str, SplitConfig]:
    return {n: s for n, s in splits(cfg).items() if s.role == "ood"}


def storage_uris(cfg: Config) -> list[str]:
    """Every storage URI a run reads or writes: output_uri, the shard sets, a weights file."""
    uris = [cfg.output_uri, *(s.uri for s in splits(cfg).values())]
    if "://" in cfg.model.pretrained:
        uris.append(cfg.model.pretrained)
    return uris


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


def probe_uri(cfg: Config) -> str:
    """finetune/linear_probe.safetensors: the classifier every trial starts from with finetune.init: linear_probe."""
    return storage.join(cfg.output_uri, "finetune", "linear_probe.safetensors")


def probe_record_uri(cfg: Config) -> str:
    """finetune/linear_probe.json: the probe's key, sha256 and train accuracies, written after the checkpoint."""
    return storage.join(cfg.output_uri, "finetune", "linear_probe.json")


def evaluations_uri(cfg: Config, ext: str = "parquet") -> str:
    return storage.join(cfg.output_uri, "evaluate", f"results.{ext}")


def soup_root(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup")


def latest_pointer(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup", "LATEST")


def zeroshot_uri(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "prepare", "zeroshot.safetensors")


def zeroshot_record_uri(cfg: Config) -> str:
    """prepare/zeroshot.json: the zero-shot head's key, sha256 and id_test accuracy."""
    return storage.join(cfg.output_uri, "prepare", "zeroshot.json")


def demo_recipe_uri(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "data", "_RECIPE.json")


def base_key_uri(cfg: Config) -> str:
    return storage.join(base_dir(cfg), "_KEY.json")


def evaluate_memo_uri(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "evaluate", "memo.json")


def soup_memo_root(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup", "memo")


def fused_scores_uri(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "soup", "scores.json")


def run_record_uri(cfg: Config) -> str:
    return storage.join(cfg.output_uri, "run.json")


# ---- paths stored relative to output_uri, so an output folder can be moved or copied --------

def relative(cfg: Config, uri: str) -> str:
    """``uri`` as a path under output_uri when it lies there (else unchanged)."""
    root, full = storage.normalise(cfg.output_uri), storage.normalise(uri)
    return full[len(root) + 1:] if full.startswith(root + "/") else full


def absolute(cfg: Config, path: str) -> str:
    """A stored path back to a URI: relative ones live under output_uri."""
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(cfg.output_uri, path)


# ---- stage markers -------------------------------------------------------------------------

STAGES = tuple(stage_table.STAGES)  # the names, in order (pipeline/stages.py owns the table)


def _marker(cfg: Config, stage: str) -> str:
    return storage.join(stage_dir(cfg, stage), "_DONE.json")


def read_marker(cfg: Config, stage: str) -> dict | None:
    """A stage's last finish record (its content key and what it did), whatever its inputs now."""
    uri = _marker(cfg, stage)
    return storage.read_json(uri) if storage.exists(uri) else None


def stage_done(cfg: Config, stage: str, key: str) -> dict | None:
    """The marker of a stage finished on exactly the inputs that ``key`` names, else None."""
    marker = read_marker(cfg, stage)
    return marker if marker is not None and marker.get("key") == key else None


def mark_done(cfg: Config, stage: str, key: str, info: dict | None = None) -> dict:
    marker = {"stage": stage, "key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **(info or {})}
    storage.write_json(_marker(cfg, stage), marker)
    return marker


def clear_done(cfg: Config, stage: str) -> None:
    """Withdraw a stage's marker before rewriting its outputs, so a crash midway reads as unfinished."""
    storage.delete(_marker(cfg, stage))
