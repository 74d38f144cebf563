"""The soup's inputs: the usable ingredients (beta row order), their and the zero-shot head's
scores from the evaluate stage's memo, the reference classifier and its components (beta
column order); and the keys of what the soup computes from them: the search memo's context and
the soup's own key."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import layout, storage
from ..config import Config
from ..errors import UserError
from ..keys import digest, result_settings
from ..model import weights
from ..model.components import components as model_components


class SoupInputError(UserError, ValueError):
    """Inputs the soup cannot use (missing stage, unusable ingredient); the message names them."""


# ---- inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ingredient:
    id: str
    uri: str
    sha256: str


def usable_ingredients(registry: dict) -> list[Ingredient]:
    """The registry's ``ok`` ingredients, by id (the row order of every beta)."""
    from ..finetune.registry import usable

    rows = usable(registry)
    if not rows:
        raise SoupInputError("finetune/ingredients.json lists no ingredient with status 'ok': nothing to mix")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SoupInputError(f"finetune/ingredients.json repeats an ingredient id: {sorted(ids)}")
    return [Ingredient(r["id"], r["checkpoint_uri"], r["sha256"]) for r in sorted(rows, key=lambda r: r["id"])]


def read_evaluations(cfg: Config, ingredients: Sequence[Ingredient]) -> dict[str, dict[str, dict]]:
    """{model: {split: {"accuracy", "correct", "n", "role"}}} of the zero-shot head and every
    ingredient, looked up in the evaluate stage's memo by content key: a score of another
    checkpoint or another split content is never used."""
    from ..evaluate.scores import ScoreMemo, score_keys
    from ..evaluate.stage import ZERO_SHOT, splits_to_score
    from ..inputs import zero_shot_record

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


def _safetensors_header(data: bytes, uri: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        header = storage.safetensors_header(data)
        meta = header.pop("__metadata__", None) or {}
        return {k: tuple(v["shape"]) for k, v in header.items()}, meta
    except (ValueError, KeyError, TypeError) as e:
        raise SoupInputError(f"ingredient checkpoint {uri!r} is not a safetensors file: {e}") from None


def check_ingredient(ing: Ingredient, reference: dict[str, torch.Tensor], model_name: str,
                     class_names: list[str]) -> None:
    """Refuse, naming the ingredient and file, a checkpoint that is not the registered one or
    does not have the architecture and classes of the run's model."""
    data = storage.read_bytes(ing.uri)
    where = f"ingredient {ing.id!r} ({ing.uri})"
    if storage.sha256(data) != ing.sha256:
        raise SoupInputError(f"{where}: sha256 differs from finetune/ingredients.json "
                             "(the file changed after it was registered)")
    shapes, meta = _safetensors_header(data, ing.uri)
    if meta.get("model_name") not in (None, model_name):
        raise SoupInputError(f"{where} is a {meta['model_name']!r} model, this run mixes {model_name!r}")
    missing = sorted(set(reference) - set(shapes))
    extra = sorted(set(shapes) - set(reference))
    wrong = [k for k in reference if k in shapes and shapes[k] != tuple(reference[k].shape)]
    if missing or extra or wrong:
        if wrong:
            detail = f"{wrong[0]} has shape {shapes[wrong[0]]}, the model's is {tuple(reference[wrong[0]].shape)}"
        else:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise SoupInputError(f"{where} does not have the architecture of {model_name!r}: {detail}")
    if "class_names" in meta and json.loads(meta["class_names"]) != class_names:
        raise SoupInputError(f"{where} was trained for other classes than this run's")
    from safetensors.torch import load

    try:
        weights.check_finite(load(data), where)
    except ValueError as e:
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
    from ..finetune.registry import read_registry
    from ..inputs import load_zero_shot

    ingredients = usable_ingredients(read_registry(cfg))
    reference, meta = load_zero_shot(cfg)
    ref_state = reference.state_dict()
    for ing in ingredients:
        check_ingredient(ing, ref_state, meta["model_name"], list(meta["class_names"]))
    evaluations = read_evaluations(cfg, ingredients)
    return SoupInputs(ingredients, evaluations, reference, meta, model_components(reference, cfg.soup.granularity))


# ---- keys: the search memo's context and the soup's own key ---------------------------------

def split_names(cfg: Config) -> tuple[str, str, list[str]]:
    val, _ = layout.split_of_role(cfg, "val")
    id_test, _ = layout.split_of_role(cfg, "id_test")
    return val, id_test, list(layout.ood_splits(cfg))


def memo_context(cfg: Config, components, val_name: str) -> dict:
    """What a val accuracy depends on besides the mixture: the val split's content and scoring,
    the model, the component layout (names and tensors) and the evaluator's precision."""
    from ..data.shards import split_content

    val = layout.splits(cfg)[val_name]
    return {"format": "frankensoup-search-memo-v1", "model": cfg.model.name,
            "ingredient_dtype": cfg.evaluate.ingredient_dtype,
            "components": [[c.name, sorted(c.params), sorted(getattr(c, "buffers", ()))] for c in components],
            "val": {"content": split_content(val.uri), "class_subset": val.class_subset, "class_map": val.class_map,
                    "objectnet_mappings": val.objectnet_mappings}}


def soup_key(cfg: Config, inputs: SoupInputs) -> str:
    """Everything the published result depends on: the memo context, the ingredients' contents,
    the scores that order them and fill the report, the soup settings, the scored splits."""
    from ..data.shards import split_content

    val, id_test, ood = split_names(cfg)
    splits = layout.splits(cfg)
    return digest({"context": memo_context(cfg, inputs.components, val),
                   "ingredients": [[i.id, i.sha256] for i in inputs.ingredients],
                   "scores": inputs.evaluations, "soup": result_settings(cfg.soup),
                   "base": cfg.model.model_dump(mode="json"),
                   "splits": {s: [splits[s].role, split_content(splits[s].uri)] for s in (val, id_test, *ood)}})
