"""The soup's inputs: the usable ingredients (beta row order), their and the zero-shot head's
scores from the evaluate stage's memo, the reference classifier and its components (beta
column order); and the keys of what the soup computes from them: the search memo's context and
the soup's own key."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import layout, storage
from ..data.shards import split_content
from ..prepared import ZERO_SHOT, load_zero_shot, zero_shot_record
from ..config import Config
from ..errors import UserError
from ..ingredients import Ingredient, IngredientError, RunModel, read_registry, usable, verify
from ..keys import digest, result_settings
from ..scores import ScoreMemo, score_keys, splits_to_score
from ..model import weights
from ..model.components import components as model_components
from .methods import method_keys


class SoupInputError(UserError, ValueError):
    """Inputs the soup cannot use (missing stage, unusable ingredient); the message names them."""


# ---- inputs ---------------------------------------------------------------------------------

def usable_ingredients(registry: dict) -> list[Ingredient]:
    """The registry's ``ok`` ingredients, by id (the row order of every beta)."""
    found = usable(registry)
    if not found:
        raise SoupInputError("finetune/ingredients.json lists no ingredient with status 'ok': nothing to mix")
    return sorted(found, key=lambda i: i.id)


def read_evaluations(cfg: Config, ingredients: Sequence[Ingredient]) -> dict[str, dict[str, dict]]:
    """{model: {split: {"accuracy", "correct", "n", "role"}}} of the zero-shot head and every
    ingredient, looked up in the evaluate stage's memo by content key: a score of another
    checkpoint or another split content is never used."""

    memo = ScoreMemo(layout.evaluate_memo_uri(cfg))
    splits = splits_to_score(cfg)
    shas = {ZERO_SHOT: zero_shot_record(cfg)["sha256"], **{i.id: i.sha256 for i in ingredients}}
    keys = score_keys(cfg, shas, splits)
    out: dict[str, dict[str, dict]] = {}
    for s, split in splits.items():
        for m in shas:
            if keys[m, s] not in memo:
                raise SoupInputError(f"no current score of {m!r} on split {s!r} (its checkpoint or the split "
                                     "changed, or it is new): run `frankensoup evaluate` first")
            out.setdefault(m, {})[s] = {**memo[keys[m, s]], "role": split.role}
    return out


def check_ingredients(cfg: Config, ingredients: Sequence[Ingredient]) -> None:
    """Refuse, naming the ingredient and file, a checkpoint that is not the registered one or
    does not fit the run's model (`pipeline.ingredients.verify`)."""
    run = RunModel.of_run(cfg)
    for ingredient in ingredients:
        try:
            verify(ingredient, storage.read_bytes(ingredient.checkpoint_uri), run)
        except IngredientError as e:
            raise SoupInputError(str(e)) from None


def load_state(uri: str) -> dict[str, torch.Tensor]:
    tensors, _ = weights.read_checkpoint(uri)
    return tensors


@dataclass
class SoupInputs:
    ingredients: list[Ingredient]   # beta row order
    evaluations: dict                # evaluate/results.parquet by model and split
    reference: torch.nn.Module       # the zero-shot classifier: architecture and components
    meta: dict                       # its metadata: model_name, class_names, preprocess
    components: list                 # beta column order

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.ingredients]

    @property
    def component_names(self) -> list[str]:
        return [c.name for c in self.components]


def load_inputs(cfg: Config) -> SoupInputs:
    """The earlier stages' outputs, every ingredient checked before anything is evaluated."""

    ingredients = usable_ingredients(read_registry(cfg))
    reference, meta = load_zero_shot(cfg)
    check_ingredients(cfg, ingredients)
    evaluations = read_evaluations(cfg, ingredients)
    return SoupInputs(ingredients, evaluations, reference, meta, model_components(reference, cfg.soup.granularity))


# ---- keys: the search memo's context and the soup's own key ---------------------------------

def split_names(cfg: Config) -> tuple[str, str, list[str]]:
    """(val, id_test, [ood, ...]): the names of ``scores.splits_to_score``, in its order."""
    val, id_test, *ood = splits_to_score(cfg)
    return val, id_test, ood


def memo_context(cfg: Config, components, val_name: str, probe: str | None = None) -> dict:
    """What a val accuracy depends on besides the mixture: the val split's content and scoring,
    the model, the component layout (names and tensors), the evaluator's precision and its
    batch size (a batch's logits may depend on how many images share it; how val is sharded
    never does: shards are whole batches); with ``probe``, the fingerprint of the evaluators'
    predictions on the probe mixtures (their hardware, pipeline/soup/probe.py)."""

    val = layout.splits(cfg)[val_name]
    return {"format": "frankensoup-search-memo-v1", "model": cfg.model.name, **({"probe": probe} if probe else {}),
            "ingredient_dtype": cfg.evaluate.ingredient_dtype, "batch_size": cfg.evaluate.batch_size,
            "components": [[c.name, sorted(c.params), sorted(getattr(c, "buffers", ()))] for c in components],
            "val": {"content": split_content(val.uri), "class_subset": val.class_subset, "class_map": val.class_map,
                    "objectnet_mappings": val.objectnet_mappings}}


def soup_key(cfg: Config, inputs: SoupInputs) -> str:
    """Everything the published result depends on: the memo context, the ingredients' contents,
    the scores that order them and fill the report, the soup settings, each enabled method's
    name, version and settings (a new or changed method changes the key; a disabled one's
    settings do not), the scored splits, the model card's metadata."""
    val, id_test, ood = split_names(cfg)
    splits = layout.splits(cfg)
    soup = {k: v for k, v in result_settings(cfg.soup).items() if k != "methods"}
    return digest({"context": memo_context(cfg, inputs.components, val),
                   "ingredients": [[i.id, i.sha256] for i in inputs.ingredients],
                   "scores": inputs.evaluations, "soup": soup, "methods": method_keys(cfg.soup),
                   "base": cfg.model.model_dump(mode="json"), "card": cfg.card.model_dump(mode="json"),
                   "splits": {s: [splits[s].role, split_content(splits[s].uri)] for s in (val, id_test, *ood)}})
