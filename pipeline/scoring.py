"""How a split's labels meet a model's logits, in one place for both scorers (the streaming
scorer of models in evaluate/stream.py and the mixture evaluator in evaluate/evaluator.py) and
prepare's zero-shot check: which model classes may win the argmax (a class subset), how a
prediction maps to the dataset's classes (a class map, ObjectNet style), and what counts as
correct."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import SplitConfig
from .data.imagenet import objectnet_class_map
from .data.shards import DataError
from .mixture import EvaluatorInputError


# ---- what a split is scored against ---------------------------------------------------------

@dataclass(frozen=True)
class Scoring:
    """How one split's labels meet the models' logits (plain numpy, so it pickles to actors)."""
    target_of_label: np.ndarray   # dataset label -> what a correct prediction equals
    class_mask: np.ndarray | None  # bool over model classes: which may win the argmax
    class_map: np.ndarray | None   # model class -> dataset class, or -1 (ObjectNet style)


def _unknown(names, known, what: str, where: str, of: str, hint: str = "") -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise DataError(f"{where}: {what} {missing[:5]} not among the {len(known)} class names of the {of}{hint}")


def split_scoring(name: str, split: SplitConfig, data_classes: list[str], model_classes: list[str]) -> Scoring:
    """Check a split's class_subset / class_map against the split's and the models' class names."""
    where = f"split {name!r} ({split.uri})"
    model_index = {c: i for i, c in enumerate(model_classes)}
    mask = None
    if split.class_subset is not None:
        _unknown(split.class_subset, model_index, "class_subset names", where, "model")
        mask = np.isin(np.array(model_classes, dtype=object), np.array(split.class_subset, dtype=object))
    class_map = split.class_map
    if split.objectnet_mappings is not None:
        class_map = objectnet_class_map(split.objectnet_mappings)
    if class_map is None:
        # labels name the split's classes; a correct prediction is the model class of that name
        _unknown(data_classes, model_index, "the split's classes", where, "model", "; declare a class_map")
        target = np.array([model_index[c] for c in data_classes], dtype=np.int64)
        if mask is not None:
            outside = [c for c in data_classes if not mask[model_index[c]]]
            if outside:
                raise DataError(f"{where}: classes {outside[:5]} are outside class_subset, so their "
                                f"images could never be scored correct")
        return Scoring(target, mask, None)
    data_index = {c: i for i, c in enumerate(data_classes)}
    _unknown(class_map, data_index, "class_map keys", where, "split")
    unmapped = [c for c in data_classes if c not in class_map]
    if unmapped:
        hint = " (import ObjectNet with --objectnet-mappings to keep only mapped folders)" \
            if split.objectnet_mappings is not None else ""
        raise DataError(f"{where}: class_map lacks the split's classes {unmapped[:5]}{hint}")
    model_to_data = np.full(len(model_classes), -1, dtype=np.int64)
    for data_class, targets in class_map.items():
        _unknown(targets, model_index, f"class_map[{data_class!r}] names", where, "model")
        for t in targets:
            if model_to_data[model_index[t]] >= 0:
                raise DataError(f"{where}: model class {t!r} appears under two class_map keys")
            model_to_data[model_index[t]] = data_index[data_class]
    return Scoring(np.arange(len(data_classes), dtype=np.int64), mask, model_to_data)


def scoring_tensors(scoring: Scoring, device):
    """(target_of_label, class_mask, class_map) as tensors on ``device``, checked like the mixture
    evaluator checks them."""
    mask = None if scoring.class_mask is None else torch.tensor(scoring.class_mask, dtype=torch.bool)
    class_map = None if scoring.class_map is None else torch.tensor(scoring.class_map, dtype=torch.long)
    mask = scoring_mask(mask, class_map)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    # torch.tensor copies: arrays that arrive through Ray are read-only
    return to(torch.tensor(scoring.target_of_label)), to(mask), to(class_map)


def scoring_mask(class_mask: torch.Tensor | None, class_map: torch.Tensor | None) -> torch.Tensor | None:
    """Model classes allowed to win the argmax. A class mapped to -1 is not in the dataset, so
    (like model soups' logit projection for ObjectNet) it cannot be predicted either."""
    if class_mask is not None and class_mask.dtype != torch.bool:
        raise EvaluatorInputError(f"class_mask must be a bool tensor, got {class_mask.dtype}")
    if class_map is not None and (class_map.dtype not in (torch.int32, torch.int64) or (class_map < -1).any()):
        raise EvaluatorInputError("class_map must be an integer tensor of dataset class indices or -1")
    if class_mask is not None and class_map is not None and class_mask.shape != class_map.shape:
        raise EvaluatorInputError(
            f"class_mask {tuple(class_mask.shape)} and class_map {tuple(class_map.shape)} differ in length")
    mask = class_mask
    if class_map is not None:
        mask = class_map >= 0 if mask is None else mask & (class_map >= 0)
    if mask is not None and (mask.dim() != 1 or not mask.any()):
        raise EvaluatorInputError("class_mask/class_map must be 1-D and allow at least one class")
    return mask


def predictions(logits: torch.Tensor, mask: torch.Tensor | None, class_map: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        if logits.dim() != 2 or logits.shape[1] != mask.shape[0]:
            raise EvaluatorInputError(f"the model gives {tuple(logits.shape)} logits but class_mask/class_map "
                                      f"has {mask.shape[0]} classes")
        logits = logits.masked_fill(~mask, float("-inf"))
    predicted = logits.argmax(dim=1)
    return predicted if class_map is None else class_map[predicted]
