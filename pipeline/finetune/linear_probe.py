"""The linear probe (finetune.init: linear_probe): the zero-shot classifier with its head trained
on the base's frozen image features of the train split, as model soups' ingredients started.
Computed once per key (train split content, zero-shot classifier sha256, probe settings) in one
Ray task with a trial's resources, stored at finetune/linear_probe.safetensors, and reused by
every trial and every rerun until an input changes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import layout, storage
from ..config import Config
from ..data import shards
from ..keys import digest, result_settings
from ..model import load_classifier, save_classifier
from .trainable import EVAL_BATCH, autocast, device_of, mean_std, normalize, train_images

# the finetune settings that decide which features are read in which order (besides the probe's own)
ORDER_SETTINGS = ("seed", "threads", "loader", "memory_limit_gb", "loader_workers", "shuffle_buffer")


def probe_settings(cfg: Config) -> dict:
    ft = cfg.finetune
    return {"probe": result_settings(ft.linear_probe), **{name: getattr(ft, name) for name in ORDER_SETTINGS}}


def probe_key(cfg: Config) -> str:
    """The probe's content key: the train split's content, the zero-shot classifier it starts
    from (base image tower, classes, zero-shot head) and the settings that change it."""
    from ..prepared import zero_shot_record

    _, train = layout.split_of_role(cfg, "train")
    return digest({"train": shards.split_content(train.uri), "start": zero_shot_record(cfg)["sha256"],
                   "settings": probe_settings(cfg)})


def current_record(cfg: Config) -> dict | None:
    """linear_probe.json when it was made from exactly the current inputs, else None."""
    uri = layout.probe_record_uri(cfg)
    if not storage.exists(uri) or not storage.exists(layout.probe_uri(cfg)):
        return None
    record = storage.read_json(uri)
    return record if record.get("key") == probe_key(cfg) else None


@torch.inference_mode()
def train_features(clf, setup: dict, preprocess: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base's normalised image features of every train image (eval crop), on the CPU."""
    device = next(clf.parameters()).device
    clf.eval()
    mean, std = mean_std(preprocess)
    features, labels = [], []
    for images, y in train_images(setup, preprocess, seed).batches(EVAL_BATCH, 0):
        with autocast(device):
            f = clf.visual(normalize(images.to(device), mean, std))
        features.append(F.normalize(f.float(), dim=-1).cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def accuracy(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return int((head(features).argmax(-1) == labels).sum()) / len(labels)


def fit_probe(setup: dict, settings: dict) -> dict:
    """Train the head on cached features with AdamW from the zero-shot head; returns the head's
    tensors and the train accuracy before and after. Deterministic from ``settings["seed"]``."""
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])  # the memory loader's order comes from torch's global RNG
    clf, meta = load_classifier(setup["start_uri"])
    clf = clf.to(device_of())
    features, labels = train_features(clf, setup, meta["preprocess"], settings["seed"])
    probe = settings["probe"]
    head = torch.nn.Linear(features.shape[1], clf.head.weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(clf.head.weight.float().cpu())
        head.bias.copy_(clf.head.bias.float().cpu())
    zero_shot_acc = accuracy(head, features, labels)
    opt = torch.optim.AdamW(head.parameters(), lr=probe["lr"], weight_decay=probe["weight_decay"])
    steps = probe["epochs"] * -(-len(labels) // probe["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))
    gen = torch.Generator().manual_seed(settings["seed"])
    for _ in range(probe["epochs"]):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), probe["batch_size"]):
            batch = order[start : start + probe["batch_size"]]
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()  # cosine to 0: the last steps settle instead of jumping around the optimum
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(), "images": len(labels),
            "train_acc": accuracy(head, features, labels), "zero_shot_train_acc": zero_shot_acc}


def ensure_probe(cfg: Config, log=print) -> dict:
    """linear_probe.json of the current inputs: the stored one, or a new probe trained in one
    Ray task (finetune.resources) and written checkpoint first, record last."""
    record = current_record(cfg)
    if record is not None and storage.sha256(storage.read_bytes(layout.probe_uri(cfg))) == record["sha256"]:
        log(f"finetune: linear probe reused (train accuracy {record['train_acc']:.4f})")
        return {**record, "reused": True}
    import ray

    from ..raycluster import init_ray
    from .sweep import trial_setup

    key, settings = probe_key(cfg), probe_settings(cfg)
    storage.delete(layout.probe_record_uri(cfg))  # withdrawn first: a crash midway reads as no probe
    init_ray(cfg)
    res = cfg.finetune.resources
    setup = {**trial_setup(cfg), "start_uri": layout.zeroshot_uri(cfg)}
    task = ray.remote(fit_probe).options(num_cpus=res.cpu, num_gpus=res.gpu)
    fitted = ray.get(task.remote(setup, settings))
    clf, meta = load_classifier(layout.zeroshot_uri(cfg))
    with torch.no_grad():
        clf.head.weight.copy_(fitted["weight"])
        clf.head.bias.copy_(fitted["bias"])
    data = save_classifier(layout.probe_uri(cfg), clf, model_name=meta["model_name"], class_names=meta["class_names"],
                           preprocess=meta["preprocess"], extra={"source": "linear_probe", "key": key})
    record = {"key": key, "sha256": storage.sha256(data), "settings": settings, "images": fitted["images"],
              "train_acc": fitted["train_acc"], "zero_shot_train_acc": fitted["zero_shot_train_acc"]}
    storage.write_json(layout.probe_record_uri(cfg), record)
    log(f"finetune: linear probe trained on {fitted['images']} train images: train accuracy "
        f"{fitted['zero_shot_train_acc']:.4f} (zero-shot head) -> {fitted['train_acc']:.4f}")
    return {**record, "reused": False}
