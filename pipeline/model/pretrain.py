"""Contrastive pretraining of the offline demo CLIP: image/caption pairs made from class names
and prompt templates, trained with open_clip's own ClipLoss. Deliberately short: the base
should be decent at zero-shot yet leave finetuning something to gain."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip import CLIP

from ..config import DemoBaseConfig
from .classifier import TEMPLATES, Classifier, resolve_templates
from .factory import DEMO_MODEL, create_clip, tokenizer_for

MAX_LOGIT_SCALE = math.log(100)  # open_clip's training clamp
LOG_EVERY = 50


def caption_tokens(tokenizer, class_names: Sequence[str], templates: Sequence) -> torch.Tensor:
    """Tokens of every (class, template) caption: (n_classes, n_templates, context_length)."""
    texts = [t.format(c) if isinstance(t, str) else t(c) for c in class_names for t in templates]
    return tokenizer(texts).reshape(len(class_names), len(templates), -1)


def distinct_class_batch(by_class: list[torch.Tensor], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``batch_size`` images of ``batch_size`` different classes: two captions of
    one class in a batch would be contrasted as negatives of each other."""
    classes = torch.randperm(len(by_class), generator=gen)[:batch_size]
    picks = [by_class[c][torch.randint(len(by_class[c]), (1,), generator=gen)] for c in classes.tolist()]
    return torch.cat(picks)


def augment(images: torch.Tensor, gen: torch.Generator, max_degrees: float = 5.0,
            max_shift: float = 0.05, scale: tuple[float, float] = (0.95, 1.05),
            noise: float = 0.05) -> torch.Tensor:
    """Mild random affine (rotation, scale, shift in [-1, 1] image coordinates) plus Gaussian
    noise on normalised tensors; twice these values cost the demo base ~0.1 zero-shot accuracy."""
    n = images.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    angle = torch.deg2rad(u(-max_degrees, max_degrees))
    s = u(*scale)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, u(-max_shift, max_shift)], 1),
                         torch.stack([sin, cos, u(-max_shift, max_shift)], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    return moved + noise * torch.randn(moved.shape, generator=gen)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases and the logit scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                  cfg: DemoBaseConfig) -> list[torch.Tensor]:
    """Validate the inputs; returns the image indices of each class that has images."""
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)} labels")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must lie in [0, {len(class_names)}) for {len(class_names)} class names")
    by_class = [torch.nonzero(labels == c).flatten() for c in range(len(class_names))]
    present = [ix for ix in by_class if len(ix)]
    if cfg.batch_size > len(present):
        raise ValueError(f"model.demo_base.batch_size={cfg.batch_size} exceeds the {len(present)} classes "
                         f"present in the pretraining images (a batch may not repeat a class)")
    return present


def pretrain_demo_clip(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       cfg: DemoBaseConfig, *, model_name: str = DEMO_MODEL,
                       templates: Sequence = TEMPLATES["demo"], log: Callable[[str], None] = print) -> CLIP:
    """Train a randomly initialised CLIP on (image, caption) pairs; returns it in eval mode."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    by_class = _check_inputs(images, labels, class_names, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    model, _ = create_clip(model_name)
    tokens = caption_tokens(tokenizer_for(model_name), class_names, resolve_templates(templates))
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    model.train()
    for step in range(cfg.steps):
        idx = distinct_class_batch(by_class, cfg.batch_size, gen)
        template = torch.randint(tokens.shape[1], (len(idx),), generator=gen)
        text = tokens[labels[idx], template]
        image_features, text_features, logit_scale = model(augment(images[idx], gen), text)
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if step % LOG_EVERY == 0 or step == cfg.steps - 1:
            log(f"pretrain step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def zero_shot_accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor,
                       batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on preprocessed image tensors."""
    clf.eval()
    correct = sum((clf(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)
