"""One finetuning trial: the zero-shot classifier trained with AdamW, warmup + cosine, gradient
clipping, label smoothing, RandAugment and MixUp/CutMix, evaluated on val every epoch.

`run_trial` is the plain loop (no Ray); `train_ingredient` is the same loop as a Ray Tune
function trainable, which reports each epoch with a safetensors checkpoint and resumes from
the one Tune hands back after a failure or a restored sweep.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision import transforms as tv1
from torchvision.transforms import v2

from .. import console, storage
from ..config import parse_failure
from ..raycluster import placement
from ..data import shards
from ..model import image_transform, load_classifier, save_classifier
from ..model.weights import load_state_strict
from .train_set import MemoryTrain, StreamTrain, memory_bytes

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
HPARAM_KEYS = ("lr", "weight_decay", "epochs", "label_smoothing", "randaugment_magnitude", "mix_prob",
               "randaugment_ops")
EVAL_BATCH = 512


class InjectedFailure(RuntimeError):
    """Raised by the test hook `finetune.inject_failure`."""


# ---- data ----------------------------------------------------------------------------------

@dataclass
class TrialData:
    """The train images (kept or streamed, see stream.py) and the val images decoded once, as
    uint8 (N, C, H, W) at the model's input size."""
    train: MemoryTrain | StreamTrain
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor


def uint8_transform(preprocess: dict):
    """open_clip's eval transform minus ToTensor/Normalize, ending in a uint8 tensor: the same
    pixels the evaluate stage sees, so val accuracy here is the accuracy there."""
    steps = list(image_transform(preprocess, train=False).transforms)
    *resize, to_tensor, norm = steps
    if not isinstance(norm, (tv1.Normalize, v2.Normalize)) or "ToTensor" not in type(to_tensor).__name__:
        raise ValueError(f"unexpected open_clip transform {steps}: expected ... ToTensor, Normalize")
    return tv1.Compose([*resize, v2.PILToTensor()]), norm.mean, norm.std


def decode_uint8(split_uri: str, preprocess: dict) -> tuple[torch.Tensor, torch.Tensor]:
    transform, _, _ = uint8_transform(preprocess)
    images, labels = shards.decode_split(shards.read_split(split_uri), transform)
    return images.to(torch.uint8), labels


def mean_std(preprocess: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation as (1, C, 1, 1) tensors, to broadcast over a batch."""
    _, mean, std = uint8_transform(preprocess)
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def image_shape(preprocess: dict) -> tuple[int, int, int]:
    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return 3, height, width


def resolved_loader(setup: dict, preprocess: dict) -> str:
    """"memory" or "stream": ``setup["loader"]``, "auto" streaming when keeping the split would
    take more than ``memory_limit_gb``."""
    loader = setup.get("loader", "memory")
    if loader == "auto":
        rows = shards.split_info(setup["train_uri"])["num_rows"]
        loader = "stream" if memory_bytes(rows, image_shape(preprocess)) > setup["memory_limit_gb"] * 2**30 else "memory"
    return loader


def train_images(setup: dict, preprocess: dict, seed: int) -> MemoryTrain | StreamTrain:
    """The train split kept in memory or streamed, as ``setup["loader"]`` says ("auto": stream
    when keeping it would take more than ``memory_limit_gb``)."""
    if resolved_loader(setup, preprocess) == "stream":
        transform, _, _ = uint8_transform(preprocess)
        return StreamTrain(setup["train_uri"], transform, seed=seed, workers=setup["loader_workers"],
                           buffer=setup["shuffle_buffer"])
    return MemoryTrain(*decode_uint8(setup["train_uri"], preprocess))


def load_trial_data(setup: dict, preprocess: dict, seed: int) -> TrialData:
    train = train_images(setup, preprocess, seed)
    val_x, val_y = decode_uint8(setup["val_uri"], preprocess)
    return TrialData(train, val_x, val_y, *mean_std(preprocess))


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> the float input open_clip's ToTensor + Normalize would give."""
    x = images.float().div_(255)
    return (x - mean.to(x.device)) / std.to(x.device)


# ---- the pieces of a trial -----------------------------------------------------------------

def trial_seed(base_seed: int, trial: int) -> int:
    """Each trial's own seed: a retried or restored trial replays the same run."""
    return base_seed * 1_000 + trial


def hparams_of(config: dict) -> dict:
    return {k: config[k] for k in HPARAM_KEYS if k in config}


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup to 1, then cosine to 0 at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(clf: torch.nn.Module, config: dict, total_steps: int):
    opt = torch.optim.AdamW(clf.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config["setup"]["warmup_steps"], total_steps))
    return opt, sched


