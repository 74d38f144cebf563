"""Ingredients: the typed rows of the registry (finetune/ingredients.json, see docs/outputs.md),
reading and writing the registry, and the one check of an ingredient's checkpoint against its
row and the run's model. The finetune, evaluate and soup stages and the dry run all use it, so
an ingredient is valid or not in the same way everywhere."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from . import layout, storage
from .config import Config
from .errors import UserError
from .keys import digest
from .model.weights import CheckpointError, check_finite, decode_metadata

# what every registry row holds (docs/outputs.md); Ingredient's other fields are optional
ROW_KEYS = ("id", "hparams", "val_acc", "checkpoint_uri", "sha256", "status", "source")
_STRINGS = ("id", "checkpoint_uri", "sha256", "status", "source")


class RegistryError(UserError, ValueError):
    """A missing or malformed ingredient registry; the message names its URI."""


class IngredientError(CheckpointError):
    """A checkpoint that is not its registered file or does not fit the run's model; the message
    names the ingredient and its file in one line."""


@dataclass(frozen=True)
class Ingredient:
    """One registry row, with its checkpoint as a URI (the file stores it relative to
    output_uri as ``checkpoint``). ``key``, ``trial_id``, ``node_id``, ``placement`` (device,
    CPUs, GPUs and GPU ids the trial had), ``restored_from_epoch`` and ``val_content`` come with
    sweep rows, ``source_file`` and ``source_sha256`` with imports."""
    id: str
    status: str
    checkpoint_uri: str
    sha256: str
    source: str
    hparams: dict = field(default_factory=dict, hash=False)
    val_acc: float | None = None
    key: str | None = None
    trial_id: str | None = None
    node_id: str | None = None
    placement: dict | None = field(default=None, hash=False)
    restored_from_epoch: int | None = None
    val_content: str | None = None
    source_file: str | None = None
    source_sha256: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Ingredient:
        """The typed view of a registry row (keys it does not know stay in the row only)."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    @property
    def uri(self) -> str:
        """The checkpoint's URI (``checkpoint_uri``; the soup's shorter name)."""
        return self.checkpoint_uri

    @property
    def ok(self) -> bool:
        """Whether later stages use it."""
        return self.status == "ok"

    @property
    def content(self) -> str:
        """What an import compares to not register a file twice: the imported file's sha256."""
        return self.source_sha256 or self.sha256

    @property
    def label(self) -> str:
        """How messages name it: its id and file."""
        return f"ingredient {self.id!r} ({self.checkpoint_uri!r})"


# ---- the registry file ---------------------------------------------------------------------

def check_registry(registry: Any, where: str) -> dict:
    """``registry`` unchanged if it is a registry: model_name, class_names, rows with every
    ROW_KEYS key (string ids, URIs, sha256, status, source) and unique ids; else RegistryError."""
    if not isinstance(registry, dict):
        raise RegistryError(f"{where}: the registry must be a JSON object")
    missing = [k for k in ("model_name", "class_names", "ingredients") if k not in registry]
    if missing:
        raise RegistryError(f"{where}: registry lacks {missing}")
    if not isinstance(registry["ingredients"], list):
        raise RegistryError(f"{where}: 'ingredients' must be a list")
    ids = []
    for i, row in enumerate(registry["ingredients"]):
        lacking = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if lacking:
            raise RegistryError(f"{where}: ingredient {i} lacks {lacking}")
        not_str = [k for k in _STRINGS if not isinstance(row[k], str)]
        if not_str:
            raise RegistryError(f"{where}: ingredient {i}: {not_str} must be strings")
        ids.append(row["id"])
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RegistryError(f"{where}: duplicate ingredient ids {dupes}")
    return registry


def read_registry(cfg: Config) -> dict:
    """finetune/ingredients.json with every row's ``checkpoint_uri`` resolved: rows store their
    checkpoint relative to output_uri, so a moved or copied output folder still resolves."""
    uri = layout.registry_uri(cfg)
    if not storage.exists(uri):
        raise RegistryError(f"no ingredient registry at {uri!r}: run `frankensoup finetune` "
                            f"or `frankensoup import-ingredients` first")
    registry = storage.read_json(uri)
    for row in registry.get("ingredients", []) if isinstance(registry, dict) else []:
        if isinstance(row, dict) and "checkpoint" in row:
            row["checkpoint_uri"] = layout.absolute(cfg, row.pop("checkpoint"))
    return check_registry(registry, uri)


def write_registry(cfg: Config, registry: dict) -> None:
    """Write ``registry`` (rows as read_registry gives them), each checkpoint stored relative
    to output_uri."""
    uri = layout.registry_uri(cfg)
    check_registry(registry, uri)
    stored = {**registry, "ingredients": [
        {**{k: v for k, v in row.items() if k != "checkpoint_uri"},
         "checkpoint": layout.relative(cfg, row["checkpoint_uri"])} for row in registry["ingredients"]]}
    storage.write_json(uri, stored)


