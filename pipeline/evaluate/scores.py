"""Scores keyed by content: the accuracy of a checkpoint on a split is a function of the
checkpoint's sha256, the split's content (dataset.json's shard hashes), how the split is scored
(class subset or map) and the scoring precision. A memo of those keys lets the evaluate stage
score only what is new (an added ood set, an imported ingredient) and the soup stage score
only fused models it has not scored before."""
from __future__ import annotations

from collections.abc import Callable, Mapping

from .. import storage
from ..config import Config, SplitConfig
from ..data.shards import split_content
from ..keys import digest

Entry = dict  # {"accuracy", "correct", "n"}


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


def score_with_memo(cfg: Config, memo: ScoreMemo, models: Mapping[str, tuple[str, str]],
                    splits: Mapping[str, SplitConfig], class_names: list[str],
                    progress: Callable[[int, int], None] | None = None,
                    key: Mapping[tuple[str, str], str] | None = None,
                    ensembles: Mapping[str, list[str]] | None = None,
                    per_image: bool = False) -> tuple[dict, int, int]:
    """({split: {model: entry}}, reused, computed) for every model (name -> (uri, sha256)) and
    output ensemble (name -> member names in ``models``) on every split. A model's uri may be a
    callable that writes its checkpoint and returns the uri: it is called only if the model has
    something left to score. Only (model, split)
    pairs not in the memo are scored, in one streaming pass per group of splits that miss the
    same models (a new ood set: every model on that set; a new ingredient: that model on every
    set). ``key``: their score keys, if the caller has them. ``per_image``: entries carry
    per-image outcomes (``correct_bits``); a memo entry without them is scored again."""
    from .stream import score_splits

    ev = cfg.evaluate
    ensembles = dict(ensembles or {})
    shas = {m: sha for m, (_, sha) in models.items()}
    shas.update({e: ensemble_sha([models[m][1] for m in ms]) for e, ms in ensembles.items()})
    key = key or score_keys(cfg, shas, splits)

    def known(k: str) -> bool:
        return k in memo and (not per_image or "correct_bits" in memo[k])

    groups: dict[tuple[str, ...], list[str]] = {}
    for s in splits:
        # one model per checkpoint content: two names for the same weights are scored once
        missing: dict[str, str] = {}
        for m in shas:
            if not known(key[m, s]):
                missing.setdefault(key[m, s], m)
        missing = tuple(missing.values())
        if missing:
            groups.setdefault(missing, []).append(s)
    computed = sum(len(ms) * len(ss) for ms, ss in groups.items())
    for names, split_names in groups.items():
        wanted = [n for n in names if n not in ensembles]
        wanted += [m for e in names if e in ensembles for m in ensembles[e] if m not in wanted]
        uris = {m: models[m][0]() if callable(models[m][0]) else models[m][0] for m in wanted}
        scores = score_splits(uris, {s: splits[s] for s in split_names},
                              batch_size=ev.batch_size, num_actors=ev.num_actors, resources=ev.resources,
                              class_names=class_names, threads=ev.threads,
                              # the mixture evaluator's precision, so one-hot scores in the soup equal these
                              autocast_bf16=ev.ingredient_dtype == "bfloat16", progress=progress,
                              ensembles={e: ensembles[e] for e in names if e in ensembles}, per_image=per_image)
        memo.update({key[m, s]: scores[s][m] for m in scores[split_names[0]] for s in split_names})
    out = {s: {m: memo[key[m, s]] for m in shas} for s in splits}
    return out, len(set(key.values())) - computed, computed
