"""Shards changed behind dataset.json: told from one listing (size + mtime, or S3's ETag),
hashed again only when they look different; a changed demo shard is made again by prepare,
a changed imported one is refused naming it. On local disk and on the moto S3 server."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import clone_output
from pipeline import layout, storage
from pipeline.data import shards
from pipeline.prepare import check_splits_unchanged, run_prepare


def _images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [shards.encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


def _flip_one_byte(uri: str, at: int = 100) -> None:
    """Flip one byte of the file in place: same size, other content."""
    if storage.is_remote(uri):
        data = bytearray(storage.read_bytes(uri))
        data[at] ^= 0xFF
        storage.write_bytes(uri, bytes(data))
        return
    with open(uri, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def _write_split(uri: str) -> dict:
    return shards.write_split(uri, _images(6), [0, 1, 0, 1, 0, 1], name="shifted", role="ood",
                              class_names=["a", "b"], rows_per_shard=3)


def test_a_shard_changed_in_place_is_found_from_a_listing(storage_root):
    uri = storage.join(storage_root, "split")
    info = _write_split(uri)
    assert all({"size", "version"} <= set(s) for s in info["shards"])
    assert shards.changed_shards(uri) == []
    original = storage.read_bytes(storage.join(uri, "part-00001.parquet"))
    _flip_one_byte(storage.join(uri, "part-00001.parquet"))
    assert shards.changed_shards(uri) == ["part-00001.parquet"]
    # the same bytes written again (a copy, a restore) are hashed once, then known by their new look
    storage.write_bytes(storage.join(uri, "part-00001.parquet"), original)
    assert shards.changed_shards(uri) == []
    assert storage.stat_file(storage.join(uri, "part-00001.parquet")) == {
        k: v for k, v in shards.split_info(uri)["shards"][1].items() if k in ("size", "version")}
    storage.delete(storage.join(uri, "part-00000.parquet"))
    assert shards.changed_shards(uri) == ["part-00000.parquet"]


def test_a_changed_imported_shard_is_refused_naming_it(prepared_demo, storage_root, tmp_path):
    uri = storage.join(storage_root, "shifted")
    _write_split(uri)
    cfg = clone_output(prepared_demo, tmp_path / "out", f"data.splits.shifted.uri={uri}",
                       "data.splits.shifted.role=ood")
    check_splits_unchanged(cfg)
    _flip_one_byte(storage.join(uri, "part-00000.parquet"))
    with pytest.raises(shards.DataError, match=rf"split shifted: shard {uri}/part-00000.parquet changed since its "
                                               r"dataset.json was written .*import the split again"):
        check_splits_unchanged(cfg)
    with pytest.raises(shards.DataError, match="part-00000.parquet changed"):
        run_prepare(cfg, log=lambda *_: None)


def test_a_changed_demo_shard_is_made_again_by_prepare(prepared_demo, tmp_path):
    cfg = clone_output(prepared_demo, tmp_path / "out")
    val = layout.data_uri(cfg, "val")
    shard = storage.join(val, "part-00000.parquet")
    original = storage.read_bytes(shard)
    key_before = shards.split_content(val)
    _flip_one_byte(shard)
    with pytest.raises(shards.DataError, match=r"split val: .*part-00000.parquet changed .*frankensoup prepare"):
        check_splits_unchanged(cfg)
    lines: list[str] = []
    marker = run_prepare(cfg, log=lines.append)
    assert any("demo shards changed since they were written (val: part-00000.parquet)" in line for line in lines), lines
    assert storage.read_bytes(shard) == original and shards.split_content(val) == key_before
    assert marker["computed"] == 1  # the shards; the base and zero-shot head are reused
    check_splits_unchanged(cfg)


def test_an_uploaded_split_is_hashed_once_then_known_by_its_etags(s3_bucket, tmp_path):
    from conftest import upload

    local = str(tmp_path / "split")
    _write_split(local)
    uri = f"{s3_bucket}/uploaded-split"
    upload(local, uri)  # other timestamps, S3 ETags: the first check hashes and records them
    assert shards.changed_shards(uri) == []
    assert [s["version"] for s in shards.split_info(uri)["shards"]] == [
        storage.stat_file(storage.join(uri, s["file"]))["version"] for s in shards.split_info(uri)["shards"]]
