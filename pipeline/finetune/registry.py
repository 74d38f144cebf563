"""The ingredient registry (finetune/ingredients.json, see docs/outputs.md) and bringing your
own ingredients: existing checkpoints, including the 72 public model-soups ViT-B/32 ones."""
from __future__ import annotations

import re
import time
import warnings

from .. import layout, storage
from ..config import Config
from ..errors import UserError
from ..model import CheckpointError, classifier_from_state, read_checkpoint, save_classifier
from ..model.weights import FORMAT, check_finite, decode_metadata

ROW_KEYS = ("id", "hparams", "val_acc", "checkpoint_uri", "sha256", "status", "source")
LAYOUTS = ("auto", "frankensoup", "model-soups")


class RegistryError(UserError, ValueError):
    """A missing or malformed ingredient registry; the message names its URI."""


# ---- the registry file ---------------------------------------------------------------------

def check_registry(registry, where: str) -> dict:
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
    uri = layout.registry_uri(cfg)
    check_registry(registry, uri)
    stored = {**registry, "ingredients": [
        {**{k: v for k, v in row.items() if k != "checkpoint_uri"},
         "checkpoint": layout.relative(cfg, row["checkpoint_uri"])} for row in registry["ingredients"]]}
    storage.write_json(uri, stored)


def registry_key(registry: dict) -> str:
    """What later stages read of the registry: the usable ingredients' ids and contents."""
    from ..keys import digest

    return digest({"model_name": registry["model_name"], "class_names": registry["class_names"],
                   "ingredients": [[r["id"], r["sha256"]] for r in usable(registry)]})


def usable(registry: dict) -> list[dict]:
    """The rows later stages use."""
    return [r for r in registry["ingredients"] if r["status"] == "ok"]


# ---- publishing: marker gone first, registry and marker last -------------------------------

def begin_publish(cfg: Config) -> None:
    """From here until the marker is rewritten the stage reads as not done."""
    layout.clear_done(cfg, "finetune")


def finish_publish(cfg: Config, rows: list[dict], model_name: str, class_names: list[str]) -> dict:
    """Remove ingredient files no row names, then write the registry."""
    keep = {storage.resolve(r["checkpoint_uri"]).path for r in rows if r.get("checkpoint_uri")}
    folder = storage.join(layout.stage_dir(cfg, "finetune"), "ingredients")
    for name in storage.listdir(folder):
        uri = storage.join(folder, name)
        if name.endswith(".safetensors") and storage.resolve(uri).path not in keep:
            storage.delete(uri)
    registry = {"model_name": model_name, "class_names": list(class_names), "ingredients": rows}
    write_registry(cfg, registry)
    return registry


