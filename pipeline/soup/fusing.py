"""The methods' fused classifiers: fused from the ingredient checkpoints with the core's reference
fusion, and scored like every other model (the evaluate stage's Ray Data scoring)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .. import layout, storage
from ..evaluate.stream import score_with_memo
from ..config import Config
from ..scores import ScoreMemo
from ..model import classifier as clf_lib
from ..model import weights
from . import mixing
from .inputs import Ingredient, SoupInputs, load_state


def fuse_methods(betas: dict[str, np.ndarray], ingredients: Sequence[Ingredient], components) -> dict[str, dict]:
    """Each method's fused classifier state dict, with the core's reference fusion, in one pass
    that loads each ingredient a method uses once and holds one at a time."""
    used = sorted({int(j) for b in betas.values() for j in np.flatnonzero(b.any(axis=1))})
    return mixing.fuse_many(((j, load_state(ingredients[j].uri)) for j in used), betas, components)


def score_fused(cfg: Config, inputs: SoupInputs, states: Mapping[str, dict | Callable[[], dict]], scratch_uri: str,
                split_names: Sequence[str], ensembles: Mapping[str, Sequence[int]] | None = None
                ) -> tuple[dict[str, dict[str, dict]], int, int]:
    """({model: {split: {"accuracy", "correct", "n"}}}, reused, computed) of classifiers made
    from the ingredients (``states``: fused state dicts; ``ensembles``: ingredient rows whose
    logits are averaged), scored like every other model (the evaluate stage's Ray Data scoring)
    from checkpoints under ``scratch_uri``. Scores are memoised by the weights' content hash
    (an ensemble's: its members') and the split's content, so an added ood set scores only
    that set, and an unchanged soup nothing. Entries carry per-image outcomes (``correct_bits``,
    for the report's paired tests). A state may be given as a function that makes it (a grid of
    interpolations): it is made to hash it and again only to write its checkpoint, so the driver
    holds one such state at a time, not the whole grid."""
    meta = inputs.meta
    model_name, class_names = meta["model_name"], list(meta["class_names"])
    written: dict[str, str] = {}

    def checkpoint(name: str) -> str:
        """Write a fused model's checkpoint, once, when it has scores to compute (a big model's
        file is not written for scores the memo holds)."""
        if name not in written:
            state = states[name]() if callable(states[name]) else states[name]
            clf = clf_lib.classifier_from_state(model_name, state, len(class_names), source=f"fused {name}")
            uri = storage.join(scratch_uri, f"{name}.safetensors")
            weights.save_classifier(uri, clf, model_name=model_name, class_names=class_names,
                                    preprocess=meta["preprocess"], extra={"source": "soup"})
            written[name] = uri
        return written[name]

    # keyed by the weights' content, not the file's bytes
    models = {name: (functools.partial(checkpoint, name),
                     weights.tensors_sha256(state() if callable(state) else state))
              for name, state in states.items()}
    members: dict[str, list[str]] = {}
    for name, rows in (ensembles or {}).items():
        members[name] = [f"ingredient {inputs.ingredients[j].id}" for j in rows]
        models.update({f"ingredient {inputs.ingredients[j].id}": (inputs.ingredients[j].uri, inputs.ingredients[j].sha256)
                       for j in rows})
    splits = layout.splits(cfg)
    memo = ScoreMemo(layout.fused_scores_uri(cfg))
    by_split, reused, computed = score_with_memo(cfg, memo, models, {s: splits[s] for s in split_names}, class_names,
                                                 ensembles=members, per_image=True)
    return {name: {s: by_split[s][name] for s in split_names} for name in [*states, *members]}, reused, computed


class ModelServices:
    """What soup methods whose models are not ingredient mixtures use (WiSE-FT, the output
    ensemble): the zero-shot and ingredient weights, the reference fusion, and val scores of
    the models they make, through the fused-model score memo."""

    def __init__(self, cfg: Config, inputs: SoupInputs, scratch_uri: str, val: str):
        self.cfg, self.inputs, self.scratch_uri, self.val = cfg, inputs, scratch_uri, val

    def zero_shot_state(self) -> dict[str, torch.Tensor]:
        return self.inputs.reference.state_dict()

    def ingredient_state(self, row: int) -> dict[str, torch.Tensor]:
        return load_state(self.inputs.ingredients[row].uri)

    def ingredient(self, row: int) -> Ingredient:
        return self.inputs.ingredients[row]

    def checkpoint_state(self, uri: str, source: str) -> dict[str, torch.Tensor]:
        """Another classifier checkpoint of this model (safetensors, or a legacy file read with
        weights_only): refused, naming ``source`` and the tensor, unless it has the zero-shot
        classifier's tensor names and shapes and finite weights."""
        tensors, _ = weights.read_checkpoint(uri)
        reference = self.zero_shot_state()
        for name, t in reference.items():
            if name not in tensors or tensors[name].shape != t.shape:
                found = tuple(tensors[name].shape) if name in tensors else "missing"
                raise weights.CheckpointError(f"{source}: tensor {name!r} is {found}, expected {tuple(t.shape)}")
        extra = sorted(set(tensors) - set(reference))
        if extra:
            raise weights.CheckpointError(f"{source}: tensors the model does not have: {extra[:5]}")
        weights.check_finite(tensors, source)
        return {name: tensors[name].to(t.dtype) for name, t in reference.items()}

    @property
    def components(self) -> list:
        return list(self.inputs.components)

    def fuse(self, states: Sequence[dict[str, torch.Tensor]], beta: np.ndarray,
             components=None) -> dict[str, torch.Tensor]:
        """``sum_j beta[j, c] * states[j]`` per component (the soup's, or ``components``): the
        reference fusion of any models."""
        return mixing.fuse(states, beta, self.inputs.components if components is None else components)

    @property
    def n_components(self) -> int:
        return len(self.inputs.components)

    def val_accuracy(self, states: Mapping[str, dict | Callable[[], dict]] | None = None,
                     ensembles: Mapping[str, Sequence[int]] | None = None) -> dict[str, float]:
        scores, _, _ = score_fused(self.cfg, self.inputs, states or {}, self.scratch_uri, [self.val], ensembles)
        return {name: by_split[self.val]["accuracy"] for name, by_split in scores.items()}
