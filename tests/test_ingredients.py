"""pipeline/ingredients.py: the registry round trip, and verify's refusal of each way a
checkpoint can fail its registry row or the run's model, on small real checkpoints (no Ray,
no prepare: a random classifier of the demo architecture stands in for the zero-shot head)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from pipeline import layout, storage
from pipeline.errors import UserError
from pipeline.ingredients import (Ingredient, IngredientError, RegistryError, RunModel, check_content,
                                  read_registry, registry_key, usable, verify, write_registry)
from pipeline.keys import digest
from pipeline.model import CheckpointError, init_classifier, model_config, save_classifier

CLASSES = ["cat", "dog", "emu"]
PREPROCESS = {"size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture
def run(tmp_path):
    """(cfg, RunModel, the zero-shot classifier's state) of a run whose prepare wrote only its
    zero-shot checkpoint."""
    cfg = tiny_config(str(tmp_path / "out"))
    torch.manual_seed(0)
    clf = init_classifier(cfg.model.name, len(CLASSES))
    save_classifier(layout.zeroshot_uri(cfg), clf, model_name=cfg.model.name, class_names=CLASSES,
                    preprocess=PREPROCESS)
    return cfg, RunModel.of_run(cfg), clf.state_dict()


def registered(cfg, iid: str, data: bytes) -> tuple[Ingredient, bytes]:
    """An ingredient whose checkpoint is ``data``, registered with its sha256."""
    uri = layout.ingredient_uri(cfg, iid)
    storage.write_bytes(uri, data)
    return Ingredient(iid, "ok", uri, storage.sha256(data), "tune"), data


def saved(cfg, iid: str, state: dict, *, class_names=CLASSES, preprocess=PREPROCESS, model_cfg=None) -> tuple:
    """An ingredient saved like finetune saves one, from ``state``."""
    clf = init_classifier(cfg.model.name, len(class_names), model_cfg)
    clf.load_state_dict(state)
    uri = layout.ingredient_uri(cfg, iid)
    data = save_classifier(uri, clf, model_name=cfg.model.name, class_names=class_names, preprocess=preprocess)
    return Ingredient(iid, "ok", uri, storage.sha256(data), "tune"), data


def refusal(ingredient: Ingredient, data: bytes, run_model: RunModel) -> str:
    """verify's message, checked to name the ingredient and its file in one line."""
    with pytest.raises(IngredientError) as e:
        verify(ingredient, data, run_model)
    message = str(e.value)
    assert repr(ingredient.id) in message and ingredient.checkpoint_uri in message and "\n" not in message
    return message


# ---- verify -----------------------------------------------------------------------------------

def test_a_registered_checkpoint_of_the_run_model_passes_and_gives_its_tensors(run):
    cfg, run_model, state = run
    moved = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    ing, data = saved(cfg, "ft-000", moved)
    tensors = verify(ing, data, run_model)
    assert tensors.keys() == state.keys()
    assert all(torch.equal(tensors[k], moved[k]) for k in moved)
    assert run_model.model_name == cfg.model.name and run_model.class_names == CLASSES
    assert run_model.shapes == {k: tuple(v.shape) for k, v in state.items()}


def test_other_bytes_than_the_registered_ones_are_refused(run):
    cfg, run_model, state = run
    ing, data = saved(cfg, "ft-000", state)
    other = Ingredient(ing.id, "ok", ing.checkpoint_uri, "0" * 64, "tune")
    assert "sha256 differs" in refusal(other, data, run_model)


def test_a_file_that_is_not_safetensors_is_refused(run):
    cfg, run_model, _ = run
    ing, data = registered(cfg, "ft-000", b"\x10\x00\x00\x00\x00\x00\x00\x00not json, not tensors")
    assert "is not a safetensors file" in refusal(ing, data, run_model)


def test_a_bare_state_dict_without_our_metadata_is_refused(run):
    cfg, run_model, state = run
    ing, data = registered(cfg, "ft-000", storage.save_tensors(str(cfg.output_uri) + "/x.safetensors", state))
    assert "is not a frankensoup-classifier-v1 checkpoint" in refusal(ing, data, run_model)


def test_another_model_name_is_refused(run):
    cfg, run_model, state = run
    _, data = saved(cfg, "ft-000", state)
    raw = storage.safetensors_header(data)["__metadata__"]
    ing, data = registered(cfg, "ft-001", storage.save_tensors(str(cfg.output_uri) + "/x.safetensors", state,
                                                               {**raw, "model_name": "ViT-B-32"}))
    assert f"is a 'ViT-B-32' model, this run's is '{cfg.model.name}'" in refusal(ing, data, run_model)


def test_another_architecture_is_refused_naming_the_tensors(run):
    cfg, run_model, state = run
    narrow = model_config(cfg.model.name)
    narrow = {**narrow, "vision_cfg": {**narrow["vision_cfg"], "width": 32}}
    ing, data = saved(cfg, "ft-odd", init_classifier(cfg.model.name, len(CLASSES), narrow).state_dict(),
                      model_cfg=narrow)
    message = refusal(ing, data, run_model)
    assert f"does not have the architecture of '{cfg.model.name}'" in message and "with the wrong shape" in message

    meta = storage.safetensors_header(saved(cfg, "ft-000", state)[1])["__metadata__"]
    cut = storage.save_tensors(str(cfg.output_uri) + "/x.safetensors",
                               {k: v for k, v in state.items() if k != "head.bias"}, meta)
    ing, data = registered(cfg, "ft-cut", cut)
    assert "1 missing (first: head.bias)" in refusal(ing, data, run_model)


def test_other_classes_are_refused(run):
    cfg, run_model, state = run
    ing, data = saved(cfg, "ft-000", state, class_names=["emu", "dog", "cat"])
    assert "was trained for other classes" in refusal(ing, data, run_model)


def test_another_preprocess_is_refused(run):
    cfg, run_model, state = run
    ing, data = saved(cfg, "ft-000", state, preprocess={**PREPROCESS, "size": 32})
    assert "has another preprocess than the run's model" in refusal(ing, data, run_model)


def test_nan_weights_are_refused_naming_the_tensor(run):
    cfg, run_model, state = run
    ing, data = saved(cfg, "ft-000", {**state, "head.bias": torch.tensor([0.0, float("nan"), 0.0])})
    assert "tensor 'head.bias' holds NaN or inf" in refusal(ing, data, run_model)


def test_refusals_are_checkpoint_and_user_errors(run):
    cfg, run_model, state = run
    ing, data = saved(cfg, "ft-000", state)
    with pytest.raises(CheckpointError):
        verify(Ingredient(ing.id, "ok", ing.checkpoint_uri, "", "tune"), data, run_model)
    assert issubclass(IngredientError, UserError)


def test_an_import_is_checked_like_an_ingredient_but_only_a_stated_model_name_and_classes(run):
    _, run_model, state = run
    check_content(state, {}, run_model, "checkpoint 'plain.pt'")  # no metadata: architecture and weights only
    with pytest.raises(IngredientError, match=r"checkpoint 'plain\.pt' was trained for other classes"):
        check_content(state, {"class_names": json.dumps(["a", "b", "c"])}, run_model, "checkpoint 'plain.pt'")
    with pytest.raises(IngredientError, match=r"checkpoint 'plain\.pt' does not have the architecture.*unexpected"):
        check_content({**state, "model.token_embedding": torch.zeros(2)}, {}, run_model, "checkpoint 'plain.pt'")


def test_the_run_model_needs_the_zero_shot_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read the zero-shot checkpoint"):
        RunModel.of_run(tiny_config(str(tmp_path / "empty")))


# ---- the registry -----------------------------------------------------------------------------

def rows(cfg) -> list[dict]:
    tune = {"id": "ft-000", "hparams": {"lr": 1e-5}, "val_acc": 0.5, "checkpoint_uri": layout.ingredient_uri(cfg, "ft-000"),
            "sha256": "a" * 64, "status": "ok", "source": "tune", "key": "k0", "node_id": None, "trial_id": "t0",
            "restored_from_epoch": 0, "val_content": "v"}
    failed = {**tune, "id": "ft-001", "status": "failed", "checkpoint_uri": layout.ingredient_uri(cfg, "ft-001")}
    imported = {"id": "mine", "hparams": {}, "val_acc": 0.25, "checkpoint_uri": "/elsewhere/mine.safetensors",
                "sha256": "b" * 64, "status": "ok", "source": "import", "source_file": "/src/mine.pt",
                "source_sha256": "c" * 64, "note": "kept"}
    return [tune, failed, imported]


def test_the_registry_round_trips_with_checkpoints_relative_to_the_output(tmp_path):
    cfg = tiny_config(str(tmp_path / "out"))
    registry = {"model_name": cfg.model.name, "class_names": CLASSES, "ingredients": rows(cfg)}
    write_registry(cfg, registry)
    stored = storage.read_json(layout.registry_uri(cfg))["ingredients"]
    assert [r["checkpoint"] for r in stored] == ["finetune/ingredients/ft-000.safetensors",
                                                 "finetune/ingredients/ft-001.safetensors", "/elsewhere/mine.safetensors"]
    assert not any("checkpoint_uri" in r for r in stored)
    assert read_registry(cfg) == registry

    ok = usable(read_registry(cfg))
    assert [i.id for i in ok] == ["ft-000", "mine"]
    assert ok[0] == Ingredient("ft-000", "ok", layout.ingredient_uri(cfg, "ft-000"), "a" * 64, "tune", {"lr": 1e-5},
                               0.5, key="k0", trial_id="t0", restored_from_epoch=0, val_content="v")
    assert (ok[0].content, ok[1].content) == ("a" * 64, "c" * 64)
    assert registry_key(registry) == digest({"model_name": cfg.model.name, "class_names": CLASSES,
                                             "ingredients": [["ft-000", "a" * 64], ["mine", "b" * 64]]})


def test_a_moved_output_folder_resolves_its_checkpoints(tmp_path):
    import shutil

    cfg = tiny_config(str(tmp_path / "out"))
    write_registry(cfg, {"model_name": cfg.model.name, "class_names": CLASSES, "ingredients": rows(cfg)})
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    moved = tiny_config(str(tmp_path / "moved"))
    assert usable(read_registry(moved))[0].checkpoint_uri == layout.ingredient_uri(moved, "ft-000")


@pytest.mark.parametrize("change, match", [
    (lambda r: r[1].pop("sha256"), r"ingredient 1 lacks \['sha256'\]"),
    (lambda r: r[2].update(id="ft-000"), r"duplicate ingredient ids \['ft-000'\]"),
    (lambda r: r[0].update(sha256=None), r"ingredient 0: \['sha256'\] must be strings"),
])
def test_a_malformed_registry_is_refused_naming_it(tmp_path, change, match):
    cfg = tiny_config(str(tmp_path / "out"))
    bad = rows(cfg)
    change(bad)
    with pytest.raises(RegistryError, match=match):
        write_registry(cfg, {"model_name": cfg.model.name, "class_names": CLASSES, "ingredients": bad})
    assert not storage.exists(layout.registry_uri(cfg))
    storage.write_json(layout.registry_uri(cfg), {"model_name": "m", "class_names": [], "ingredients": bad})
    with pytest.raises(RegistryError, match="ingredients.json: .*" + match):
        read_registry(cfg)


def test_no_registry_names_the_stages_that_write_one(tmp_path):
    with pytest.raises(RegistryError, match="no ingredient registry at .*frankensoup finetune.*import-ingredients"):
        read_registry(tiny_config(str(tmp_path / "out")))
