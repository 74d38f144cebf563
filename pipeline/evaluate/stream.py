"""Streaming scoring with Ray Data: every model on every split in one pass over the shards.

``read_parquet`` streams the shards; ``map_batches`` hands each batch to a pool of scorer
actors that loaded the models once. A batch is decoded once and run through every model; the
actor returns per-row correctness per model and the driver adds it up. Scoring (class subsets,
class maps) uses the same functions as the mixture evaluator, so both report the same accuracy
for the same weights. See docs/evaluate.md.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .. import storage
from ..config import Config, Resources, SplitConfig
from ..data.shards import DataError, split_info
from ..errors import UserError
from ..model.weights import CheckpointError, decode_metadata
from ..scores import ScoreMemo, ensemble_sha, score_keys
from ..scoring import Scoring, predictions, scoring_tensors, split_scoring

# the few metadata keys every scored model must agree on
SHARED_METADATA = ("preprocess", "class_names")


# ---- the models -----------------------------------------------------------------------------

def checkpoint_metadata(uri: str) -> dict:
    """A classifier checkpoint's decoded metadata, reading only the safetensors header."""
    if not uri.lower().endswith(".safetensors"):
        raise CheckpointError(f"{uri!r}: only frankensoup .safetensors classifiers can be scored")
    try:
        header = storage.read_safetensors_header(uri)
    except FileNotFoundError:
        raise CheckpointError(f"{uri!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{uri!r} is not a readable safetensors file: {e}") from None
    return decode_metadata(dict(header.get("__metadata__") or {}), uri)


def shared_metadata(checkpoint_uris: Mapping[str, str], class_names: list[str] | None = None) -> dict:
    """The preprocess and class names every model shares; models that differ are refused, since a
    batch is decoded once for all of them."""
    if not checkpoint_uris:
        raise ValueError("no models to score")
    shared: dict | None = None
    first = ""
    for name, uri in checkpoint_uris.items():
        meta = {k: checkpoint_metadata(uri)[k] for k in SHARED_METADATA}
        if class_names is not None and meta["class_names"] != list(class_names):
            raise CheckpointError(f"model {name!r} ({uri}) has other class names than the registry's")
        if shared is None:
            shared, first = meta, f"{name!r} ({uri})"
            continue
        for key in SHARED_METADATA:
            if meta[key] != shared[key]:
                raise CheckpointError(f"model {name!r} ({uri}) has another {key} than model {first}: "
                                      f"models scored together must share it")
    return shared


def _device(gpu: float):
    import torch

    return torch.device("cuda" if gpu > 0 and torch.cuda.is_available() else "cpu")


