"""The evaluate stage: Ray Data streaming scoring, the results table, class subsets and maps,
corrupt shards named, and the mixture evaluator (in-process and as a Ray actor) agreeing with
the stage to the last image. The finished stage is the shared ``evaluated_demo`` (three
finetuned ingredients), read-only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EVALUATED_OVERRIDES, clone_output, perturbed
from pipeline import layout, storage
from pipeline.config import Resources, SplitConfig
from pipeline.data.shards import DataError, decode_split, read_split, shard_uris, write_split
from pipeline.evaluate.stage import read_results
from pipeline.model import image_transform, load_classifier, save_classifier
from pipeline.layout import zeroshot_uri
from pipeline.soup.mixing import one_hot, uniform

torch.set_num_threads(1)
ONE_ACTOR = dict(batch_size=128, num_actors=1, resources=Resources(cpu=1))


def ingredient_ids(cfg) -> list[str]:
    from pipeline.ingredients import read_registry, usable

    return [i.id for i in usable(read_registry(cfg))]


def plain_logits(cfg, split_uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero-shot classifier's logits on a split, decoded and run in-process (the slow way)."""
    clf, meta = load_classifier(zeroshot_uri(cfg))
    images, labels = decode_split(read_split(split_uri), image_transform(meta["preprocess"]))
    with torch.no_grad():
        return clf(images), labels


# ---- the stage ------------------------------------------------------------------------------