def zero_shot_metadata(cfg: Config) -> dict:
    """The run's architecture, class names and preprocess, from prepare's zero-shot checkpoint
    (its header only)."""
    uri = layout.zeroshot_uri(cfg)
    try:
        raw = storage.read_safetensors_header(uri).get("__metadata__") or {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the zero-shot checkpoint {uri!r}: {e}") from e
    return decode_metadata(raw, uri)


# ---- key layouts ---------------------------------------------------------------------------

def detect_layout(tensors: dict, raw_meta: dict, uri: str) -> str:
    if raw_meta.get("format") == FORMAT or ("head.weight" in tensors and any(k.startswith("visual.") for k in tensors)):
        return "frankensoup"
    if "classification_head.weight" in tensors and any(k.startswith("model.visual.") for k in tensors):
        return "model-soups"
    raise CheckpointError(f"{uri!r}: neither a frankensoup classifier (visual.*, head.*) nor a "
                          f"model-soups checkpoint (model.visual.*, classification_head.*); "
                          f"first keys: {sorted(tensors)[:4]}")


def from_model_soups(tensors: dict) -> dict:
    """model-soups `ModelWrapper` keys -> ours: model.visual.* -> visual.*,
    classification_head.* -> head.*. Its other model.* keys are the text tower's leftovers
    (token_embedding, ln_final, ...), which the classifier never uses."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("model.visual."):
            out[key[len("model."):]] = value
        elif key.startswith("classification_head."):
            out["head." + key[len("classification_head."):]] = value
        elif not key.startswith("model."):
            out[key] = value  # unknown: the strict load names it
    return out


def to_classifier_state(tensors: dict, raw_meta: dict, layout_name: str, uri: str) -> dict:
    if layout_name not in LAYOUTS:
        raise ValueError(f"layout {layout_name!r}: expected one of {LAYOUTS}")
    if layout_name == "auto":
        layout_name = detect_layout(tensors, raw_meta, uri)
    return from_model_soups(tensors) if layout_name == "model-soups" else dict(tensors)


def check_metadata(raw_meta: dict, meta: dict, uri: str) -> None:
    """A frankensoup checkpoint must be for this run's classes."""
    if raw_meta.get("format") != FORMAT:
        return
    theirs = decode_metadata(raw_meta, uri)
    if theirs["class_names"] != meta["class_names"]:
        raise CheckpointError(f"{uri!r} was trained for other classes ({theirs['class_names'][:5]}...) "
                              f"than this run's ({meta['class_names'][:5]}...)")


def check_fits(uri: str, layout_name: str, meta: dict) -> None:
    """CheckpointError naming the file unless it maps onto the run's architecture and classes.
    Names and shapes only: the skeleton lives on the meta device, so nothing is initialised."""
    import torch

    from ..model import init_classifier
    from ..model.weights import load_state_strict

    tensors, raw = read_checkpoint(uri)
    check_metadata(raw, meta, uri)
    state = to_classifier_state(tensors, raw, layout_name, uri)
    check_finite(state, uri)
    with torch.device("meta"):
        skeleton = init_classifier(meta["model_name"], len(meta["class_names"]), meta.get("model_cfg"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        load_state_strict(skeleton, state, uri)


def load_foreign(uri: str, layout_name: str, meta: dict):
    """A checkpoint file -> (Classifier of the run's architecture, its own metadata);
    CheckpointError naming the file when it does not fit."""
    tensors, raw = read_checkpoint(uri)
    check_metadata(raw, meta, uri)
    state = to_classifier_state(tensors, raw, layout_name, uri)
    clf = classifier_from_state(meta["model_name"], state, len(meta["class_names"]), source=uri,
                                model_cfg=meta.get("model_cfg"))
    return clf, raw


def ingredient_ids(files: list[str]) -> list[str]:
    """Ids from file names (model_3.pt -> model_3), made unique in order."""
    ids, seen = [], {}
    for f in files:
        stem = re.sub(r"\.(safetensors|pt|pth|bin)$", "", f.rstrip("/").rsplit("/", 1)[-1], flags=re.I)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "ingredient"
        seen[stem] = seen.get(stem, 0) + 1
        ids.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return ids


def val_set(cfg: Config, preprocess: dict):
    """(images uint8, labels, mean, std) of the run's val split, decoded once."""
    from .trainable import decode_uint8, mean_std

    _, val = layout.split_of_role(cfg, "val")
    images, labels = decode_uint8(val.uri, preprocess)
    return (images, labels, *mean_std(preprocess))


def import_ingredients(cfg: Config, files: list[str], layout: str = "auto", replace: bool = False,
                       log=print) -> dict:
    """Add existing checkpoints to the registry (source "import"); with ``replace``, drop every
    registered ingredient first. Every file is checked (architecture, classes, finite weights)
    before anything is written; a file whose content is already registered (same sha256) is
    not added twice. Each gets its val accuracy and is copied to finetune/ingredients/."""
    from .trainable import device_of, evaluate
    from .. import layout as layout_mod
    from ..inputs import zero_shot_record

    if not files:
        raise RegistryError("import-ingredients: no files given")
    try:
        zero_shot_record(cfg)
    except UserError:
        raise RegistryError(f"import-ingredients needs a finished prepare stage under {cfg.output_uri!r} "
                            f"(class names, preprocess and the val split): run `frankensoup prepare` first") from None
    t0 = time.time()
    meta = zero_shot_metadata(cfg)
    contents = {}
    for uri in files:  # check all before writing any: a bad file leaves the output untouched
        check_fits(uri, layout, meta)
        contents[uri] = storage.sha256(storage.read_bytes(uri))
    old = read_registry(cfg) if storage.exists(layout_mod.registry_uri(cfg)) else None
    rows = [] if (replace or old is None) else list(old["ingredients"])
    if replace and old is not None:
        log(f"import-ingredients: --replace: dropped {len(old['ingredients'])} registered ingredients")
    known = {r.get("source_sha256") or r["sha256"]: r["id"] for r in rows}
    taken = {r["id"] for r in rows}
    images, labels, mean, std = val_set(cfg, meta["preprocess"])
    added = 0
    for uri, iid in zip(files, ingredient_ids(files)):
        if contents[uri] in known:
            log(f"import-ingredients: {uri} is already registered as {known[contents[uri]]!r}, not added again")
            continue
        base, n = iid, 1
        while iid in taken:
            n += 1
            iid = f"{base}-{n}"
        clf, raw = load_foreign(uri, layout, meta)
        acc = evaluate(clf.to(device_of()), images, labels, mean, std)["val_acc"]
        hparams = decode_metadata(raw, uri).get("hparams", {}) if raw.get("format") == FORMAT else {}
        dest = layout_mod.ingredient_uri(cfg, iid)
        data = save_classifier(dest, clf.cpu(), model_name=meta["model_name"], class_names=meta["class_names"],
                               preprocess=meta["preprocess"], extra={"source": "import", "source_file": uri})
        rows.append({"id": iid, "hparams": hparams, "val_acc": acc, "checkpoint_uri": dest,
                     "sha256": storage.sha256(data), "status": "ok", "source": "import", "source_file": uri,
                     "source_sha256": contents[uri]})
        known[contents[uri]] = iid
        taken.add(iid)
        added += 1
        log(f"import-ingredients: {iid:<16} val_acc={acc:.4f}  <- {uri}")
    registry = finish_publish(cfg, rows, meta["model_name"], meta["class_names"])
    log(f"import-ingredients: added {added}, {len(rows)} registered at {layout_mod.registry_uri(cfg)} "
        f"({time.time() - t0:.1f}s); the next `run` evaluates what is new and redoes the soup")
    return registry
