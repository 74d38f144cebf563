"""The prepare stage: the shards (the demo builds its own), the base CLIP (the demo trains its
own, offline) and the zero-shot classifier every finetune starts from."""
from __future__ import annotations

import time

from . import layout, storage
from .config import DEMO_SPLITS, Config, ConfigError
from .data import shards
from .keys import digest, result_settings
from .data.imagenet import prompt_names
from .prepared import class_names, load_base_clip, zero_shot_record
from .model import classifier as clf_lib
from .model import factory, weights


def build_zero_shot(cfg: Config, clip, names: list[str]):
    """The zero-shot head over ``names``: each class's prompt name (``model.prompt_names``)
    put into every template, embedded by the base CLIP's text tower."""
    texts = prompt_names(names, cfg.model.prompt_names)
    tokenizer = factory.tokenizer_for(cfg.model.name)
    return clf_lib.build_classifier(clip, tokenizer, texts, clf_lib.resolve_templates(cfg.model.templates))


def _accuracy(clf, name: str, split, preprocess: dict, batch_size: int, model_classes: list[str]) -> float:
    """Top-1 of the zero-shot head on ``split``, read shard by shard and decoded batch by batch
    (as the evaluate stage streams it, with its scoring rules), so memory holds one shard's
    encoded bytes and one batch of tensors whatever the split's size."""
    import torch

    from .scoring import predictions, scoring_tensors, split_scoring

    info = shards.split_info(split.uri)
    target, mask, class_map = scoring_tensors(
        split_scoring(name, split, info["class_names"], model_classes), torch.device("cpu"))
    transform = factory.image_transform(preprocess, train=False)
    correct = seen = 0
    clf.eval()
    with torch.inference_mode():
        for index, shard in enumerate(info["shards"]):
            table = shards.read_shard(split.uri, index, info)
            for batch in table.to_batches(max_chunksize=batch_size):
                images = torch.stack([transform(shards.decode_image(b, source=f"{split.uri}/{shard['file']}"))
                                      for b in batch.column("image").to_pylist()])
                labels = torch.as_tensor(batch.column("label").to_numpy().astype("int64"))
                correct += int((predictions(clf(images), mask, class_map) == target[labels]).sum())
                seen += len(labels)
            del table
    return correct / max(seen, 1)


def _build_demo_base(cfg: Config, log=print):
    from .model.pretrain import pretrain_demo_clip

    _, pre = layout.split_of_role(cfg, "pretrain")
    split = shards.read_split(pre.uri)
    _, preprocess = factory.create_clip(cfg.model.name, None)
    images, labels = shards.decode_split(split, factory.image_transform(preprocess, train=False))
    t0 = time.time()
    clip = pretrain_demo_clip(images, labels, split.class_names, cfg.model.demo_base, model_name=cfg.model.name,
                              templates=clf_lib.resolve_templates(cfg.model.templates), log=log)
    factory.save_clip(layout.base_dir(cfg), clip, cfg.model.name, preprocess)
    log(f"prepare: demo base CLIP trained contrastively on {len(images)} pretrain images in {time.time() - t0:.1f}s")
    return clip, preprocess


# ---- the units of work and their keys (pipeline/keys.py) -----------------------------------

def demo_data_key(cfg: Config) -> str:
    """The demo shards are a pure function of the demo data settings."""
    return digest({"format": shards.FORMAT, "demo": result_settings(cfg.data.demo),
                   "rows_per_shard": cfg.data.rows_per_shard})


def base_key(cfg: Config) -> str:
    """The base CLIP: the demo's depends on the pretrain split's content and the model settings
    (an ood set never touches it); open_clip's on its name and pretrained tag."""
    if cfg.model.pretrained != "demo":
        return digest({"model": cfg.model.name, "pretrained": cfg.model.pretrained})
    _, pre = layout.split_of_role(cfg, "pretrain")
    return digest({"model": cfg.model.name, "demo_base": result_settings(cfg.model.demo_base),
                   "templates": cfg.model.templates, "pretrain": shards.split_content(pre.uri)})


def zero_shot_key(cfg: Config, base: str, names: list[str]) -> str:
    return digest({"base": base, "templates": cfg.model.templates, "prompt_names": cfg.model.prompt_names,
                   "class_names": names})


def _demo_data(cfg: Config, force: bool, log) -> bool:
    """Write the demo shards unless they were written from the same settings; True if written."""
    from .data.demo import write_demo_splits

    key = demo_data_key(cfg)
    recipe = layout.demo_recipe_uri(cfg)
    names = [*DEMO_SPLITS, *cfg.data.demo.shifts]
    complete = all(storage.exists(storage.join(layout.data_uri(cfg, name), shards.MARKER)) for name in names)
    if not force and complete and storage.exists(recipe) and storage.read_json(recipe).get("key") == key:
        changed = {name: shards.changed_shards(layout.data_uri(cfg, name)) for name in names}
        changed = {name: files for name, files in changed.items() if files}
        if not changed:
            return False
        # the demo shards are made from settings alone: make them again (same bytes, same keys)
        log("prepare: demo shards changed since they were written (" + "; ".join(
            f"{name}: {', '.join(files)}" for name, files in changed.items()) + "): writing them again")
    storage.delete(recipe)
    write_demo_splits(layout.data_root(cfg), cfg.data.demo, cfg.data.rows_per_shard)
    storage.write_json(recipe, {"key": key})
    log("prepare: demo shards written")
    return True