class BatchScorer:
    """A Ray Data actor: holds every model, decodes each batch once, returns per-row correctness
    (column ``correct_<i>`` for model i, then one per ensemble: the argmax of its members' mean
    logits, summed in member order), the row's split and, with ``row_keys``, a key of the row's
    content (image bytes and label) that orders per-image results canonically."""

    def __init__(self, checkpoint_uris: list[str], scorings: dict[str, Scoring],
                 shard_of_path: dict[str, tuple[str, str]], preprocess: dict, threads: int, gpu: float,
                 autocast_bf16: bool, ensembles: list[list[int]] = (), row_keys: bool = False):
        import torch

        from ..model import image_transform, load_classifier

        torch.set_num_threads(threads)
        self.device = _device(gpu)
        self.models = [load_classifier(uri)[0].to(self.device).eval() for uri in checkpoint_uris]
        self.transform = image_transform(preprocess, train=False)
        self.scoring = {name: scoring_tensors(s, self.device) for name, s in scorings.items()}
        self.shard_of_path = shard_of_path  # Ray's row path -> (split, shard URI)
        self.autocast = self.device.type == "cuda" and autocast_bf16
        self.ensembles = [list(m) for m in ensembles]
        self.row_keys = row_keys

    def decode(self, images, paths):
        import torch

        from ..data.shards import decode_image

        return torch.stack([self.transform(decode_image(b, source=f"shard {self.shard_of_path[p][1]}"))
                            for b, p in zip(images, paths)])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        paths = batch["path"]
        splits = np.array([self.shard_of_path[p][0] for p in paths], dtype=object)
        try:
            images = self.decode(batch["image"], paths).to(self.device, non_blocking=True)
        except DataError as e:
            # Ray's wrapping of a failed UDF loses the message that names the shard: send it as data
            return {"split": splits, "error": np.full(len(paths), str(e), dtype=object),
                    "row_key": np.zeros(len(paths), dtype=np.uint64),
                    **{f"correct_{i}": np.zeros(len(paths), dtype=bool)
                       for i in range(len(self.models) + len(self.ensembles))}}
        labels = torch.as_tensor(batch["label"].astype(np.int64), device=self.device)
        rows = {s: torch.as_tensor(np.flatnonzero(splits == s), device=self.device) for s in set(splits)}
        out = {"split": splits, "error": np.full(len(paths), "", dtype=object),
               "row_key": row_keys(batch["image"], batch["label"]) if self.row_keys
               else np.zeros(len(paths), dtype=np.uint64)}

        def correct_of(logits):
            correct = torch.zeros(len(paths), dtype=torch.bool, device=self.device)
            for s, idx in rows.items():
                target, mask, class_map = self.scoring[s]
                correct[idx] = predictions(logits[idx], mask, class_map) == target[labels[idx]]
            return correct.cpu().numpy()

        members = {i for m in self.ensembles for i in m}
        kept: dict[int, torch.Tensor] = {}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            for i, model in enumerate(self.models):
                logits = model(images)
                out[f"correct_{i}"] = correct_of(logits)
                if i in members:
                    kept[i] = logits.float()
            for e, member_rows in enumerate(self.ensembles):
                total = kept[member_rows[0]].clone()
                for i in member_rows[1:]:
                    total += kept[i]
                out[f"correct_{len(self.models) + e}"] = correct_of(total / len(member_rows))
        return out


def row_keys(images, labels) -> np.ndarray:
    """A 64-bit key of each row's content (encoded image and label): per-image results sorted by
    it line up across models scored in different passes over the same split content."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(bytes(img) + int(lab).to_bytes(8, "little", signed=True),
                                                    digest_size=8).digest(), "little")
                     for img, lab in zip(images, labels)], dtype=np.uint64)


def correct_bits(keys: np.ndarray, correct: np.ndarray) -> bytes:
    """Per-image correctness in the split's canonical order (by row key; identical rows, which
    only duplicate images give, by their outcome), packed 8 images a byte."""
    order = np.lexsort((correct, keys))
    return np.packbits(correct[order]).tobytes()


# ---- the pass over the shards ---------------------------------------------------------------

def check_shard_footers(split_uri: str) -> list[str]:
    """Every shard's parquet footer is readable and its row count matches dataset.json; reads
    only the footers, so a truncated or foreign file is named before any actor starts."""
    import pyarrow.parquet as pq

    uris = []
    for shard in split_info(split_uri)["shards"]:
        uri = storage.join(split_uri, shard["file"])
        loc = storage.resolve(uri)
        try:
            with loc.fs.open_input_file(loc.path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # pyarrow raises several types; one message naming the shard
            raise DataError(f"shard {uri} is unreadable: {e}") from None
        if rows != shard["num_rows"]:
            raise DataError(f"shard {uri} has {rows} rows, dataset.json says {shard['num_rows']}")
        uris.append(uri)
    return uris


def _read_splits(shards: dict[str, list[str]]):
    """One dataset over every split's shards, each row tagged with its file's path. One
    read_parquet per filesystem: a union of per-split reads runs several times slower."""
    import ray.data

    groups: list[tuple[object, list[str]]] = []  # (filesystem, paths on it)
    for uri in (u for uris in shards.values() for u in uris):
        loc = storage.resolve(uri)
        group = next((g for g in groups if g[0].equals(loc.fs)), None)
        if group is None:
            groups.append(group := (loc.fs, []))
        group[1].append(loc.path)
    # one block per shard: the scorers start on the first shard while the next ones are read
    datasets = [ray.data.read_parquet(paths, filesystem=fs, columns=["image", "label"], include_paths=True,
                                      override_num_blocks=len(paths)) for fs, paths in groups]
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of Ray's wrappers (RayTaskError.cause, then __cause__)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def first_unreadable_shard(shard_uris: list[str]) -> DataError | None:
    """Read each shard in full until one fails (only after a pass failed without naming one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for uri in shard_uris:
        try:
            pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=["image", "label"])
        except Exception as e:  # pyarrow raises several types; one message naming the shard
            return DataError(f"shard {uri} is unreadable: {e}")
    return None


