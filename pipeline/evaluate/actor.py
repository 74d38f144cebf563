"""The mixture evaluator built from a run's URIs, in-process (`build_mixture_evaluator`) and as
a Ray actor (`MixtureEvaluatorActor`) wrapping the very same class. The soup search
dispatches its candidate mixtures to these actors (pipeline/soup/pool.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import ray
import torch

from .. import layout, storage
from ..config import Config, ConfigError
from ..data.shards import decode_split, read_split
from ..ingredients import Ingredient, RunModel, read_registry, usable, verify
from ..raycluster import placement
from ..model import components, image_transform, load_classifier
from .mixture import MixtureEvaluator, Score, Threshold
from .scoring import scoring_tensors, split_scoring


def chosen_ingredients(cfg: Config, ingredient_ids: Sequence[str] | None) -> list[Ingredient]:
    """The ingredients to mix: ``ingredient_ids`` in that order, or every ``ok`` one in registry
    order."""
    found = usable(read_registry(cfg))
    if ingredient_ids is None:
        chosen = found
    else:
        by_id = {i.id: i for i in found}
        unknown = [i for i in ingredient_ids if i not in by_id]
        if unknown:
            raise ConfigError(f"ingredients {unknown} are not 'ok' ingredients of {layout.registry_uri(cfg)}")
        chosen = [by_id[i] for i in ingredient_ids]
    if not chosen:
        raise ConfigError(f"no ingredients to mix in {layout.registry_uri(cfg)}")
    return chosen


class IngredientCheckpoints(Sequence):
    """The ingredients' state dicts, read and verified when indexed: the evaluator stacks them
    one at a time, so host memory holds one checkpoint, not K."""

    def __init__(self, ingredients: Sequence[Ingredient], run: RunModel):
        self.ingredients, self.run = list(ingredients), run

    def __len__(self) -> int:
        return len(self.ingredients)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if not 0 <= j < len(self.ingredients):
            raise IndexError(j)
        ingredient = self.ingredients[j]
        return verify(ingredient, storage.read_bytes(ingredient.checkpoint_uri), self.run)


def build_mixture_evaluator(cfg: Config, split_name: str = "val", ingredient_ids: Sequence[str] | None = None,
                            *, device: str | torch.device | None = None) -> MixtureEvaluator:
    """A MixtureEvaluator over the registry's ingredients (rows of beta in ``ingredient_ids``
    order) on ``split_name``, decoded once with the eval transform, with components at
    ``cfg.soup.granularity`` and the split's class_subset / class_map."""
    ingredients = chosen_ingredients(cfg, ingredient_ids)
    splits = layout.splits(cfg)
    if split_name not in splits:
        raise ConfigError(f"no split named {split_name!r}; the run's splits are {sorted(splits)}")
    torch.set_num_threads(cfg.evaluate.threads)  # decoding too, not only the evaluator's arithmetic
    model, meta = load_classifier(ingredients[0].checkpoint_uri)
    split = read_split(splits[split_name].uri)
    images, labels = decode_split(split, image_transform(meta["preprocess"], train=False))
    scoring = split_scoring(split_name, splits[split_name], split.class_names, meta["class_names"])
    target_of_label, class_mask, class_map = scoring_tensors(scoring, "cpu")
    ev = cfg.evaluate
    return MixtureEvaluator(model, IngredientCheckpoints(ingredients, RunModel.of_run(cfg)),
                            components(model, cfg.soup.granularity),
                            images, target_of_label[labels], dtype=ev.ingredient_dtype, device=device,
                            batch_size=ev.batch_size, class_mask=class_mask, class_map=class_map,
                            threads=ev.threads, memory_limit_gb=ev.memory_limit_gb)


def evaluator_device(cfg: Config) -> str:
    """The actor's device: a GPU only when the actor was given one."""
    return "cuda" if cfg.soup.evaluator_resources.gpu > 0 and torch.cuda.is_available() else "cpu"


def _evaluator_metrics():
    """Busy seconds and call latency for the dashboard (per node); None where Ray has no metrics
    agent (in-process use, a bare test): the evaluator works the same without them."""
    try:
        from ..metrics import EvaluatorMetrics

        return EvaluatorMetrics()
    except Exception:
        return None


class EvaluatorHost:
    """What a MixtureEvaluatorActor holds: one MixtureEvaluator, built once from URIs."""

    def __init__(self, cfg: Config, split_name: str = "val", ingredient_ids: Sequence[str] | None = None):
        torch.set_num_threads(cfg.evaluate.threads)  # pinned: results never depend on the node's load
        self.ids = [i.id for i in chosen_ingredients(cfg, ingredient_ids)]
        self.split_name = split_name
        self.evaluator = build_mixture_evaluator(cfg, split_name, self.ids, device=evaluator_device(cfg))
        self.metrics = _evaluator_metrics()

    def _busy(self):
        return self.metrics.evaluating() if self.metrics is not None else contextlib.nullcontext()

    def evaluate(self, betas: Sequence) -> list[float]:
        with self._busy():
            return self.evaluator.evaluate(list(betas))

    def score(self, betas: Sequence, thresholds: Sequence[Threshold | None] | None = None) -> list[Score]:
        """Val accuracy per mixture; one with a threshold stops early once it cannot pass."""
        with self._busy():
            return self.evaluator.score(list(betas), thresholds)

    def probe(self, betas: Sequence) -> bytes:
        """Predictions on the probe images for the probe mixtures (pipeline/soup/probe.py)."""
        from ..soup.probe import probe_predictions

        return probe_predictions(self.evaluator, list(betas))

    def info(self) -> dict:
        ev = self.evaluator
        return {"ingredient_ids": self.ids, "split": self.split_name, "beta_shape": list(ev.beta_shape),
                "component_names": list(ev.component_names), "n_images": int(ev.images.shape[0]),
                "device": str(ev.device), "dtype": str(ev.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), **placement(ev.device),
                "device_name": torch.cuda.get_device_name(ev.device) if ev.device.type == "cuda" else "cpu"}


# resources come from the caller: .options(num_cpus=..., num_gpus=...) (soup.evaluator_resources)
MixtureEvaluatorActor = ray.remote(EvaluatorHost)
