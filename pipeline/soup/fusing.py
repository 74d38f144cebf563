"""The methods' fused classifiers: fused from the ingredient checkpoints with the core's reference
fusion, and scored like every other model (the evaluate stage's Ray Data scoring)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import layout, storage
from ..config import Config
from ..model import classifier as clf_lib
from ..model import weights
from . import mixture
from .inputs import Ingredient, load_state


def fuse_methods(betas: dict[str, np.ndarray], ingredients: Sequence[Ingredient], components) -> dict[str, dict]:
    """Each method's fused classifier state dict, with the core's reference fusion, in one pass
    that loads each ingredient a method uses once and holds one at a time."""
    used = sorted({int(j) for b in betas.values() for j in np.flatnonzero(b.any(axis=1))})
    return mixture.fuse_many(((j, load_state(ingredients[j].uri)) for j in used), betas, components)


def score_fused(cfg: Config, fused: dict[str, dict], model_name: str, class_names: list[str], preprocess: dict,
                scratch_uri: str, split_names: Sequence[str]) -> tuple[dict[str, dict[str, dict]], int, int]:
    """({method: {split: {"accuracy", "correct", "n"}}}, reused, computed) of fused classifiers,
    scored like every other model (the evaluate stage's Ray Data scoring) from checkpoints under
    ``scratch_uri``. Scores are memoised by the fused weights' content hash and the split's
    content, so an added ood set scores only that set, and an unchanged soup nothing."""
    from ..evaluate.scores import ScoreMemo, score_with_memo

    models = {}
    for name, state in fused.items():
        clf = clf_lib.classifier_from_state(model_name, state, len(class_names), source=f"fused {name}")
        uri = storage.join(scratch_uri, f"{name}.safetensors")
        weights.save_classifier(uri, clf, model_name=model_name, class_names=class_names,
                                preprocess=preprocess, extra={"source": "soup"})
        models[name] = (uri, weights.tensors_sha256(state))  # the weights' content, not the file's bytes
    splits = layout.splits(cfg)
    memo = ScoreMemo(layout.fused_scores_uri(cfg))
    by_split, reused, computed = score_with_memo(cfg, memo, models, {s: splits[s] for s in split_names}, class_names)
    return {name: {s: by_split[s][name] for s in split_names} for name in fused}, reused, computed
