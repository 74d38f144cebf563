"""The ImageNet family: class ids and prompt names, the R/-A subsets and the V2 folder list the
configs carry, ObjectNet's class map read from its own mappings folder, and their import."""
import json
import pkgutil

import numpy as np
import pytest
import yaml

from pipeline import storage
from pipeline.cli import main
from pipeline.config import ConfigError, SplitConfig, load_config
from pipeline.data.images import import_image_folder, read_class_list
from pipeline.data.imagenet import (imagenet_prompt_names, imagenet_wnids, objectnet_class_map, prompt_names,
                                    subset_wnids)
from pipeline.data.shards import DataError, read_split
from pipeline.scoring import split_scoring
from test_data import image_folder

REAL_CONFIGS = ["configs/imagenet-vit-b32.yaml", "configs/model-soups-72.yaml"]


def test_imagenet_ids_and_prompt_names():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids[0] == "n01440764"
    names = imagenet_prompt_names()
    assert names["n01440764"] == "tench" and names["n15075141"] == "toilet paper"
    # the readable names are not unique, which is why class ids are WordNet ids
    assert sorted(w for w, n in names.items() if n == "missile") == ["n03773504", "n04008634"]
    assert prompt_names(["n01443537", "n01440764"], "imagenet") == ["goldfish", "tench"]
    assert prompt_names(["a", "b"], {"a": "an apple", "b": "a bee", "c": "unused"}) == ["an apple", "a bee"]
    assert prompt_names(["a"], None) == ["a"]
    with pytest.raises(DataError, match=r"model.prompt_names lack the classes \['b'\] \(1 of 2\)"):
        prompt_names(["a", "b"], {"a": "an apple"})
    with pytest.raises(DataError, match=r"'imagenet' prompt names lack the classes \['zero'\]"):
        prompt_names(["zero", "n01440764"], "imagenet")
    with pytest.raises(ConfigError, match="model.prompt_names"):
        load_config(None, ["model.prompt_names=imagenet-21k"])


@pytest.mark.parametrize("path", REAL_CONFIGS)
def test_real_configs_carry_the_imagenet_r_a_subsets_and_objectnet_mappings(path):
    cfg = load_config(path)
    splits = cfg.data.splits
    assert cfg.model.prompt_names == "imagenet"
    for name, known in [("imagenet-r", ["n01443537", "n12267677"]), ("imagenet-a", ["n01498041", "n12267677"])]:
        subset = splits[name].class_subset
        assert subset == list(subset_wnids(name)) and len(set(subset)) == 200
        assert set(subset) <= set(imagenet_wnids()) and set(known) <= set(subset)
    assert "n01440764" not in splits["imagenet-r"].class_subset  # tench is not among ImageNet-R's classes
    assert splits["objectnet"].objectnet_mappings.endswith("/mappings") and splits["objectnet"].class_map is None
    assert {s.role for s in splits.values()} == {"train", "val", "id_test", "ood"}
    assert sum(s.role == "ood" for s in splits.values()) == 5
    # the two ImageNet configs share one data section
    sections = [yaml.safe_load(open(p))["data"] for p in REAL_CONFIGS]
    assert sections[0] == sections[1]


def test_the_imagenet_v2_folder_list_maps_indices_to_ids():
    classes, folders = read_class_list("configs/imagenet/imagenet-v2-folders.tsv")
    assert classes == list(imagenet_wnids())
    assert folders == {str(i): w for i, w in enumerate(imagenet_wnids())}