def clear_error(error: BaseException, shard_of_path: dict[str, str]) -> BaseException:
    """One clear error for a failed pass: a UserError raised in an actor as it was, else the
    shard Ray names in its message, else the first shard that does not read, else the error."""
    cause = _root_cause(error)
    if isinstance(cause, UserError):
        return cause
    text = str(error)
    for path, uri in shard_of_path.items():
        if path in text:
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            return DataError(f"shard {uri} is unreadable: {reason}")
    return first_unreadable_shard(list(shard_of_path.values())) or error


def _reader_settings() -> None:
    """This process's Ray Data settings for scoring reads (set before the dataset is made)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # a corrupt shard fails on the first read and is named, instead of being retried
    ctx.retried_io_errors = []
    ctx.max_errored_blocks = 0
    # the V1 parquet reader makes one read task and block per shard, so scoring starts on the
    # first shard; V2 packs shards into 128 MiB read units (a whole demo split in one block,
    # scored only once all of it is read) after starting an actor pool to read footers
    ctx.use_datasource_v2 = False


def _scored_batches(shards: dict[str, list[str]], actor_kwargs: dict, batch_size: int, num_actors: int,
                    resources: Resources):
    """The scorers' output batches as they come (the dataset is made lazily: reading a sample
    of a corrupt shard fails already there)."""
    import ray.data

    _reader_settings()
    scored = _read_splits(shards).map_batches(
        BatchScorer, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
        # Ray Data spreads the scorers over the nodes itself (DataContext.scheduling_strategy "SPREAD")
        num_cpus=resources.cpu, num_gpus=resources.gpu, fn_constructor_kwargs=actor_kwargs)
    yield from scored.iter_batches(batch_size=None, batch_format="numpy")


def score_splits(checkpoint_uris: Mapping[str, str], splits: Mapping[str, SplitConfig], *, batch_size: int,
                 num_actors: int, resources: Resources, class_names: list[str] | None = None,
                 threads: int = 1, autocast_bf16: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 ensembles: Mapping[str, list[str]] | None = None,
                 per_image: bool = False) -> dict[str, dict[str, dict]]:
    """{split: {model: {"correct", "n", "accuracy"}}} for every model on every split, in one
    streaming pass. ``checkpoint_uris`` maps a model's name to its classifier checkpoint;
    ``ensembles`` maps an output ensemble's name to its members (names in ``checkpoint_uris``):
    the mean of their logits is scored as one more model. ``per_image``: each entry also gets
    ``correct_bits`` (base64 of correct_bits(): per-image outcomes, for paired tests).
    ``autocast_bf16``: forward under bfloat16 autocast on CUDA (the mixture evaluator does so
    with bfloat16 ingredients). ``progress(rows_done, rows_total)`` is called per gathered batch."""
    import base64

    ensembles = dict(ensembles or {})
    for e, members in ensembles.items():
        unknown = [m for m in members if m not in checkpoint_uris]
        if not members or unknown or e in checkpoint_uris:
            raise ValueError(f"ensemble {e!r}: members {members} must be scored models and its name new")
    model_names = list(checkpoint_uris)
    names = model_names + list(ensembles)
    shared = shared_metadata(checkpoint_uris, class_names)
    shards = {s: check_shard_footers(cfg.uri) for s, cfg in splits.items()}
    infos = {s: split_info(cfg.uri) for s, cfg in splits.items()}
    scorings = {s: split_scoring(s, cfg, infos[s]["class_names"], shared["class_names"])
                for s, cfg in splits.items()}
    shard_of_path = {storage.resolve(u).path: (s, u) for s, uris in shards.items() for u in uris}
    if len(shard_of_path) != sum(len(u) for u in shards.values()):
        raise DataError(f"splits {sorted(splits)} share shard files: score them separately")

    actor_kwargs = dict(checkpoint_uris=[checkpoint_uris[n] for n in model_names], scorings=scorings,
                        shard_of_path=shard_of_path, preprocess=shared["preprocess"], threads=threads,
                        gpu=resources.gpu, autocast_bf16=autocast_bf16,
                        ensembles=[[model_names.index(m) for m in ms] for ms in ensembles.values()],
                        row_keys=per_image)
    correct = {s: np.zeros(len(names), dtype=np.int64) for s in splits}
    rows_of: dict[str, list] = {s: [] for s in splits}  # per_image: (row keys, correctness per model)
    seen = dict.fromkeys(splits, 0)
    total = sum(info["num_rows"] for info in infos.values())
    try:
        for batch in _scored_batches(shards, actor_kwargs, batch_size, num_actors, resources):
            failed = [e for e in batch["error"] if e]
            if failed:
                raise DataError(failed[0])
            for s in set(batch["split"]):
                rows = batch["split"] == s
                seen[s] += int(rows.sum())
                correct[s] += [int(batch[f"correct_{i}"][rows].sum()) for i in range(len(names))]
                if per_image:
                    rows_of[s].append((batch["row_key"][rows],
                                       np.stack([batch[f"correct_{i}"][rows] for i in range(len(names))])))
            if progress is not None:
                progress(sum(seen.values()), total)
    except DataError:
        raise
    except Exception as e:  # Ray wraps what failed in a worker; surface the culprit
        raise clear_error(e, {path: uri for path, (_, uri) in shard_of_path.items()}) from None
    for s, cfg in splits.items():
        if seen[s] != infos[s]["num_rows"]:
            raise DataError(f"split {s!r} ({cfg.uri}): scored {seen[s]} rows, dataset.json says {infos[s]['num_rows']}")
    out = {s: {name: {"correct": int(c), "n": seen[s], "accuracy": float(c) / seen[s]}
               for name, c in zip(names, correct[s])} for s in splits}
    if per_image:
        for s, parts in rows_of.items():
            keys = np.concatenate([k for k, _ in parts])
            outcomes = np.concatenate([c for _, c in parts], axis=1)
            for i, name in enumerate(names):
                out[s][name]["correct_bits"] = base64.b64encode(correct_bits(keys, outcomes[i])).decode()
    return out


def score_models(checkpoint_uris: Mapping[str, str], split: SplitConfig, *, batch_size: int, num_actors: int,
                 resources: Resources, class_names: list[str] | None = None, threads: int = 1,
                 autocast_bf16: bool = False, progress: Callable[[int, int], None] | None = None,
                 name: str = "split") -> dict[str, dict]:
    """{model: {"correct", "n", "accuracy"}} of every model on one split (see score_splits)."""
    return score_splits(checkpoint_uris, {name: split}, batch_size=batch_size, num_actors=num_actors,
                        resources=resources, class_names=class_names, threads=threads,
                        autocast_bf16=autocast_bf16, progress=progress)[name]


# ---- scoring what the score memo lacks ----------------------------------------------------

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
