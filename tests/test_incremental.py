"""Work keyed by content (issue 10): on a finished demo-sized run, each change redoes exactly
what depends on it (read back from run.json), and the result equals a from-scratch run."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import EVALUATED_OVERRIDES, clone_output, tiny_config
from pipeline import layout, storage
from pipeline.data import read_split, write_split
from pipeline.finetune import import_ingredients, read_registry
from pipeline.run import run_all

QUIET = {"log": lambda *_: None}
SETTINGS = (*EVALUATED_OVERRIDES, "soup.max_func_evals_per_dim=1", "soup.phase2.enabled=false")


def stages(cfg) -> dict:
    return storage.read_json(layout.run_record_uri(cfg))["stages"]


def copy_tree(src: str, dst: str) -> None:
    """Copy an output folder (local or s3://) to another place, byte for byte."""
    import pyarrow.fs as pafs

    a, b = storage.resolve(src), storage.resolve(dst)
    pafs.copy_files(a.path, b.path, source_filesystem=a.fs, destination_filesystem=b.fs)


@pytest.fixture(scope="module")
def finished(evaluated_demo, tmp_path_factory):
    """A finished run (all four stages) to copy for each change."""
    cfg = clone_output(evaluated_demo, tmp_path_factory.mktemp("finished") / "out", *SETTINGS)
    report = run_all(cfg, **QUIET)
    return cfg, report


@pytest.fixture(scope="module")
def fresh_four_trials(evaluated_demo, tmp_path_factory):
    """From scratch with four trials (only prepare kept): what `num_trials: 3 -> 4` must equal."""
    fresh = clone_output(evaluated_demo, tmp_path_factory.mktemp("fresh") / "out", *SETTINGS, "finetune.num_trials=4")
    shutil.rmtree(layout.stage_dir(fresh, "finetune"))
    shutil.rmtree(layout.stage_dir(fresh, "evaluate"))
    return run_all(fresh, **QUIET)


def clone(finished, dst, *extra):
    """A copy of the finished run at ``dst`` (a local path or an s3:// URI on the moto server)."""
    cfg, _ = finished
    copy_tree(cfg.output_uri, str(dst))
    return tiny_config(str(dst), *SETTINGS, *extra)


def test_a_second_run_reuses_everything(finished, tmp_path):
    first = stages(finished[0])["soup"]
    # the first search answers its own repeats from the memo, but that is not reused work
    assert first["reused"] == 0 and first["computed"] > 0 and first["status"] == "done", first
    cfg = clone(finished, tmp_path / "out")
    report = run_all(cfg, **QUIET)
    assert {s: r["status"] for s, r in stages(cfg).items()} == dict.fromkeys(layout.STAGES, "reused")
    assert report == finished[1]


def test_a_soup_redone_from_its_memos_writes_no_model_files(finished, tmp_path, monkeypatch):
    """The soup's marker gone (its inputs unknown), the search and every fused-model score come
    from the memos: the same report, and no fused checkpoint is written for scoring."""
    from pipeline.model import weights
    from pipeline.soup.stage import run_soup

    cfg = clone(finished, tmp_path / "out")
    layout.clear_done(cfg, "soup")
    saved: list[str] = []
    save = weights.save_classifier
    monkeypatch.setattr(weights, "save_classifier", lambda uri, *a, **k: (saved.append(uri), save(uri, *a, **k))[1])
    report = run_soup(cfg, **QUIET)
    marker = layout.read_marker(cfg, "soup")
    assert (marker["computed"], marker["scores_computed"]) == (0, 0) and marker["reused"] > 0, marker
    assert [u for u in saved if "/scratch-" in u] == []
    assert report["methods"] == finished[1]["methods"]


# on object storage only: reuse is decided by the same code on either storage (the tests around
# this one run it on local disk), and object storage is the path a cluster uses
@pytest.mark.parametrize("storage_root", ["s3"], indirect=True)
def test_an_added_ood_set_scores_only_that_set(finished, tmp_path, storage_root):
    cfg0, report0 = finished
    noise = read_split(layout.data_uri(cfg0, "noise"))
    flipped = tmp_path / "flipped"
    # another ood set: the noise images mirrored (other content than any split of the run)
    from pipeline.data import decode_image, encode_png

    images = [encode_png(np.asarray(decode_image(b))[:, ::-1]) for b in noise.table.column("image").to_pylist()]
    write_split(str(flipped), images, noise.table.column("label").to_numpy(), name="flipped", role="ood",
                class_names=noise.class_names)
    cfg = clone(finished, storage_root, f"data.splits.flipped.uri={flipped}", "data.splits.flipped.role=ood")
    report = run_all(cfg, **QUIET)
    st = stages(cfg)
    assert st["prepare"]["computed"] == 0 and st["finetune"]["computed"] == 0
    n_models = 1 + len(read_registry(cfg)["ingredients"])
    assert st["evaluate"]["computed"] == n_models  # every model on the new set, nothing else
    assert st["soup"]["computed"] == 0  # no search evaluation
    distinct = len({str(m["beta"]) for name, m in report["methods"].items() if name != "zero_shot"})
    # each fused model and the zero-shot head (scored beside them for the paired tests) on the new set only
    assert st["soup"]["scores_computed"] == distinct + 1
    assert "flipped" in report["splits"]["ood"] and "flipped" not in report0["splits"]["ood"]
    for name, m in report0["methods"].items():
        assert report["methods"][name]["val"] == m["val"]


# on object storage only: reuse is decided by the same code on either storage (the tests around
# this one run it on local disk), and object storage is the path a cluster uses
@pytest.mark.parametrize("storage_root", ["s3"], indirect=True)
def test_more_trials_train_only_the_new_ones_and_equal_a_fresh_run(finished, fresh_four_trials, storage_root):
    cfg = clone(finished, storage_root, "finetune.num_trials=4")
    report = run_all(cfg, **QUIET)
    st = stages(cfg)
    assert st["finetune"]["computed"] == 1 and st["finetune"]["reused"] == 3
    assert st["evaluate"]["computed"] == 7  # the new ingredient on val, id_test and five ood sets
    assert st["soup"]["reused"] > 0  # mixtures of the first three come from the memo
    for name, m in fresh_four_trials["methods"].items():
        assert report["methods"][name]["beta"] == m["beta"] and report["methods"][name]["val"] == m["val"], name


def memo_records(cfg) -> dict[str, list[str]]:
    """part file -> the mixture keys it records ("acc:" a full score, "failed:" an early-stopped
    threshold test), over every memo context of the run."""
    import json

    root = layout.soup_memo_root(cfg)
    return {f"{d}/{p}": [("acc:" if "acc" in r else "failed:") + r["key"] for r in
                         map(json.loads, storage.read_bytes(storage.join(root, d, p)).decode().splitlines())]
            for d in storage.listdir(root) for p in storage.listdir(storage.join(root, d)) if p.startswith("part-")}


@pytest.mark.parametrize("change", ["soup.tau=0.9", "soup.optimizer=TwoPointsDE"])
def test_changed_search_settings_reuse_every_scored_mixture(finished, tmp_path, change):
    cfg = clone(finished, tmp_path / "out", change)
    before = memo_records(cfg)
    run_all(cfg, **QUIET)
    st = stages(cfg)["soup"]
    assert stages(cfg)["evaluate"]["computed"] == 0 and stages(cfg)["finetune"]["computed"] == 0
    assert st["reused"] > 0  # the baselines and the first candidates' tests come from the memo
    new = [k for part, keys in memo_records(cfg).items() if part not in before for k in keys]
    assert len(new) == st["computed"] > 0  # what was evaluated was new to the memo ...
    scored = {k for keys in before.values() for k in keys if k.startswith("acc:")}
    # ... never a mixture scored before (one that only failed a stricter test may be scored now)
    assert not {k for k in new if k.startswith("acc:")} & scored
    assert len({part.split("/")[0] for part in memo_records(cfg)}) == 1  # one memo context: the same val


# on object storage only: reuse is decided by the same code on either storage (the tests around
# this one run it on local disk), and object storage is the path a cluster uses
@pytest.mark.parametrize("storage_root", ["s3"], indirect=True)
def test_import_adds_an_ingredient_and_the_next_run_uses_it(finished, tmp_path, storage_root):
    cfg = clone(finished, storage_root)
    before = read_registry(cfg)["ingredients"]
    source = tmp_path / "mine.safetensors"
    source.write_bytes(storage.read_bytes(before[0]["checkpoint_uri"]))  # an identical copy is not registered twice
    import_ingredients(cfg, [str(source)], **QUIET)
    assert len(read_registry(cfg)["ingredients"]) == len(before)
    from pipeline.model import load_classifier, save_classifier

    clf, meta = load_classifier(before[1]["checkpoint_uri"])
    with torch.no_grad():
        clf.head.weight.mul_(1.01)
    save_classifier(str(source), clf, model_name=meta["model_name"], class_names=meta["class_names"],
                    preprocess=meta["preprocess"])
    import_ingredients(cfg, [str(source)], **QUIET)
    rows = read_registry(cfg)["ingredients"]
    assert [r["id"] for r in rows] == [r["id"] for r in before] + ["mine"]
    report = run_all(cfg, **QUIET)
    st = stages(cfg)
    assert st["finetune"]["computed"] == 0 and st["evaluate"]["computed"] == 7
    assert st["soup"]["computed"] > 0
    assert "mine" in report["ingredient_scores"]


def test_a_rewritten_val_shard_redoes_evaluate_and_soup(finished, storage_root):
    cfg = clone(finished, storage_root)
    val = layout.data_uri(cfg, "val")
    split = read_split(val)
    labels = split.table.column("label").to_numpy()
    images = split.table.column("image").to_pylist()
    write_split(val, images[::-1], labels[::-1], name="val", role="val", class_names=split.class_names,
                rows_per_shard=len(images) // 2 + 1)  # same images, other shards: other content
    contexts = len(storage.listdir(layout.soup_memo_root(cfg)))
    run_all(cfg, **QUIET)
    st = stages(cfg)
    assert st["finetune"]["computed"] == 0
    assert st["evaluate"]["computed"] == 1 + len(read_registry(cfg)["ingredients"])  # every model on val
    assert st["soup"]["computed"] > 0  # another val: another memo context, searched anew
    assert len(storage.listdir(layout.soup_memo_root(cfg))) == contexts + 1


def test_a_nan_checkpoint_is_refused_at_import(finished, tmp_path):
    from pipeline.model import CheckpointError, load_classifier, save_classifier

    cfg = clone(finished, tmp_path / "out")
    before = storage.read_bytes(layout.registry_uri(cfg))
    clf, meta = load_classifier(read_registry(cfg)["ingredients"][0]["checkpoint_uri"])
    with torch.no_grad():
        clf.head.bias[3] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_classifier(str(bad), clf, model_name=meta["model_name"], class_names=meta["class_names"],
                    preprocess=meta["preprocess"])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'head\.bias' holds NaN"):
        import_ingredients(cfg, [str(bad)], **QUIET)
    assert storage.read_bytes(layout.registry_uri(cfg)) == before


def test_a_copied_output_folder_reuses_everything(finished, tmp_path, s3_bucket):
    cfg0, report0 = finished
    for dst in (str(tmp_path / "moved"), f"{s3_bucket}/incremental-copy"):
        copy_tree(cfg0.output_uri, dst)
        cfg = tiny_config(dst, *SETTINGS)
        report = run_all(cfg, **QUIET)
        assert {s: r["status"] for s, r in stages(cfg).items()} == dict.fromkeys(layout.STAGES, "reused"), dst
        assert report["methods"] == report0["methods"]