def test_class_list_files(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("dog\ncat\n\n")
    assert read_class_list(str(plain)) == (["dog", "cat"], None)
    tsv = tmp_path / "folders.tsv"
    tsv.write_text("0\tdog\n1\tcat\r\n2\tdog\n")
    assert read_class_list(str(tsv)) == (["dog", "cat"], {"0": "dog", "1": "cat", "2": "dog"})
    for text, match in [("0\tdog\ncat\n", "mixes"), ("0\tdog\n0\tcat\n", "line 2: folder '0' is listed twice"),
                        ("0\tdog\t1\n", "line 1: expected 'FOLDER<TAB>CLASS'")]:
        tsv.write_text(text)
        with pytest.raises(DataError, match=match):
            read_class_list(str(tsv))
    with pytest.raises(DataError, match="class list: .*missing.txt' does not exist"):
        read_class_list(str(tmp_path / "missing.txt"))


def test_import_with_folder_names_that_are_not_class_names(tmp_path, ray_local):
    src = image_folder(tmp_path / "v2", {"0": [1, 2], "2": [3], "10": [4]})
    tsv = tmp_path / "folders.tsv"
    tsv.write_text("".join(f"{i}\t{w}\n" for i, w in enumerate(imagenet_wnids())))
    out = str(tmp_path / "out")
    assert main(["import-images", src, "--out", out, "--classes", str(tsv)]) == 0
    split = read_split(out)
    assert split.class_names == list(imagenet_wnids())
    assert split.table.column("label").to_pylist() == [0, 0, 10, 2]  # folders in name order: 0, 10, 2
    (tmp_path / "v2" / "1000").mkdir()
    (tmp_path / "v2" / "1000" / "0.png").write_bytes((tmp_path / "v2" / "0" / "0.png").read_bytes())
    with pytest.raises(DataError, match="v2/1000 is not one of the given folders"):
        import_image_folder(src, str(tmp_path / "out2"), folder_classes={"0": "a", "2": "b", "10": "c"})
    assert not storage.exists(str(tmp_path / "out2"))


# ---- ObjectNet ------------------------------------------------------------------------------

def _lemmas() -> dict[str, str]:
    text = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode()
    return dict(line.split("\t", 1) for line in text.splitlines())


# ObjectNet label -> (its folder, the ImageNet ids it stands for); "Air freshener" has none
OBJECTNET = {"Alarm clock": ("alarm_clock", ["n02708093", "n03196217"]),
             "Banana": ("banana", ["n07753592"]),
             "Bath towel": ("bath_towel", ["n02808304"])}


def write_objectnet_mappings(root: str, objectnet=OBJECTNET, seed: int = 0) -> dict[str, list[str]]:
    """An ObjectNet mappings/ folder in ObjectNet's own format, with the ILSVRC-2012 ids in a
    shuffled order (as in the real files, they are not the sorted label order); returns the
    folder -> ImageNet ids map it encodes."""
    wnids, lemma = imagenet_wnids(), _lemmas()
    order = np.random.default_rng(seed).permutation(1000)  # 2012 id j is label index order[j]
    storage.write_bytes(storage.join(root, "imagenet_to_label_2012_v2"),
                        "".join(lemma[wnids[i]] + "\n" for i in order).encode())
    storage.write_json(storage.join(root, "pytorch_to_imagenet_2012_id.json"),
                       {str(int(i)): j for j, i in enumerate(order)})
    storage.write_json(storage.join(root, "objectnet_to_imagenet_1k.json"),
                       {label: "; ".join(lemma[w] for w in ids) for label, (_, ids) in objectnet.items()})
    folders = {folder: label for label, (folder, _) in objectnet.items()}
    storage.write_json(storage.join(root, "folder_to_objectnet_label.json"),
                       {**folders, "air_freshener": "Air freshener"})
    return {folder: ids for folder, ids in objectnet.values()}


def test_objectnet_class_map_from_its_mappings_folder(storage_root):
    root = storage.join(storage_root, "objectnet-1.0/mappings")
    expected = write_objectnet_mappings(root)
    assert objectnet_class_map(root) == dict(sorted(expected.items()))


def test_objectnet_mappings_errors_name_the_culprit(tmp_path):
    root = str(tmp_path / "mappings")
    write_objectnet_mappings(root)
    storage.delete(storage.join(root, "folder_to_objectnet_label.json"))
    with pytest.raises(DataError, match="ObjectNet mapping file: .*folder_to_objectnet_label.json' does not exist"):
        objectnet_class_map(root)
    write_objectnet_mappings(root, {**OBJECTNET, "Crane": ("crane", ["n02012849"])})
    with pytest.raises(DataError, match="ImageNet label 'crane' \\(for 'Crane'\\) is ambiguous"):
        objectnet_class_map(root)
    to_imagenet = storage.join(root, "objectnet_to_imagenet_1k.json")
    storage.write_json(to_imagenet, {"Banana": "banana; plantain tree"})
    with pytest.raises(DataError, match="ImageNet label 'plantain tree' \\(for 'Banana'\\) is not a line"):
        objectnet_class_map(root)
    storage.write_json(to_imagenet, {"Kiwi": "banana"})
    with pytest.raises(DataError, match="ObjectNet label 'Kiwi' has no folder"):
        objectnet_class_map(root)
    storage.write_bytes(to_imagenet, b"{not json")
    with pytest.raises(DataError, match="objectnet_to_imagenet_1k.json is not valid JSON"):
        objectnet_class_map(root)


def test_objectnet_import_keeps_mapped_folders_and_scores_through_the_map(tmp_path, capsys, ray_local):
    mappings = str(tmp_path / "objectnet-1.0" / "mappings")
    write_objectnet_mappings(mappings)
    src = image_folder(tmp_path / "objectnet-1.0" / "images",
                       {"air_freshener": [1], "alarm_clock": [2, 3], "banana": [4], "bath_towel": [5]})
    out = str(tmp_path / "objectnet")
    assert main(["import-images", src, "--out", out, "--objectnet-mappings", mappings]) == 0
    assert "1 folders of other classes skipped" in capsys.readouterr().out
    split = read_split(out)
    assert split.class_names == ["alarm_clock", "banana", "bath_towel"]
    assert split.table.column("label").to_pylist() == [0, 0, 1, 2]

    wnids = list(imagenet_wnids())
    cfg = SplitConfig(uri=out, role="ood", objectnet_mappings=mappings)
    scoring = split_scoring("objectnet", cfg, split.class_names, wnids)
    mapped = {wnids[i]: int(d) for i, d in enumerate(scoring.class_map) if d >= 0}
    assert mapped == {"n02708093": 0, "n03196217": 0, "n07753592": 1, "n02808304": 2}
    assert scoring.target_of_label.tolist() == [0, 1, 2]
    # a folder ObjectNet does not map was imported by hand: refused, with the way out
    with pytest.raises(DataError, match=r"lacks the split's classes \['air_freshener'\].*--objectnet-mappings"):
        split_scoring("objectnet", cfg, ["air_freshener", *split.class_names], wnids)
    with pytest.raises(ConfigError, match="class_map or objectnet_mappings, not both"):
        load_config(None, ["data.source=shards",
                           f"data.splits={{o: {{uri: {out}, role: ood, class_map: {{a: [b]}}, "
                           f"objectnet_mappings: {mappings}}}}}"])


def test_dry_run_checks_classes_against_subsets_maps_and_prompt_names(tmp_path):
    from pipeline.dryrun import Checks, check_classes

    mappings = str(tmp_path / "mappings")
    write_objectnet_mappings(mappings)
    model_classes = ["n01440764", "n02708093", "n02808304", "n03196217", "n07753592"]
    infos = {"train": {"class_names": model_classes},
             "r": {"class_names": ["n01440764"]},
             "o": {"class_names": ["alarm_clock", "banana", "bath_towel"]}}
    splits = {"train": {"uri": "unused", "role": "train"},
              "r": {"uri": "unused", "role": "ood", "class_subset": ["n01440764"]},
              "o": {"uri": "unused", "role": "ood", "objectnet_mappings": mappings}}
    raw = json.dumps({"data": {"source": "shards", "splits": splits}, "model": {"prompt_names": "imagenet"}})

    def check(*overrides):
        cfg = load_config(None, [f"{k}={v}" for k, v in json.loads(raw).items()] + list(overrides))
        lines = []
        c = Checks(lines.append)
        check_classes(cfg, infos, c)
        return c.failed, "\n".join(lines)

    failed, out = check()
    assert failed == 0 and "5 classes, each with a prompt name" in out, out
    assert "split o: classes scored through its class subset/map" in out
    failed, out = check("model.prompt_names={n01440764: tench}")
    assert failed == 1 and "lack the classes ['n02708093', " in out
    failed, out = check("data.splits.r.class_subset=[n07753592]")
    assert failed == 1 and "classes ['n01440764'] are outside class_subset" in out
    failed, out = check(f"data.splits.o.objectnet_mappings={tmp_path}/nowhere")
    assert failed == 1 and "nowhere/folder_to_objectnet_label.json' does not exist" in out


def test_prompt_names_are_what_the_zero_shot_head_embeds(prepared_demo):
    import torch

    from pipeline.prepared import class_names, load_base_clip
    from pipeline.prepare import build_zero_shot

    clip, _ = load_base_clip(prepared_demo)
    names = class_names(prepared_demo)
    plain = build_zero_shot(prepared_demo, clip, names)
    swapped = prepared_demo.model_copy(deep=True)
    swapped.model.prompt_names = dict(zip(names, reversed(names)))
    with torch.no_grad():
        assert torch.allclose(build_zero_shot(swapped, clip, names).head.weight, plain.head.weight.flip(0))
        assert not torch.allclose(plain.head.weight, plain.head.weight.flip(0))
