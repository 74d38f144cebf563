"""The model-soups classifier: CLIP's image tower + a linear head initialised from zero-shot
text embeddings. Only these parameters are finetuned, mixed and shipped."""
from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from torch import nn

from .checkpoint import load_state_strict
from .factory import model_config

TEMPLATES: dict[str, list] = {
    "demo": [
        "a photo of the digit {}.",
        "a handwritten {}.",
        "the number {}.",
        "a blurry drawing of a {}.",
    ],
    # callables (lambdas), which build_zero_shot_classifier accepts as well as "{}" strings
    "openai_imagenet": list(open_clip.OPENAI_IMAGENET_TEMPLATES),
}

# prompts embedded per text-tower pass: ViT-B-32's text tower needs ~2 GB per 1000 on CPU
PROMPTS_PER_BATCH = 256


class Classifier(nn.Module):
    """logits = head(normalize(visual(images))); head.weight rows are scaled class embeddings."""

    def __init__(self, visual: nn.Module, head: nn.Linear):
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.visual(images)
        # the head in float32 outside autocast: bfloat16 logits of 16-32 step by 0.125, so
        # near-ties would collapse to the lower class index and flip per-image outcomes
        with torch.autocast(features.device.type, enabled=False):
            x = F.normalize(features.float(), dim=-1)
            return F.linear(x, self.head.weight.float(), None if self.head.bias is None else self.head.bias.float())


def resolve_templates(name_or_list: str | Sequence) -> list:
    """A template set by name, or a user's list of "{}" strings (checked)."""
    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATES:
            raise ValueError(f"unknown template set {name_or_list!r}; known: {sorted(TEMPLATES)}")
        return list(TEMPLATES[name_or_list])
    templates = list(name_or_list)
    if not templates:
        raise ValueError("templates: the list is empty")
    bad = [t for t in templates if not callable(t) and (not isinstance(t, str) or "{}" not in t)]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad[:3]}")
    return templates


def classes_per_batch(n_templates: int, prompts_per_batch: int = PROMPTS_PER_BATCH) -> int:
    """How many classes' prompts go through the text tower together: all of a class's templates
    at once, at most ``prompts_per_batch`` prompts (at least one class)."""
    return max(1, prompts_per_batch // max(1, n_templates))


def build_classifier(clip_model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                     templates: Sequence, prompts_per_batch: int = PROMPTS_PER_BATCH) -> Classifier:
    """Zero-shot classifier: head = logit_scale.exp() * class text embeddings, bias 0.
    The classifier shares ``clip_model.visual`` (no copy). Prompts are embedded a few classes at
    a time, so memory does not grow with classes x templates (1000 x 80 for ImageNet)."""
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty")
    templates = resolve_templates(templates)
    text_emb = open_clip.build_zero_shot_classifier(
        clip_model, tokenizer, class_names, templates,
        num_classes_per_batch=classes_per_batch(len(templates), prompts_per_batch),
        device=clip_model.logit_scale.device)  # (embed_dim, n_classes)
    head = nn.Linear(text_emb.shape[0], len(class_names))
    with torch.no_grad():
        head.weight.copy_(clip_model.logit_scale.exp() * text_emb.T)
        head.bias.zero_()
    return Classifier(clip_model.visual, head).eval()


def init_classifier(model_name: str, n_classes: int, model_cfg: dict | None = None) -> Classifier:
    """A randomly initialised classifier of the given architecture (no text tower is built)."""
    cfg = model_cfg or model_config(model_name)
    embed_dim = cfg["embed_dim"]
    # the same builder open_clip's CLIP uses for its image tower
    vision_cfg = {**cfg["vision_cfg"], "timm_model_pretrained": False}  # never download here
    visual = _build_vision_tower(embed_dim, vision_cfg, cfg.get("quick_gelu", False))
    return Classifier(visual, nn.Linear(embed_dim, n_classes)).eval()


def classifier_from_state(model_name: str, state_dict: dict[str, torch.Tensor], n_classes: int, *,
                          source: str = "<state dict>", model_cfg: dict | None = None) -> Classifier:
    """Rebuild a classifier from its tensors; CheckpointError names ``source`` on any mismatch."""
    clf = init_classifier(model_name, n_classes, model_cfg)
    load_state_strict(clf, state_dict, source)
    return clf
