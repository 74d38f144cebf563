"""The finetune stage's side of the ingredient registry (pipeline/ingredients.py): publishing it,
and bringing your own ingredients: existing checkpoints, including the 72 public model-soups
ViT-B/32 ones."""
from __future__ import annotations

import re
import time

from .. import layout, storage
from ..data import shards
from ..config import Config
from ..errors import UserError
from ..ingredients import Ingredient, RegistryError, RunModel, check_content, read_registry, write_registry
from ..model import CheckpointError, classifier_from_state, read_checkpoint, save_classifier
from ..model.weights import FORMAT, decode_metadata

LAYOUTS = ("auto", "frankensoup", "model-soups")


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
            out[key] = value  # unknown: the architecture check names it
    return out


def to_classifier_state(tensors: dict, raw_meta: dict, layout_name: str, uri: str) -> dict:
    if layout_name not in LAYOUTS:
        raise ValueError(f"layout {layout_name!r}: expected one of {LAYOUTS}")
    if layout_name == "auto":
        layout_name = detect_layout(tensors, raw_meta, uri)
    return from_model_soups(tensors) if layout_name == "model-soups" else dict(tensors)


def checked_state(uri: str, layout_name: str, run: RunModel) -> tuple[dict, dict]:
    """(classifier state dict, hparams) of a file to import, mapped from its key layout and
    checked against the run's model like every ingredient (`check_content`; the model name and
    classes only of a frankensoup checkpoint, which also gives its hparams); CheckpointError
    naming the file otherwise."""
    tensors, raw = read_checkpoint(uri)
    state = to_classifier_state(tensors, raw, layout_name, uri)
    ours = raw.get("format") == FORMAT
    hparams = decode_metadata(raw, uri).get("hparams", {}) if ours else {}
    check_content(state, raw if ours else {}, run, f"checkpoint {uri!r}")
    return state, hparams


def load_foreign(uri: str, layout_name: str, run: RunModel):
    """A checkpoint file -> (Classifier of the run's architecture, its hparams)."""
    state, hparams = checked_state(uri, layout_name, run)
    clf = classifier_from_state(run.model_name, state, len(run.class_names), source=uri, model_cfg=run.model_cfg)
    return clf, hparams


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


def val_leak_warning(cfg: Config) -> str | None:
    """One line when the run's val split is a random holdout drawn by import-images: ingredients
    trained elsewhere (model soups' were, on ImageNet minus their own fixed 2 %) have most likely
    trained on its images, so val would rank overfit ingredients first."""
    name, val = layout.split_of_role(cfg, "val")
    held = shards.split_info(val.uri).get("holdout") or {}
    if held.get("method") != "random":
        return None
    return (f"import-ingredients: warning: val split {name!r} ({val.uri}) is a random {held.get('fraction')} holdout "
            f"drawn by import-images, not the split these ingredients held out: they may have trained on its images; "
            f"import val with --holdout-indices (model soups': imagenet_98_idxs.npy)")


def import_ingredients(cfg: Config, files: list[str], layout: str = "auto", replace: bool = False,
                       log=print) -> dict:
    """Add existing checkpoints to the registry (source "import"); with ``replace``, drop every
    registered ingredient first. Every file is checked (architecture, classes, finite weights)
    before anything is written; a file whose content is already registered (same sha256) is
    not added twice. Each gets its val accuracy and is copied to finetune/ingredients/."""
    from .trainable import device_of, evaluate
    from .. import layout as layout_mod
    from ..prepared import zero_shot_record

    if not files:
        raise RegistryError("import-ingredients: no files given")
    try:
        zero_shot_record(cfg)
    except UserError:
        raise RegistryError(f"import-ingredients needs a finished prepare stage under {cfg.output_uri!r} "
                            f"(class names, preprocess and the val split): run `frankensoup prepare` first") from None
    t0 = time.time()
    leak = val_leak_warning(cfg)
    if leak:
        log(leak)
    run = RunModel.of_run(cfg)
    contents = {}
    for uri in files:  # check all before writing any: a bad file leaves the output untouched
        checked_state(uri, layout, run)
        contents[uri] = storage.sha256(storage.read_bytes(uri))
    old = read_registry(cfg) if storage.exists(layout_mod.registry_uri(cfg)) else None
    rows = [] if (replace or old is None) else list(old["ingredients"])
    if replace and old is not None:
        log(f"import-ingredients: --replace: dropped {len(old['ingredients'])} registered ingredients")
    known = {i.content: i.id for i in map(Ingredient.from_row, rows)}
    taken = {r["id"] for r in rows}
    images, labels, mean, std = val_set(cfg, run.preprocess)
    added = 0
    for uri, iid in zip(files, ingredient_ids(files)):
        if contents[uri] in known:
            log(f"import-ingredients: {uri} is already registered as {known[contents[uri]]!r}, not added again")
            continue
        base, n = iid, 1
        while iid in taken:
            n += 1
            iid = f"{base}-{n}"
        clf, hparams = load_foreign(uri, layout, run)
        acc = evaluate(clf.to(device_of()), images, labels, mean, std)["val_acc"]
        dest = layout_mod.ingredient_uri(cfg, iid)
        data = save_classifier(dest, clf.cpu(), model_name=run.model_name, class_names=run.class_names,
                               preprocess=run.preprocess, extra={"source": "import", "source_file": uri})
        rows.append({"id": iid, "hparams": hparams, "val_acc": acc, "checkpoint_uri": dest,
                     "sha256": storage.sha256(data), "status": "ok", "source": "import", "source_file": uri,
                     "source_sha256": contents[uri]})
        known[contents[uri]] = iid
        taken.add(iid)
        added += 1
        log(f"import-ingredients: {iid:<16} val_acc={acc:.4f}  <- {uri}")
    registry = finish_publish(cfg, rows, run.model_name, run.class_names)
    log(f"import-ingredients: added {added}, {len(rows)} registered at {layout_mod.registry_uri(cfg)} "
        f"({time.time() - t0:.1f}s); the next `run` evaluates what is new and redoes the soup")
    return registry