def ingredients(registry: dict) -> list[Ingredient]:
    """Every row, typed, in registry order."""
    return [Ingredient.from_row(r) for r in registry["ingredients"]]


def usable(registry: dict) -> list[Ingredient]:
    """The ingredients later stages use (status ``ok``), in registry order."""
    return [i for i in ingredients(registry) if i.ok]


def registry_key(registry: dict) -> str:
    """What later stages read of the registry: the usable ingredients' ids and contents."""
    return digest({"model_name": registry["model_name"], "class_names": registry["class_names"],
                   "ingredients": [[i.id, i.sha256] for i in usable(registry)]})


# ---- the run's model and the one check of a checkpoint ---------------------------------------

@dataclass(frozen=True)
class RunModel:
    """What every ingredient of a run must match: prepare's zero-shot classifier's model name,
    classes, preprocess, architecture config and tensor names and shapes."""
    model_name: str
    class_names: list[str]
    preprocess: dict
    model_cfg: dict | None
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of_run(cls, cfg: Config) -> RunModel:
        """From prepare's zero-shot checkpoint, reading only its header."""
        uri = layout.zeroshot_uri(cfg)
        try:
            header = dict(storage.read_safetensors_header(uri))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the zero-shot checkpoint {uri!r}: {e}") from e
        meta = decode_metadata(dict(header.pop("__metadata__", None) or {}), uri)
        return cls(meta["model_name"], list(meta["class_names"]), meta["preprocess"], meta.get("model_cfg"),
                   {k: tuple(v["shape"]) for k, v in header.items()})


def _architecture_problems(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in shapes.items()
             if k in state and tuple(state[k].shape) != shape]
    return [f"{label} (first: {', '.join(keys[:3])})" for label, keys in
            [(f"{len(missing)} missing", missing), (f"{len(unexpected)} unexpected", unexpected),
             (f"{len(wrong)} with the wrong shape", wrong)] if keys]


def check_content(state: Mapping[str, torch.Tensor], raw_meta: Mapping[str, str], run: RunModel, where: str) -> None:
    """IngredientError naming ``where`` unless the tensors fit the run's model: the model name
    and classes the (raw string) metadata states, if it states them, are the run's; the tensor
    names and shapes are the run's architecture; every weight is finite. What a registered
    ingredient and a file being imported are both checked for."""
    stated = raw_meta.get("model_name")
    if stated is not None and stated != run.model_name:
        raise IngredientError(f"{where} is a {stated!r} model, this run's is {run.model_name!r}")
    problems = _architecture_problems(state, run.shapes)
    if problems:
        raise IngredientError(f"{where} does not have the architecture of {run.model_name!r}: " + "; ".join(problems))
    if "class_names" in raw_meta:
        try:
            theirs = json.loads(raw_meta["class_names"])
        except json.JSONDecodeError:
            theirs = raw_meta["class_names"]
        if theirs != run.class_names:
            raise IngredientError(f"{where} was trained for other classes ({theirs[:5]}...) "
                                  f"than this run's ({run.class_names[:5]}...)")
    try:
        check_finite(state, where)
    except CheckpointError as e:
        raise IngredientError(str(e)) from None


def verify(ingredient: Ingredient, data: bytes, run: RunModel) -> dict[str, torch.Tensor]:
    """The tensors of ``data``, the bytes of ``ingredient``'s checkpoint, once they are shown to
    be its registered file and to fit the run's model: same sha256, a safetensors file of our
    format, the run's model name, architecture, classes and preprocess, finite weights. Works
    from bytes already read, so a Ray worker reading the file checks it without a second read.
    IngredientError naming the ingredient and its file otherwise."""
    where = ingredient.label
    if storage.sha256(data) != ingredient.sha256:
        raise IngredientError(f"{where}: sha256 differs from the registered one "
                              "(the file changed after it was registered)")
    try:
        raw = dict(storage.safetensors_header(data).get("__metadata__") or {})
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own types; one message naming the file
        raise IngredientError(f"{where} is not a safetensors file: {e}") from None
    try:
        meta = decode_metadata(raw, ingredient.checkpoint_uri)
    except CheckpointError as e:
        raise IngredientError(f"ingredient {ingredient.id!r}: {e}") from None
    check_content(tensors, raw, run, where)
    if meta["preprocess"] != run.preprocess:
        raise IngredientError(f"{where} has another preprocess than the run's model "
                              f"({meta['preprocess']} != {run.preprocess})")
    return tensors
