"""The offline ImageNet rehearsal (bench/imagenet_rehearsal.py) reduced to 50 classes, on the same
code path: an ImageNet-shaped tree imported as a user would, then `frankensoup prepare` with the
ImageNet config (ViT-B-32-quickgelu from a local random-weights file, the reference's held-out
mask as val, ImageNet prompt names). The full run and the memory figures are the bench's."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import imagenet_rehearsal as rehearsal  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.shards import read_split, split_info  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    work = tmp_path_factory.mktemp("rehearsal")
    tree = rehearsal.build_tree(work / "tree", 50, train_per_class=2)
    rehearsal.import_all(work / "tree", work / "data")
    return work, tree


def test_the_imagenet_shaped_tree_imports_as_the_config_expects(imported):
    work, tree = imported
    data = work / "data"
    classes = tree["classes"]
    train, val = split_info(str(data / "train-98p")), split_info(str(data / "train-2p"))
    assert train["class_names"] == classes and train["order"] == "shuffled"
    assert val["holdout"]["method"] == "indices" and val["num_rows"] == 50 and train["num_rows"] == 100
    # val is exactly the images the mask names, in ImageFolder's order
    mask = np.load(work / "tree" / "imagenet_98_idxs.npy")
    files = [p for w in classes for p in sorted((work / "tree" / "train" / w).iterdir())]
    assert read_split(str(data / "train-2p")).table.column("image").to_pylist() == \
        [files[i].read_bytes() for i in np.flatnonzero(mask)]
    assert split_info(str(data / "imagenet-v2"))["class_names"] == classes  # numbered folders -> WordNet ids
    assert split_info(str(data / "imagenet-r"))["class_names"] == tree["r"]
    assert split_info(str(data / "objectnet"))["num_rows"] == 3  # the unmapped folder is skipped


def test_prepare_runs_the_imagenet_config_from_local_weights(imported):
    work, tree = imported
    weights = rehearsal.random_weights(work / "weights.safetensors")
    sets = rehearsal.overrides(tree, work / "data", work / "out", weights, templates=1)
    cfg = load_config(rehearsal.CONFIG, sets)
    assert cfg.model.name == "ViT-B-32-quickgelu" and cfg.model.prompt_names == "imagenet"
    result = rehearsal.stage("prepare", sets)
    assert result["peak_gib"] > 0
    record = storage.read_json(str(work / "out" / "prepare" / "zeroshot.json"))
    assert 0.0 <= record["id_test_accuracy"] <= 1.0
    from pipeline.prepared import load_zero_shot

    clf, meta = load_zero_shot(cfg)
    assert meta["class_names"] == tree["classes"] and clf.head.weight.shape == (50, 512)