# torchvision's RandAugment levels: bin b of 31 is b/30 of an op's largest change; timm's M is
# M/10 of the same ranges (rotate 30 degrees, shear 0.3, translate 0.45, enhance 0.9), capped at 10
TV_BINS = 31
TIMM_MAX = 10


def randaugment_bin(magnitude: float) -> int:
    """timm's RandAugment magnitude M as torchvision's bin of 31 (M=10: the largest change)."""
    return round(min(float(magnitude), TIMM_MAX) * (TV_BINS - 1) / TIMM_MAX)


def build_augment(magnitude: float, ops: int = 2, crop: str = "center", size: tuple[int, int] | None = None):
    """The train-time augmentation of one uint8 image, or None: with ``crop``
    "random_resized_flip" timm's random resized crop and horizontal flip, then RandAugment
    ``rand-m{magnitude}-n{ops}`` on timm's scale (off when either is 0). torchvision's ops,
    drawn from torch's generator, so a resumed trial draws what the uninterrupted one drew."""
    steps = []
    if crop == "random_resized_flip":
        steps += [v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                       interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                  v2.RandomHorizontalFlip()]
    bin_ = randaugment_bin(magnitude)
    if bin_ > 0 and ops > 0:
        steps.append(v2.RandAugment(num_ops=int(ops), magnitude=bin_, num_magnitude_bins=TV_BINS))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


