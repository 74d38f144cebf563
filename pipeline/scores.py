"""Scores keyed by content, a run artifact the evaluate and soup stages share: which splits
are scored and in what order (``splits_to_score``), and the accuracy of a checkpoint on a
split as a function of the checkpoint's sha256, the split's content (dataset.json's shard
hashes), how the split is scored (class subset or map) and the scoring precision. A memo of
those keys lets the evaluate stage score only what is new (an added ood set, an imported
ingredient) and the soup stage score only fused models it has not scored before. The scoring
itself is the evaluate stage's (``evaluate/stream.score_with_memo``)."""
from __future__ import annotations

from collections.abc import Mapping

from . import layout, storage
from .config import Config, SplitConfig
from .data.shards import split_content
from .keys import digest

Entry = dict  # {"accuracy", "correct", "n"}


def splits_to_score(cfg: Config) -> dict[str, SplitConfig]:
    """val, id_test, then the ood splits in config order: the columns of every score table."""
    val = layout.split_of_role(cfg, "val")
    id_test = layout.split_of_role(cfg, "id_test")
    return dict([val, id_test, *layout.ood_splits(cfg).items()])


def score_key(model_sha256: str, content: str, split: SplitConfig, precision: str) -> str:
    scoring = {"class_subset": split.class_subset, "class_map": split.class_map,
               "objectnet_mappings": split.objectnet_mappings}
    return digest({"model": model_sha256, "split": content, "scoring": scoring, "precision": precision})


def score_keys(cfg: Config, shas: Mapping[str, str], splits: Mapping[str, SplitConfig]) -> dict[tuple[str, str], str]:
    """{(model, split): score key} for models (name -> checkpoint sha256) on splits as they are
    now: each split's content read once, from its dataset.json."""
    contents = {s: split_content(split.uri) for s, split in splits.items()}
    return {(m, s): score_key(sha, contents[s], splits[s], cfg.evaluate.ingredient_dtype)
            for m, sha in shas.items() for s in splits}


class ScoreMemo:
    """{score key: entry} kept in one JSON file, rewritten after each batch of new scores."""

    def __init__(self, uri: str):
        self.uri = uri
        self.entries: dict[str, Entry] = storage.read_json(uri) if storage.exists(uri) else {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> Entry:
        return self.entries[key]

    def update(self, new: Mapping[str, Entry]) -> None:
        self.entries.update(new)
        storage.write_json(self.uri, self.entries)


def ensemble_sha(member_shas: list[str]) -> str:
    """The content key of an output ensemble: the mean of its members' logits, in this order."""
    return digest({"output_ensemble": "mean of logits", "members": list(member_shas)})