def _base(cfg: Config, key: str, force: bool, log):
    """(clip, preprocess, built?) — the demo base is trained only when its key changed."""
    if cfg.model.pretrained != "demo":
        clip, preprocess = load_base_clip(cfg)
        return clip, preprocess, False
    marker = layout.base_key_uri(cfg)
    if not force and storage.exists(marker) and storage.read_json(marker).get("key") == key:
        clip, preprocess = load_base_clip(cfg)
        return clip, preprocess, False
    storage.delete(marker)  # from here until it is rewritten the base reads as not made
    clip, preprocess = _build_demo_base(cfg, log=log)
    storage.write_json(marker, {"key": key})
    return clip, preprocess, True


def _zero_shot_current(cfg: Config, key: str) -> bool:
    try:
        record = zero_shot_record(cfg)
    except ConfigError:
        return False
    return record.get("key") == key and storage.sha256(storage.read_bytes(layout.zeroshot_uri(cfg))) == record["sha256"]


def check_splits_unchanged(cfg: Config) -> None:
    """Refuse, naming the shard, a split whose shards changed since its dataset.json was
    written (one listing per split; only a shard that looks different is read): every key over
    that split would name content it no longer holds. Run before each stage; prepare has made
    its demo shards again by then."""
    for name, split in layout.splits(cfg).items():
        if not storage.exists(storage.join(split.uri, shards.MARKER)):
            continue  # not made yet (the demo's) or missing: the stage that reads it says so
        changed = shards.changed_shards(split.uri)
        if changed:
            made_here = cfg.data.source == "demo" and split.uri.startswith(layout.data_root(cfg))
            hint = "run `frankensoup prepare` to make it again" if made_here else "import the split again"
            raise shards.DataError(f"split {name}: shard {storage.join(split.uri, changed[0])} changed since "
                                   f"its dataset.json was written (sha256 differs): {hint}")


def run_prepare(cfg: Config, force: bool = False, log=print) -> dict:
    """Demo shards, base CLIP and zero-shot head, each made only when its key changed (or with
    ``force``); returns the stage marker (with ``reused``/``computed`` counts of the three)."""
    t0 = time.time()
    made = []
    if cfg.data.source == "demo":
        made.append(_demo_data(cfg, force, log))
    rows = {}
    check_splits_unchanged(cfg)
    for name, split in layout.splits(cfg).items():
        info = shards.split_info(split.uri)  # fails naming an unreadable or incomplete split
        rows[name] = {"role": split.role, "rows": info["num_rows"], "uri": layout.relative(cfg, split.uri)}
    names = class_names(cfg)
    prompt_names(names, cfg.model.prompt_names)  # a name without a prompt fails before any training
    bkey = base_key(cfg)
    zkey = zero_shot_key(cfg, bkey, names)
    if not force and _zero_shot_current(cfg, zkey) and (cfg.model.pretrained != "demo" or (
            storage.exists(layout.base_key_uri(cfg)) and storage.read_json(layout.base_key_uri(cfg)).get("key") == bkey)):
        made += [False, False]
        record = zero_shot_record(cfg)
    else:
        clip, preprocess, built = _base(cfg, bkey, force, log)
        made.append(built)
        storage.delete(layout.zeroshot_record_uri(cfg))
        zs = build_zero_shot(cfg, clip, names)
        data = weights.save_classifier(layout.zeroshot_uri(cfg), zs, model_name=cfg.model.name, class_names=names,
                                       preprocess=preprocess, extra={"source": "zero-shot"})
        test_name, test = layout.split_of_role(cfg, "id_test")
        accuracy = _accuracy(zs, test_name, test, preprocess, cfg.evaluate.batch_size, names)
        record = {"key": zkey, "sha256": storage.sha256(data), "id_test_accuracy": accuracy}
        storage.write_json(layout.zeroshot_record_uri(cfg), record)
        made.append(True)
        log("prepare: rows per split")
        for name, r in rows.items():
            log(f"  {name:<10} {r['role']:<9} {r['rows']:>6}")
    computed = sum(made)
    seconds = round(time.time() - t0, 1)
    log(f"prepare: {len(made) - computed} reused, {computed} made; zero-shot accuracy on id_test = "
        f"{record['id_test_accuracy']:.4f}  ({seconds:.1f}s)")
    info = {"splits": rows, "zero_shot_id_test": record["id_test_accuracy"], "base_key": bkey,
            "zeroshot_sha256": record["sha256"], "reused": len(made) - computed, "computed": computed,
            "unit": "units", "seconds": seconds}
    return layout.mark_done(cfg, "prepare", zkey, info)