def build_mix(n_classes: int):
    return v2.RandomChoice([v2.MixUp(num_classes=n_classes), v2.CutMix(num_classes=n_classes)])


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    # bf16 on GPU; CPU stays in float32 (bf16 matmuls are slow there and change the numbers)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_epoch(clf, opt, sched, data: TrialData, config: dict, augment, mix, epoch: int) -> dict:
    """One pass over the shuffled train set; returns mean loss, images/s of the steps alone, and
    ``load_seconds``, the time spent waiting for batches (a stream's reads and decodes)."""
    device = next(clf.parameters()).device
    setup = config["setup"]
    clf.train()
    total_loss, seen, seconds, cpu_seconds, load_seconds = 0.0, 0, 0.0, 0.0, 0.0
    asked = time.perf_counter()
    for images, labels in data.train.batches(setup["batch_size"], epoch):
        t0, c0 = time.perf_counter(), time.thread_time()
        load_seconds += t0 - asked  # waiting for the batch: indexing, or a stream's reads and decodes
        if augment is not None:
            images = torch.stack([augment(img) for img in images])
        x, y = normalize(images.to(device), data.mean, data.std), labels.to(device)
        if mix is not None and float(torch.rand(())) < config["mix_prob"]:
            x, y = mix(x, y)  # y becomes soft targets
        with autocast(device):
            loss = F.cross_entropy(clf(x), y, label_smoothing=config["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), setup["grad_clip"])
        opt.step()
        sched.step()
        loss_value = float(loss.detach())  # syncs the device, so the timing is honest
        seconds += time.perf_counter() - t0
        cpu_seconds += time.thread_time() - c0  # this thread's CPU: the rate minus waiting for a core
        total_loss += loss_value * len(labels)
        seen += len(labels)
        asked = time.perf_counter()
    return {"train_loss": total_loss / seen, "train_images": seen, "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds, "load_seconds": load_seconds,
            "images_per_s": seen / seconds if seconds > 0 else 0.0}


@torch.inference_mode()
def evaluate(clf, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Accuracy and mean cross-entropy of ``clf`` on uint8 images."""
    device = next(clf.parameters()).device
    clf.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(labels), EVAL_BATCH):
        x = normalize(images[start : start + EVAL_BATCH].to(device), mean, std)
        y = labels[start : start + EVAL_BATCH].to(device)
        with autocast(device):
            logits = clf(x).float()
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return {"val_acc": correct / len(labels), "val_loss": loss / len(labels)}


# ---- checkpoints: safetensors + a small JSON, never pickle ---------------------------------

def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> (tensors by "state.<param>.<name>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    for key, value in rest["scalars"].items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_trial(directory: str, clf, opt, sched, *, epoch: int, metrics: dict, config: dict, meta: dict) -> None:
    """Everything a resumed trial needs: model (ingredient format), optimizer, RNG, scheduler."""
    save_classifier(os.path.join(directory, MODEL_FILE), clf, model_name=meta["model_name"],
                    class_names=meta["class_names"], preprocess=meta["preprocess"],
                    extra={"source": "tune", "epoch": epoch, "hparams": hparams_of(config),
                           "val_acc": metrics["val_acc"], "trial": config["trial"]})
    opt_tensors, opt_rest = flatten_optimizer(opt.state_dict())
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in {**opt_tensors, **rng}.items()},
              os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"epoch": epoch, "metrics": metrics, "optimizer": opt_rest,
                   "scheduler": sched.state_dict()}, f)


def restore_trial(directory: str, clf, opt, sched) -> dict:
    """Load a `save_trial` directory into the live objects; returns its state.json."""
    from safetensors.torch import load_file

    model_tensors, _ = storage.load_tensors(os.path.join(directory, MODEL_FILE))
    load_state_strict(clf, model_tensors, os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(directory, OPTIMIZER_FILE))
    # load_state_dict moves the moments to the parameters' device itself
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("state.")}
    opt.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"]))
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


# ---- the loop ------------------------------------------------------------------------------

Report = Callable[[dict, "str | None"], None]


def run_trial(config: dict, report: Report, *, resume_dir: str | None = None) -> dict:
    """Finetune the start classifier (zero-shot or linear probe, ``setup["start_uri"]``) with ``config`` (sampled hparams + ``setup``); after
    every epoch call ``report(metrics, checkpoint_dir)`` (the directory lives only during the
    call). ``resume_dir``: a checkpoint to continue from. Returns the last metrics."""
    setup = config["setup"]
    torch.set_num_threads(setup["threads"])
    torch.manual_seed(trial_seed(setup["seed"], config["trial"]))
    clf, meta = load_classifier(setup["start_uri"])
    clf = clf.to(device_of())
    data = load_trial_data(setup, meta["preprocess"], trial_seed(setup["seed"], config["trial"]))
    epochs = int(config["epochs"])
    opt, sched = build_optimizer(clf, config, epochs * steps_per_epoch(len(data.train), setup["batch_size"]))
    augment = build_augment(config["randaugment_magnitude"], config.get("randaugment_ops", 2),
                            setup.get("train_crop", "center"), image_shape(meta["preprocess"])[1:])
    mix = build_mix(len(meta["class_names"])) if config["mix_prob"] > 0 else None
    failure = parse_failure(setup.get("inject_failure"))

    start_epoch, metrics = 0, {}
    if resume_dir is not None:
        state = restore_trial(resume_dir, clf, opt, sched)
        start_epoch, metrics = state["epoch"], state["metrics"]
    restored_from = start_epoch
    if start_epoch >= epochs:
        # finished before the sweep was interrupted: say so again, train nothing
        report({**metrics, "restored_from_epoch": restored_from}, None)
        return metrics
    for epoch in range(start_epoch + 1, epochs + 1):
        if failure == (config["trial"], epoch) and restored_from == 0:
            raise InjectedFailure(f"injected failure: trial {config['trial']} at epoch {epoch}")
        train = train_epoch(clf, opt, sched, data, config, augment, mix, epoch)
        metrics = {**evaluate(clf, data.val_images, data.val_labels, data.mean, data.std), **train,
                   "epoch": epoch, "trial": config["trial"], "restored_from_epoch": restored_from}
        with tempfile.TemporaryDirectory(prefix="frankensoup-trial-") as ckpt:
            save_trial(ckpt, clf, opt, sched, epoch=epoch, metrics=metrics, config=config, meta=meta)
            report(metrics, ckpt)
    return metrics


def train_ingredient(config: dict, setup: dict | None = None, hparams: dict | None = None) -> None:
    """Ray Tune function trainable: `run_trial` reporting through `tune.report`. Tune searches
    only ``config["trial"]``; ``setup`` and each trial's ``hparams`` come through
    ``tune.with_parameters`` (a config that already holds them is used as it is)."""
    from ray import tune

    console.quiet_worker_logs()
    if setup is not None:
        config = {**hparams[config["trial"]], **config, "setup": setup}

    # recorded in the registry: the node it trained on, its CPUs and (logical) GPUs, its device;
    # flat scalars, so the tracking loggers take or skip them without a warning
    where = placement(device_of().type)

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        tune.report({**metrics, **where}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(config, report)
        return
    with checkpoint.as_directory() as resume_dir:
        run_trial(config, report, resume_dir=resume_dir)
