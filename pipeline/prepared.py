"""What the later stages read of prepare's outputs: the base CLIP, the run's class names and
the zero-shot classifier with its record. Where each lies is layout.py's."""
from __future__ import annotations

from . import layout, storage
from .config import Config, ConfigError
from .data import shards
from .model import factory, weights

# the zero-shot classifier's name among scored models (ingredient ids may not take it)
ZERO_SHOT = "zero_shot"


def load_base_clip(cfg: Config):
    """The base CLIP and its preprocess config: the demo's (made by prepare) or open_clip's."""
    if cfg.model.pretrained == "demo":
        base = layout.base_dir(cfg)
        if not storage.exists(storage.join(base, factory.WEIGHTS_FILE)):
            raise ConfigError(f"model.pretrained=demo but no demo base model at {base!r}: run `frankensoup prepare`")
        return factory.load_clip(base)
    return factory.create_clip(cfg.model.name, cfg.model.pretrained)


def class_names(cfg: Config) -> list[str]:
    """The run's classes: the train split's."""
    _, train = layout.split_of_role(cfg, "train")
    return shards.split_info(train.uri)["class_names"]


def load_zero_shot(cfg: Config):
    """(classifier, metadata) of the zero-shot head on the base image tower."""
    return weights.load_classifier(layout.zeroshot_uri(cfg))


def zero_shot_record(cfg: Config) -> dict:
    """prepare/zeroshot.json ({key, sha256, id_test_accuracy}) of a finished prepare."""
    uri = layout.zeroshot_record_uri(cfg)
    if not storage.exists(uri) or not storage.exists(layout.zeroshot_uri(cfg)):
        raise ConfigError(f"no zero-shot classifier under {cfg.output_uri!r}: run `frankensoup prepare` first")
    return storage.read_json(uri)
