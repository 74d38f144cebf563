import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError, DemoDataConfig, load_config
from pipeline.data import demo
from pipeline.data.shards import (DataError, decode_image, decode_split, encode_png, read_split,
                                  shard_uris, split_info, write_split)
from pipeline.data.images import import_image_folder

CLASSES = ["cat", "dog", "fox"]


def png(value: int, size: int = 6) -> bytes:
    return encode_png(np.full((size, size), value, dtype=np.uint8))


def some_images(n: int) -> tuple[list[bytes], list[int]]:
    return [png(10 * i) for i in range(n)], [i % len(CLASSES) for i in range(n)]


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ---- shards ----------------------------------------------------------------------------------

def test_round_trip_over_several_shards(storage_root):
    images, labels = some_images(7)
    uri = storage.join(storage_root, "split")
    info = write_split(uri, images, labels, name="toy", role="val", class_names=CLASSES, rows_per_shard=3)

    assert info["num_rows"] == 7 and [s["num_rows"] for s in info["shards"]] == [3, 3, 1]
    assert split_info(uri) == info
    assert shard_uris(uri) == [storage.join(uri, f"part-0000{i}.parquet") for i in range(3)]
    split = read_split(uri)
    assert (split.name, split.role, split.class_names) == ("toy", "val", CLASSES)
    assert split.table.column("image").to_pylist() == images
    assert split.table.column("label").to_pylist() == labels
    assert split.table.schema.field("label").type == pa.int32()
    meta = pq.read_schema(pa.BufferReader(storage.read_bytes(shard_uris(uri)[0]))).metadata
    assert json.loads(meta[b"frankensoup"]) == {"name": "toy", "role": "val", "class_names": CLASSES}

    x, y = decode_split(split, to_tensor)
    assert x.shape == (7, 3, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == labels and x[1, 0, 0, 0].item() == pytest.approx(10 / 255)


def test_overwrite_replaces_every_old_shard(tmp_path):
    uri = str(tmp_path / "split")
    write_split(uri, *some_images(7), name="a", role="train", class_names=CLASSES, rows_per_shard=2)
    write_split(uri, *some_images(2), name="b", role="train", class_names=CLASSES, rows_per_shard=2)
    assert sorted(storage.listdir(uri)) == ["dataset.json", "part-00000.parquet"]
    assert read_split(uri).num_rows == 2


def test_split_without_dataset_json_is_refused(tmp_path):
    uri = str(tmp_path / "split")
    write_split(uri, *some_images(3), name="a", role="train", class_names=CLASSES)
    storage.delete(storage.join(uri, "dataset.json"))
    with pytest.raises(DataError, match="not a complete shard set"):
        read_split(uri)
    with pytest.raises(DataError, match="not a complete shard set"):
        shard_uris(uri)


def test_corrupt_shard_is_named(tmp_path):
    uri = str(tmp_path / "split")
    write_split(uri, *some_images(6), name="a", role="train", class_names=CLASSES, rows_per_shard=2)
    storage.write_bytes(storage.join(uri, "part-00001.parquet"), b"PAR1 not really")
    with pytest.raises(DataError, match="part-00001.parquet"):
        read_split(uri)


def shard_with(uri: str, table: pa.Table, record: bool = True) -> None:
    """Replace shard 0 with ``table``; ``record``: also record its hash in dataset.json, as a
    writer other than write_split would have to."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(uri, "part-00000.parquet"), sink.getvalue())
    if record:
        info = storage.read_json(storage.join(uri, "dataset.json"))
        info["shards"][0]["sha256"] = storage.sha256(sink.getvalue())
        storage.write_json(storage.join(uri, "dataset.json"), info)


def test_a_shard_rewritten_behind_dataset_json_is_refused(tmp_path):
    from pipeline.data.shards import split_content

    uri = str(tmp_path / "split")
    write_split(uri, *some_images(2), name="a", role="train", class_names=CLASSES)
    content = split_content(uri)
    shard_with(uri, pa.table({"image": [b"x", b"y"], "label": pa.array([0, 1], pa.int32())}), record=False)
    with pytest.raises(DataError, match="part-00000.parquet is not the shard dataset.json records"):
        read_split(uri)
    shard_with(uri, pa.table({"image": [b"x", b"y"], "label": pa.array([0, 1], pa.int32())}))
    assert split_content(uri) != content  # recorded: every key naming the split changes


def test_wrong_schema_and_bad_labels_in_a_shard_are_named(tmp_path):
    uri = str(tmp_path / "split")
    write_split(uri, *some_images(2), name="a", role="train", class_names=CLASSES)
    shard_with(uri, pa.table({"pixels": [b"x", b"y"], "label": pa.array([0, 1], pa.int32())}))
    with pytest.raises(DataError, match="part-00000.parquet.*image: binary"):
        read_split(uri)
    shard_with(uri, pa.table({"image": [b"x", b"y"], "label": pa.array([0, 7], pa.int32())}))
    with pytest.raises(DataError, match="part-00000.parquet.*label 7"):
        read_split(uri)


def test_bad_input_writes_nothing(tmp_path):
    uri = str(tmp_path / "split")
    images, labels = some_images(4)
    with pytest.raises(DataError, match="label 3 at row 3"):
        write_split(uri, images, [0, 1, 2, 3], name="a", role="train", class_names=CLASSES)
    with pytest.raises(DataError, match="role"):
        write_split(uri, images, labels, name="a", role="test", class_names=CLASSES)
    with pytest.raises(DataError, match="duplicate"):
        write_split(uri, images, labels, name="a", role="train", class_names=["a", "a"])
    # fails while writing the second shard: the first one is removed again
    with pytest.raises(DataError, match="image 1 is str"):
        write_split(uri, images[:3] + ["oops"], labels, name="a", role="train", class_names=CLASSES,
                    rows_per_shard=2)
    assert not storage.exists(uri)


def test_decode_image_rejects_garbage_and_returns_rgb():
    assert decode_image(png(200)).mode == "RGB"
    with pytest.raises(DataError, match="photo.png"):
        decode_image(b"\x89PNG broken", source="photo.png")
    with pytest.raises(DataError, match="truncated"):
        decode_image(png(5, size=64)[:-30], source="truncated")


# ---- image folders ---------------------------------------------------------------------------

def jpeg() -> bytes:
    from PIL import Image

    sink = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(sink, format="JPEG")
    return sink.getvalue()


def image_folder(root, layout: dict[str, list[int]]) -> str:
    """root/<class>/<i>.png with the given pixel values; returns root."""
    for cls, values in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(values):
            (root / cls / f"{i}.png").write_bytes(png(v))
    return str(root)


def test_import_two_folders_with_the_same_classes_gets_the_same_labels(tmp_path):
    a = image_folder(tmp_path / "a", {"dog": [1, 2], "cat": [3]})
    b = image_folder(tmp_path / "b", {"cat": [4, 5], "dog": [6]})
    (tmp_path / "b" / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "b" / "cat" / "7.JPEG").write_bytes(jpeg())
    info_a = import_image_folder(a, str(tmp_path / "out-a"), role="train")
    info_b = import_image_folder(b, str(tmp_path / "out-b"))
    assert info_a["class_names"] == info_b["class_names"] == ["cat", "dog"]
    assert (info_a["name"], info_a["role"], info_b["role"]) == ("a", "train", "ood")
    split_a, split_b = read_split(str(tmp_path / "out-a")), read_split(str(tmp_path / "out-b"))
    assert split_a.table.column("label").to_pylist() == [0, 1, 1]
    assert split_b.table.column("label").to_pylist() == [0, 0, 0, 1]
    # the original bytes are stored, not a re-encoding
    assert split_b.table.column("image")[3].as_py() == (tmp_path / "b" / "dog" / "0.png").read_bytes()


def test_import_a_subset_of_given_classes(tmp_path):
    src = image_folder(tmp_path / "r", {"fox": [1, 2]})
    info = import_image_folder(src, str(tmp_path / "out"), name="foxes", class_names=CLASSES,
                               rows_per_shard=1)
    assert info["class_names"] == CLASSES and len(info["shards"]) == 2
    assert read_split(str(tmp_path / "out")).table.column("label").to_pylist() == [2, 2]


def test_import_corrupt_image_names_the_file_and_writes_nothing(tmp_path):
    src = image_folder(tmp_path / "src", {"cat": [1], "dog": [2, 3]})
    (tmp_path / "src" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="dog/1.png"):
        import_image_folder(src, out)
    assert not storage.exists(out)


def test_import_refuses_empty_and_unknown_folders(tmp_path):
    src = image_folder(tmp_path / "src", {"cat": [1], "dog": [2]})
    (tmp_path / "src" / "emu").mkdir()
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="src/emu has no images"):
        import_image_folder(src, out)
    with pytest.raises(DataError, match="src/emu is not one of the given class names"):
        import_image_folder(src, out, class_names=["cat", "dog"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing has no class subfolders"):
        import_image_folder(str(tmp_path / "nothing"), out)
    with pytest.raises(DataError, match="missing does not exist"):
        import_image_folder(str(tmp_path / "missing"), out)
    assert not storage.exists(out)


def test_import_to_remote_storage(tmp_path, storage_root):
    src = image_folder(tmp_path / "src", {"cat": [1], "dog": [2, 3]})
    out = storage.join(storage_root, "imported")
    import_image_folder(src, out, rows_per_shard=2)
    assert read_split(out).table.column("label").to_pylist() == [0, 1, 1]


# ---- demo digits -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_splits():
    return demo.build_demo_splits(DemoDataConfig(seed=3))


def test_demo_splits_are_disjoint_stratified_and_sized():
    cfg = DemoDataConfig()
    images, labels = demo.load_digit_images(cfg.upsample)
    assert images.shape == (1797, 16, 16) and 0.0 <= images.min() and images.max() <= 1.0
    sizes = demo.split_sizes(cfg, len(labels), 10)
    rows = demo.stratified_split(labels, sizes, cfg.seed)
    assert {k: len(v) for k, v in rows.items()} == sizes
    assert sizes == {"pretrain": 449, "train": 629, "val": 323, "id_test": 396}
    everything = np.concatenate(list(rows.values()))
    assert len(np.unique(everything)) == len(everything) == 1797
    for name, r in rows.items():
        counts = np.bincount(labels[r], minlength=10)
        expected = np.bincount(labels, minlength=10) * len(r) / len(labels)
        assert np.all(np.abs(counts - expected) <= 1.5), name


def test_demo_split_contents(demo_splits):
    assert list(demo_splits)[:4] == ["pretrain", "train", "val", "id_test"]
    shifts = [s for s in demo_splits.values() if s.role == "ood"]
    assert len(shifts) >= 4 and {s.name for s in shifts} == {"noise", "blur", "rotate", "invert", "sketch"}
    test = demo_splits["id_test"]
    # no image appears in two in-distribution splits
    seen = [set(demo_splits[n].images) for n in ("pretrain", "train", "val", "id_test")]
    assert sum(len(s) for s in seen) == len(set().union(*seen))
    for s in shifts:
        assert s.labels == test.labels
        assert sum(a != b for a, b in zip(s.images, test.images)) > 0.9 * len(test.images)
    img = decode_image(test.images[0])
    assert img.size == (16, 16) and img.mode == "RGB"


def test_demo_is_byte_identical_for_the_same_seed(demo_splits):
    again = demo.build_demo_splits(DemoDataConfig(seed=3))
    assert {k: (v.images, v.labels) for k, v in again.items()} == \
           {k: (v.images, v.labels) for k, v in demo_splits.items()}
    other = demo.build_demo_splits(DemoDataConfig(seed=4, shifts=["noise"]))
    assert other["train"].images != demo_splits["train"].images
    assert set(other) == {"pretrain", "train", "val", "id_test", "noise"}


def test_demo_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="id_test"):
        demo.split_sizes(DemoDataConfig(pretrain=0.5, train=0.3, val=0.2), 1797, 10)
    with pytest.raises(ConfigError, match="data.demo.val"):
        load_config(None, ["data.demo.val=0.0"])


def test_write_demo_splits(tmp_path):
    cfg = DemoDataConfig(shifts=["rotate", "invert"])
    uris = demo.write_demo_splits(str(tmp_path / "data"), cfg, rows_per_shard=200)
    assert list(uris) == ["pretrain", "train", "val", "id_test", "rotate", "invert"]
    train = read_split(uris["train"])
    assert (train.role, train.class_names, train.num_rows) == ("train", demo.DIGIT_CLASSES, 629)
    assert len(shard_uris(uris["train"])) == 4
    assert read_split(uris["invert"]).role == "ood"


def test_import_can_shuffle_the_rows_reproducibly(tmp_path):
    src = image_folder(tmp_path / "src", {"cat": list(range(10)), "dog": list(range(10, 20))})
    plain = import_image_folder(src, str(tmp_path / "plain"))
    labels = read_split(str(tmp_path / "plain")).table.column("label").to_pylist()
    assert labels == [0] * 10 + [1] * 10
    runs = []
    for out in ("a", "b"):
        info = import_image_folder(src, str(tmp_path / out), shuffle_seed=3, rows_per_shard=8)
        runs.append(read_split(str(tmp_path / out)).table)
        assert info["num_rows"] == plain["num_rows"]
    assert runs[0].equals(runs[1])  # the seed fixes the order
    shuffled = runs[0].column("label").to_pylist()
    assert shuffled != labels and sorted(shuffled) == labels
    assert sorted(runs[0].column("image").to_pylist()) == \
        sorted(read_split(str(tmp_path / "plain")).table.column("image").to_pylist())


def test_import_holds_out_a_val_split_or_writes_neither(tmp_path, capsys, ray_local):
    from pipeline.cli import main

    src = image_folder(tmp_path / "src", {"cat": list(range(0, 50)), "dog": list(range(50, 100))})
    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    assert main(["import-images", src, "--out", train, "--role", "train", "--shuffle-seed", "1",
                 "--holdout", "0.1", "--holdout-out", val]) == 0
    assert "wrote 10 held-out images, role val" in capsys.readouterr().out
    a, b = read_split(train), read_split(val)
    assert (a.role, b.role, a.num_rows, b.num_rows) == ("train", "val", 90, 10)
    images = lambda s: s.table.column("image").to_pylist()  # noqa: E731
    assert not set(images(a)) & set(images(b)) and len(set(images(a)) | set(images(b))) == 100
    import_image_folder(src, str(tmp_path / "val2"), shuffle_seed=1, holdout=0.1, holdout_uri=str(tmp_path / "v2"))
    assert images(read_split(str(tmp_path / "v2"))) == images(b)  # the seed fixes the holdout
    with pytest.raises(DataError, match="holdout must lie in"):
        import_image_folder(src, str(tmp_path / "x"), holdout=0.1)
    # the main split cannot be written (its place is a file): the holdout is undone too
    (tmp_path / "blocked").write_text("a file, not a folder")
    with pytest.raises(Exception):
        import_image_folder(src, str(tmp_path / "blocked"), holdout=0.1, holdout_uri=str(tmp_path / "val3"))
    assert not storage.exists(str(tmp_path / "val3" / "dataset.json"))


def test_holdout_indices_take_the_images_torchvision_imagefolder_numbers_so(tmp_path):
    """Model soups' imagenet_98_idxs.npy is a 0/1 mask over ImageNet train in torchvision
    ImageFolder's order; their utils.py asserts held-out image 1000 is n01675722_4108.JPEG. On a
    1000-class tree of empty files named as ImageNet's (numbers that sort as strings), the
    listing's held-out images are ImageFolder's, and the assertion holds where the mask says so."""
    from torchvision.datasets.folder import make_dataset

    from pipeline.data.imagenet import imagenet_wnids
    from pipeline.data.images import list_labelled_files, read_holdout_indices

    wnids = list(imagenet_wnids())
    assert wnids.index("n01675722") == 38  # so held-out index 1000 = 38 * 26 + 12 is its 13th
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for w in wnids:
        (root / w).mkdir(parents=True)
        numbers = rng.choice(13000, 27, replace=False).tolist()
        if w == "n01675722":  # 12 names sort before "..._4108.JPEG" as strings, 14 after
            numbers = [*rng.choice(range(1000, 4000), 12, replace=False).tolist(), 4108,
                       *rng.choice(range(5000, 9999), 14, replace=False).tolist()]
        for n in numbers:
            (root / w / f"{w}_{n}.JPEG").touch()
    reference = [p for p, _ in make_dataset(str(root), {w: i for i, w in enumerate(wnids)}, extensions=(".jpeg",))]
    mask = np.zeros(len(reference))  # float, as the reference's file holds
    for w in wnids:  # 26 of 27 held out per class (the reference's 2 % is 26 a class)
        rows = [i for i, p in enumerate(reference) if f"/{w}/" in p]
        mask[rows] = 1
        mask[rows[-1] if w == "n01675722" else rng.choice(rows)] = 0
    np.save(tmp_path / "imagenet_98_idxs.npy", mask)

    listing = list_labelled_files(str(root), wnids)
    picked = read_holdout_indices(str(tmp_path / "imagenet_98_idxs.npy"), len(listing.files))
    assert [listing.files[i].uri for i in picked] == [reference[i] for i in np.flatnonzero(mask)]
    assert listing.files[picked[1000]].rel == "n01675722/n01675722_4108.JPEG"  # model soups' assertion
    # a list of indices works the same; a mask of another length, an index outside, one twice: refused
    (tmp_path / "idx.txt").write_text("\n".join(map(str, np.flatnonzero(mask))))
    assert read_holdout_indices(str(tmp_path / "idx.txt"), len(listing.files)) == picked
    np.save(tmp_path / "short.npy", mask[:-1])
    with pytest.raises(DataError, match="a mask of 26,999 entries, but the folder lists 27,000 images"):
        read_holdout_indices(str(tmp_path / "short.npy"), len(listing.files))
    (tmp_path / "bad.txt").write_text("3\n27000\n")
    with pytest.raises(DataError, match="index 27000 is outside"):
        read_holdout_indices(str(tmp_path / "bad.txt"), len(listing.files))
    (tmp_path / "twice.txt").write_text("3\n3\n")
    with pytest.raises(DataError, match="listed twice"):
        read_holdout_indices(str(tmp_path / "twice.txt"), len(listing.files))


def test_import_with_holdout_indices_records_how_val_was_drawn_and_the_order(tmp_path, capsys):
    from pipeline.cli import main

    src = image_folder(tmp_path / "src", {"cat": list(range(0, 10)), "dog": list(range(10, 20))})
    np.save(tmp_path / "mask.npy", np.array([1, 0] * 10))
    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    assert main(["import-images", src, "--out", train, "--role", "train", "--shuffle-seed", "3", "--serial",
                 "--holdout-indices", str(tmp_path / "mask.npy"), "--holdout-out", val]) == 0
    assert "wrote 10 held-out images, role val" in capsys.readouterr().out
    listing = [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(10)]  # folders, then files, sorted
    pixel = {f: (10 if f.startswith("dog") else 0) + int(f.split("/")[1].split(".")[0]) for f in listing}
    assert read_split(val).table.column("image").to_pylist() == [png(pixel[f]) for f in listing[0::2]]
    assert sorted(read_split(train).table.column("image").to_pylist()) == sorted(png(v) for v in range(1, 20, 2))
    info_train, info_val = split_info(train), split_info(val)
    assert (info_train["order"], info_train["shuffle_seed"], info_val["order"]) == ("shuffled", 3, "folders")
    assert info_val["holdout"]["method"] == "indices" and info_val["holdout"]["rows"] == 10
    assert import_image_folder(src, str(tmp_path / "plain"))["order"] == "folders"  # not shuffled: class by class
    with pytest.raises(DataError, match="not both"):
        import_image_folder(src, str(tmp_path / "x"), holdout=0.1, holdout_uri=val + "2",
                            holdout_indices=str(tmp_path / "mask.npy"))
