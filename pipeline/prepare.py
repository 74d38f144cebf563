"""The prepare stage: the shards (the demo builds its own), the base CLIP (the demo trains its
own, offline) and the zero-shot classifier every finetune starts from."""
from __future__ import annotations

import time

from . import layout, storage
from .config import Config, ConfigError
from .data import shards
from .data.imagenet import prompt_names
from .model import classifier as clf_lib
from .model import factory, weights


def zeroshot_uri(cfg: Config) -> str:
    return storage.join(layout.stage_dir(cfg, "prepare"), "zeroshot.safetensors")


def load_base_clip(cfg: Config):
    """The base CLIP and its preprocess config: the demo's (made by prepare) or open_clip's."""
    if cfg.model.pretrained == "demo":
        base = layout.base_dir(cfg)
        if not storage.exists(storage.join(base, "open_clip_model.safetensors")):
            raise ConfigError(f"model.pretrained=demo but no demo base model at {base!r}: run `frankensoup prepare`")
        return factory.load_clip(base)
    return factory.create_clip(cfg.model.name, cfg.model.pretrained)


def class_names(cfg: Config) -> list[str]:
    _, train = layout.split_of_role(cfg, "train")
    return shards.split_info(train.uri)["class_names"]


def build_zero_shot(cfg: Config, clip, names: list[str]):
    """The zero-shot head over ``names``: each class's prompt name (``model.prompt_names``)
    put into every template, embedded by the base CLIP's text tower."""
    texts = prompt_names(names, cfg.model.prompt_names)
    tokenizer = factory.tokenizer_for(cfg.model.name)
    return clf_lib.build_classifier(clip, tokenizer, texts, clf_lib.resolve_templates(cfg.model.templates))


def load_zero_shot(cfg: Config):
    """(classifier, metadata) of the zero-shot head on the base image tower."""
    return weights.load_classifier(zeroshot_uri(cfg))


def _accuracy(clf, split_uri: str, preprocess: dict) -> float:
    import torch

    from .model.pretrain import zero_shot_accuracy

    split = shards.read_split(split_uri)
    images, labels = shards.decode_split(split, factory.image_transform(preprocess, train=False))
    with torch.inference_mode():
        return zero_shot_accuracy(clf, images, labels, batch_size=512)


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
    log(f"demo base CLIP trained contrastively on {len(images)} pretrain images in {time.time() - t0:.1f}s")
    return clip, preprocess


def run_prepare(cfg: Config, force: bool = False, log=print) -> dict:
    done = layout.stage_done(cfg, "prepare")
    if done and not force:
        log(f"prepare: already done under these settings ({done['finished']}), skipping")
        return done
    t0 = time.time()
    if cfg.data.source == "demo":
        from .data.demo import write_demo_splits

        write_demo_splits(storage.join(cfg.output_uri, "data"), cfg.data.demo, cfg.data.rows_per_shard)
    rows = {}
    for name, split in layout.splits(cfg).items():
        info = shards.split_info(split.uri)  # fails naming an unreadable or incomplete split
        rows[name] = {"role": split.role, "rows": info["num_rows"], "uri": split.uri}
    names = class_names(cfg)
    prompt_names(names, cfg.model.prompt_names)  # a name without a prompt fails before any training
    if cfg.model.pretrained == "demo":
        clip, preprocess = _build_demo_base(cfg, log=log)
    else:
        clip, preprocess = load_base_clip(cfg)
    zs = build_zero_shot(cfg, clip, names)
    weights.save_classifier(zeroshot_uri(cfg), zs, model_name=cfg.model.name, class_names=names,
                            preprocess=preprocess, extra={"source": "zero-shot"})
    _, test = layout.split_of_role(cfg, "id_test")
    acc = _accuracy(zs, test.uri, preprocess)

    log("prepare: rows per split")
    for name, r in rows.items():
        log(f"  {name:<10} {r['role']:<9} {r['rows']:>6}")
    log(f"prepare: zero-shot accuracy on id_test = {acc:.4f}  ({time.time() - t0:.1f}s)")
    info = {"splits": rows, "zero_shot_id_test": acc, "zeroshot_uri": zeroshot_uri(cfg),
            "seconds": round(time.time() - t0, 1)}
    layout.mark_done(cfg, "prepare", info)
    return layout.stage_done(cfg, "prepare")