def test_stage_writes_every_model_on_every_split(evaluated_demo):
    cfg = evaluated_demo
    rows = read_results(cfg)
    splits = ["val", "id_test", *layout.ood_splits(cfg)]
    models = ["zero_shot", *ingredient_ids(cfg)]
    assert len(models) == 4
    assert [(r["model"], r["split"]) for r in rows] == [(m, s) for m in models for s in splits]
    roles = {r["split"]: r["role"] for r in rows}
    assert roles["val"] == "val" and roles["id_test"] == "id_test"
    assert all(roles[s] == "ood" for s in layout.ood_splits(cfg))
    for r in rows:
        assert r["n"] == read_split(layout.splits(cfg)[r["split"]].uri).num_rows
        assert r["accuracy"] == r["correct"] / r["n"]

    table = storage.read_bytes(layout.evaluations_uri(cfg, "md")).decode().splitlines()
    assert "| model | " + " | ".join(splits) + " | ood avg |" in table
    for m in models:
        line = next(line for line in table if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        by_split = {r["split"]: r["accuracy"] for r in rows if r["model"] == m}
        ood = [by_split[s] for s in layout.ood_splits(cfg)]
        assert cells == [f"{100 * by_split[s]:.2f}" for s in splits] + [f"{100 * sum(ood) / len(ood):.2f}"]
    assert layout.read_marker(cfg, "evaluate")["best_val"]["model"] in models[1:]


def test_stage_scores_like_a_plain_loop(evaluated_demo):
    cfg = evaluated_demo
    logits, labels = plain_logits(cfg, layout.splits(cfg)["id_test"].uri)
    row = next(r for r in read_results(cfg) if r["model"] == "zero_shot" and r["split"] == "id_test")
    assert row["correct"] == int((logits.argmax(1) == labels).sum())


def test_prepare_streams_id_test_to_the_score_evaluate_gives(evaluated_demo):
    """prepare scores the zero-shot head on id_test shard by shard and batch by batch (ImageNet's
    50,000 images decoded at once took ~30 GB): the same number the evaluate stage streams."""
    from pipeline.prepared import zero_shot_record

    row = next(r for r in read_results(evaluated_demo) if r["model"] == "zero_shot" and r["split"] == "id_test")
    assert zero_shot_record(evaluated_demo)["id_test_accuracy"] == row["accuracy"]


def test_stage_reuses_every_score_when_nothing_changed(evaluated_demo, tmp_path):
    from pipeline.evaluate.stage import run_evaluate

    cfg = clone_output(evaluated_demo, tmp_path / "out", *EVALUATED_OVERRIDES)
    before = storage.read_bytes(layout.evaluations_uri(cfg))
    lines: list[str] = []
    marker = run_evaluate(cfg, log=lines.append)
    assert marker["computed"] == 0 and marker["reused"] == len(read_results(cfg))
    assert any("scores reused, 0 scored" in line for line in lines)
    assert storage.read_bytes(layout.evaluations_uri(cfg)) == before


def test_only_ok_ingredients_are_scored(prepared_demo):
    from pipeline.evaluate.stage import models_to_score

    def row(iid, status):
        return {"id": iid, "hparams": {}, "val_acc": 0.5, "checkpoint_uri": f"/x/{iid}.safetensors",
                "sha256": "", "status": status, "source": "tune"}

    registry = {"model_name": "m", "class_names": ["a"], "ingredients": [row("ft-000", "ok"), row("ft-001", "failed")]}
    zs_sha = storage.sha256(storage.read_bytes(zeroshot_uri(prepared_demo)))
    models = models_to_score(prepared_demo, registry)
    assert {m: (i.checkpoint_uri, i.sha256) for m, i in models.items()} == {
        "zero_shot": (zeroshot_uri(prepared_demo), zs_sha), "ft-000": ("/x/ft-000.safetensors", "")}


def test_stage_needs_finetune(prepared_demo, tmp_path):
    from pipeline.errors import UserError
    from pipeline.evaluate.stage import run_evaluate

    cfg = clone_output(prepared_demo, tmp_path / "out")
    with pytest.raises(UserError, match="finetune"):
        run_evaluate(cfg, log=lambda *_: None)
    assert not storage.exists(layout.evaluations_uri(cfg))


# ---- class subsets and maps ------------------------------------------------------------------

def test_class_subset_and_class_map(prepared_demo, tmp_path, ray_local):
    from pipeline.evaluate.stream import score_splits

    cfg = prepared_demo
    names = load_classifier(zeroshot_uri(cfg))[1]["class_names"]
    val = read_split(layout.splits(cfg)["val"].uri)
    images = val.table.column("image").to_pylist()
    labels = np.asarray(val.table.column("label").to_numpy())

    # ImageNet-R style: a set of digits 0-4 only, scored among those five classes
    low = np.flatnonzero(labels < 5)
    write_split(str(tmp_path / "low"), [images[i] for i in low], labels[low], name="low", role="ood",
                class_names=names[:5])
    # ObjectNet style: the set's own classes, each one or more of the model's
    groups = {"small": names[0:3], "big": names[7:10]}
    pick = np.flatnonzero((labels < 3) | (labels >= 7))
    write_split(str(tmp_path / "grouped"), [images[i] for i in pick], (labels[pick] >= 7).astype(int),
                name="grouped", role="ood", class_names=["small", "big"])
    splits = {"low": SplitConfig(uri=str(tmp_path / "low"), role="ood", class_subset=names[:5]),
              "grouped": SplitConfig(uri=str(tmp_path / "grouped"), role="ood", class_map=groups)}
    scores = score_splits({"zs": zeroshot_uri(cfg)}, splits, **ONE_ACTOR)

    logits, digit = plain_logits(cfg, str(tmp_path / "low"))
    masked = logits.clone()
    masked[:, 5:] = float("-inf")
    assert scores["low"]["zs"]["correct"] == int((masked.argmax(1) == digit).sum())
    assert scores["low"]["zs"]["n"] == len(low)

    logits, group = plain_logits(cfg, str(tmp_path / "grouped"))
    in_map = [0, 1, 2, 7, 8, 9]
    predicted_group = (torch.tensor(in_map)[logits[:, in_map].argmax(1)] >= 7).long()
    assert scores["grouped"]["zs"]["correct"] == int((predicted_group == group).sum())
    assert scores["grouped"]["zs"]["n"] == len(pick)


def test_class_names_that_do_not_fit_are_named():
    from pipeline.scoring import split_scoring

    names = ["zero", "one", "two"]
    split = SplitConfig(uri="mem://x", role="ood", class_subset=["zero", "eleven"])
    with pytest.raises(DataError, match="class_subset names \\['eleven'\\]"):
        split_scoring("odd", split, names, names)
    with pytest.raises(DataError, match="'odd'.*\\['cat'\\].*declare a class_map"):
        split_scoring("odd", SplitConfig(uri="mem://x", role="ood"), ["zero", "cat"], names)
    with pytest.raises(DataError, match="class_map lacks the split's classes \\['b'\\]"):
        split_scoring("odd", SplitConfig(uri="mem://x", role="ood", class_map={"a": ["zero"]}), ["a", "b"], names)
    with pytest.raises(DataError, match="'one' appears under two"):
        split_scoring("odd", SplitConfig(uri="mem://x", role="ood", class_map={"a": ["one"], "b": ["one"]}),
                      ["a", "b"], names)


def test_models_with_other_preprocessing_are_refused(prepared_demo, tmp_path):
    from pipeline.evaluate.stream import shared_metadata
    from pipeline.model import CheckpointError

    clf, meta = load_classifier(zeroshot_uri(prepared_demo))
    other = str(tmp_path / "other.safetensors")
    save_classifier(other, clf, model_name=meta["model_name"], class_names=meta["class_names"],
                    preprocess={**meta["preprocess"], "mean": [0.5, 0.5, 0.5]})
    with pytest.raises(CheckpointError, match="'b'.*another preprocess"):
        shared_metadata({"a": zeroshot_uri(prepared_demo), "b": other})


# ---- corrupt shards --------------------------------------------------------------------------

def copy_split(src_uri: str, dst) -> list[str]:
    import shutil

    shutil.copytree(src_uri, dst)
    return shard_uris(str(dst))


def test_corrupt_shard_is_named(prepared_demo, tmp_path, ray_local):
    from pipeline.evaluate.stream import score_models

    shard = copy_split(layout.splits(prepared_demo)["val"].uri, tmp_path / "val")[0]
    data = bytearray(open(shard, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(256)  # the footer stays readable, a page does not
    open(shard, "wb").write(bytes(data))
    with pytest.raises(DataError, match=f"shard {shard}"):
        score_models({"zs": zeroshot_uri(prepared_demo)}, SplitConfig(uri=str(tmp_path / "val"), role="val"),
                     **ONE_ACTOR)


def test_truncated_shard_is_named_before_any_actor_starts(prepared_demo, tmp_path):
    from pipeline.evaluate.stream import score_models

    shard = copy_split(layout.splits(prepared_demo)["val"].uri, tmp_path / "val")[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) - 100])
    with pytest.raises(DataError, match=f"shard {shard} is unreadable"):
        score_models({"zs": zeroshot_uri(prepared_demo)}, SplitConfig(uri=str(tmp_path / "val"), role="val"),
                     **ONE_ACTOR)


def test_undecodable_image_names_its_shard(prepared_demo, tmp_path, ray_local):
    from pipeline.evaluate.stream import score_models

    val = read_split(layout.splits(prepared_demo)["val"].uri)
    images = val.table.column("image").to_pylist()[:20]
    images[7] = b"not an image"
    uri = str(tmp_path / "bad")
    write_split(uri, images, val.table.column("label").to_pylist()[:20], name="bad", role="val",
                class_names=val.class_names, rows_per_shard=10)
    with pytest.raises(DataError, match=f"shard {shard_uris(uri)[0]}: cannot decode image"):
        score_models({"zs": zeroshot_uri(prepared_demo)}, SplitConfig(uri=uri, role="val"), **ONE_ACTOR)


# ---- the mixture evaluator against the stage -------------------------------------------------

def test_one_hot_mixture_equals_the_stage(evaluated_demo):
    from pipeline.evaluate.actor import build_mixture_evaluator

    cfg = evaluated_demo
    ids = ingredient_ids(cfg)
    ev = build_mixture_evaluator(cfg, "val", ids, device="cpu")
    k, c = ev.beta_shape
    assert k == len(ids) and c == 3, "tiny config: granularity 1 = stem / transformer / head"
    val = {r["model"]: r["accuracy"] for r in read_results(cfg) if r["split"] == "val"}
    assert ev.evaluate([one_hot(k, c, j) for j in range(k)]) == [val[i] for i in ids]


def test_actor_returns_what_the_in_process_evaluator_returns(evaluated_demo):
    import ray

    from pipeline.evaluate.actor import MixtureEvaluatorActor, build_mixture_evaluator

    cfg = evaluated_demo
    ids = ingredient_ids(cfg)[::-2]  # rows of beta follow the order asked for
    local = build_mixture_evaluator(cfg, "val", ids, device="cpu")
    k, c = local.beta_shape
    mixed = one_hot(k, c, 0)
    mixed[:, 1] = [0.3, 0.7]  # the transformer mixed, stem and head from ids[0]
    betas = [one_hot(k, c, 0), one_hot(k, c, 1), uniform(k, c), mixed]
    actor = MixtureEvaluatorActor.options(num_cpus=1).remote(cfg, "val", ids)
    try:
        info = ray.get(actor.info.remote())
        assert info["ingredient_ids"] == ids and info["beta_shape"] == [k, c]
        assert info["threads"] == cfg.evaluate.threads and info["n_images"] == local.images.shape[0]
        assert ray.get(actor.evaluate.remote(betas)) == local.evaluate(betas)
    finally:
        ray.kill(actor)


def test_ingredient_changed_after_registration_is_refused(evaluated_demo, tmp_path):
    from pipeline.evaluate.actor import build_mixture_evaluator
    from pipeline.ingredients import read_registry, write_registry
    from pipeline.model import CheckpointError

    from conftest import EVALUATED_OVERRIDES

    cfg = clone_output(evaluated_demo, tmp_path / "out", *EVALUATED_OVERRIDES)
    registry = read_registry(cfg)
    row = registry["ingredients"][1]
    clf, meta = load_classifier(row["checkpoint_uri"])
    clf.load_state_dict(perturbed(clf.state_dict(), 99, 0.01))
    row["checkpoint_uri"] = str(tmp_path / "changed.safetensors")  # same registered sha256, other bytes
    save_classifier(row["checkpoint_uri"], clf, model_name=meta["model_name"], class_names=meta["class_names"],
                    preprocess=meta["preprocess"])
    write_registry(cfg, registry)
    # a node that has not cached the registered bytes reads storage (the node cache is keyed by the
    # registered hash: a node already holding them never reads the changed file, and stays exact)
    from pipeline.evaluate import actor

    Path(actor.NODE_CACHE, f"{row['sha256']}.safetensors").unlink(missing_ok=True)
    # rows load when a mixture first uses them (the working set): the changed bytes are refused then
    evaluator = build_mixture_evaluator(cfg, "val", device="cpu")
    one_hot = np.zeros(evaluator.beta_shape)
    one_hot[0] = 1.0
    evaluator.evaluate([one_hot])  # row 0 is what was registered
    one_hot = np.zeros(evaluator.beta_shape)
    one_hot[1] = 1.0
    with pytest.raises(CheckpointError, match="changed.safetensors'.*sha256"):
        evaluator.evaluate([one_hot])


def test_streams_shards_and_checkpoints_from_s3(evaluated_demo, s3_bucket, ray_local):
    from pipeline.evaluate.stream import score_models

    cfg = evaluated_demo
    local = layout.splits(cfg)["val"].uri
    remote = f"{s3_bucket}/evaluate-test/val"
    for name in storage.listdir(local):
        storage.write_bytes(storage.join(remote, name), storage.read_bytes(storage.join(local, name)))
    checkpoint = f"{s3_bucket}/evaluate-test/zero_shot.safetensors"
    storage.write_bytes(checkpoint, storage.read_bytes(zeroshot_uri(cfg)))
    scores = score_models({"zs": checkpoint}, SplitConfig(uri=remote, role="val"), **ONE_ACTOR)
    row = next(r for r in read_results(cfg) if r["model"] == "zero_shot" and r["split"] == "val")
    assert (scores["zs"]["correct"], scores["zs"]["n"]) == (row["correct"], row["n"])
