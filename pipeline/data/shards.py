"""Shard sets: the one on-disk form of every image split, local or on s3://.

A split at URI ``U`` is ``U/part-00000.parquet``, ``U/part-00001.parquet``, ... (columns
``image: binary`` = encoded PNG/JPEG bytes, ``label: int32``) and ``U/dataset.json``, written
last: a split without it is incomplete and refused. All IO goes through ``pipeline.storage``.
"""
from __future__ import annotations

import contextlib
import io
import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..config import ROLES
from ..errors import UserError

if TYPE_CHECKING:
    import torch

FORMAT = "frankensoup-shards-v1"
MARKER = "dataset.json"
METADATA_KEY = b"frankensoup"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32())])


class DataError(UserError, ValueError):
    """A shard set, image or image folder that cannot be used; the message names it."""


@dataclass
class Split:
    name: str
    role: str
    class_names: list[str]
    table: pa.Table
    uri: str

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def shard_file(index: int) -> str:
    return f"part-{index:05d}.parquet"


# ---- validation of what a caller hands us ---------------------------------------------------

def check_class_names(class_names: Any, where: str) -> list[str]:
    if not isinstance(class_names, list) or not class_names:
        raise DataError(f"{where}: class_names must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in class_names):
        raise DataError(f"{where}: class_names must all be non-empty strings")
    dupes = sorted({c for c in class_names if class_names.count(c) > 1})
    if dupes:
        raise DataError(f"{where}: duplicate class names {dupes}")
    return list(class_names)


def check_role(role: Any, where: str) -> str:
    if role not in ROLES:
        raise DataError(f"{where}: role {role!r} is not one of {list(ROLES)}")
    return role


def check_labels(labels: Sequence[int], num_classes: int, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{where}: labels must be a flat sequence of integers")
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise DataError(f"{where}: label {arr[bad[0]]} at row {bad[0]} is outside "
                        f"[0, {num_classes}) ({num_classes} class names)")
    return arr.astype(np.int32)


# ---- writing ---------------------------------------------------------------------------------

def _split_metadata(name: str, role: str, class_names: list[str]) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps({"name": name, "role": role, "class_names": class_names}).encode()}


def _shard_bytes(images: Sequence[bytes], labels: np.ndarray, metadata: dict[bytes, bytes], where: str) -> bytes:
    for i, b in enumerate(images):
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise DataError(f"{where}: image {i} is {type(b).__name__}, expected encoded bytes")
    table = pa.table({"image": pa.array([bytes(b) for b in images], pa.binary()),
                      "label": pa.array(labels, pa.int32())}, schema=SCHEMA.with_metadata(metadata))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _remove_split_files(uri: str) -> None:
    # marker first: from this moment the old split reads as incomplete, never as half-new
    storage.delete(storage.join(uri, MARKER))
    for name in storage.listdir(uri):
        if name.startswith("part-") and name.endswith(".parquet"):
            storage.delete(storage.join(uri, name))


def remove_split(uri: str) -> None:
    """Remove a split written by ``write_split`` (marker first), best effort: used to undo one
    when its companion failed, so the error that got us there is the one raised."""
    with contextlib.suppress(Exception):
        _remove_split_files(uri)


def _remove_quietly(uris: list[str]) -> None:
    # best effort: the error that got us here is the one the caller must see
    for uri in uris:
        with contextlib.suppress(Exception):
            storage.delete(uri)


def write_shard(uri: str, index: int, images: Sequence[bytes], labels: Sequence[int], *, name: str, role: str,
                class_names: list[str]) -> dict:
    """Write part ``index`` of the split at ``uri`` (its images and labels); returns the part's
    dataset.json entry. Several writers may write the parts of one split, each its own."""
    shard_uri = storage.join(uri, shard_file(index))
    label_arr = check_labels(labels, len(class_names), shard_uri)
    data = _shard_bytes(images, label_arr, _split_metadata(name, role, class_names), shard_uri)
    storage.write_bytes(shard_uri, data)
    # the shard's content hash: keys of work that read this split cost no read of the shards;
    # its size and version (mtime, or S3's ETag): a run's start tells a changed shard from one listing
    return {"file": shard_file(index), "num_rows": len(label_arr), "sha256": storage.sha256(data),
            **storage.stat_file(shard_uri)}


def finish_split(uri: str, shards: list[dict], *, name: str, role: str, class_names: list[str],
                 extra: dict | None = None) -> dict:
    """Write the split's dataset.json, the marker that makes its parts a split; returns it.
    ``extra``: more fields for it (an import's skipped files)."""
    info = {"format": FORMAT, "name": name, "role": role, "class_names": class_names,
            "num_rows": sum(s["num_rows"] for s in shards), "shards": shards, **(extra or {})}
    storage.write_json(storage.join(uri, MARKER), info)
    return info


def clear_split(uri: str) -> bool:
    """Remove the split at ``uri`` before a new one is written there; returns whether ``uri``
    existed (an undo then knows whether to remove the folder too)."""
    existed = storage.exists(uri)
    _remove_split_files(uri)
    return existed


def undo_split(uri: str, existed: bool) -> None:
    """Best effort: remove what a failed write left at ``uri`` (and ``uri`` itself if it is new)."""
    remove_split(uri)
    if not existed:
        _remove_quietly([uri])


def write_split(uri: str, images: Sequence[bytes], labels: Sequence[int], *, name: str, role: str,
                class_names: list[str], rows_per_shard: int = 512) -> dict:
    """Write a shard set (replacing any split at ``uri``); returns its dataset.json. On any
    failure the parts written so far are removed and the error re-raised."""
    class_names = check_class_names(class_names, uri)
    check_role(role, uri)
    if not isinstance(name, str) or not name:
        raise DataError(f"{uri}: name must be a non-empty string")
    if not isinstance(rows_per_shard, int) or rows_per_shard <= 0:
        raise DataError(f"{uri}: rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    if len(images) != len(labels):
        raise DataError(f"{uri}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{uri}: refusing to write a split with no images")
    label_arr = check_labels(labels, len(class_names), uri)

    existed = clear_split(uri)
    shards = []
    try:
        for index, start in enumerate(range(0, len(images), rows_per_shard)):
            stop = min(start + rows_per_shard, len(images))
            shards.append(write_shard(uri, index, images[start:stop], label_arr[start:stop], name=name, role=role,
                                      class_names=class_names))
        return finish_split(uri, shards, name=name, role=role, class_names=class_names)
    except BaseException:
        undo_split(uri, existed)
        raise


# ---- reading ---------------------------------------------------------------------------------

def _check_info(info: Any, where: str) -> dict:
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{where}: not a {FORMAT} dataset.json")
    missing = [k for k in ("name", "role", "class_names", "num_rows", "shards") if k not in info]
    if missing:
        raise DataError(f"{where}: missing fields {missing}")
    check_class_names(info["class_names"], where)
    check_role(info["role"], where)
    shards = info["shards"]
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{where}: 'shards' must be a non-empty list")
    for s in shards:
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_rows"), int)
        # a shard is a plain file name next to dataset.json, never a path elsewhere
        if not ok or posixpath.basename(s["file"]) != s["file"] or s["file"] in ("", ".", ".."):
            raise DataError(f"{where}: bad shard entry {s!r}")
    if sum(s["num_rows"] for s in shards) != info["num_rows"]:
        raise DataError(f"{where}: num_rows {info['num_rows']} is not the sum of its shards' rows")
    return info


def split_info(uri: str) -> dict:
    """The split's dataset.json, checked. A split without one is incomplete and refused."""
    marker = storage.join(uri, MARKER)
    if not storage.exists(marker):
        raise DataError(f"{uri} is not a complete shard set (no {MARKER})")
    try:
        info = storage.read_json(marker)
    except storage.StorageError as e:
        raise DataError(f"{marker}: unreadable: {e}") from e
    return _check_info(info, marker)


def split_content(uri: str, info: dict | None = None) -> str:
    """The key of what a split holds: its class names and each shard's content hash, from
    dataset.json alone (not the URI, so a copied output keeps its keys). A split written before
    shards carried their hash is hashed from its shards once per call."""
    from ..keys import digest

    info = info or split_info(uri)
    hashes = [s.get("sha256") or storage.sha256(storage.read_bytes(storage.join(uri, s["file"])))
              for s in info["shards"]]
    return digest({"class_names": info["class_names"], "shards": hashes,
                   "rows": [s["num_rows"] for s in info["shards"]]})


def changed_shards(uri: str, info: dict | None = None) -> list[str]:
    """The shards of a split whose content is no longer what dataset.json records, from one
    listing: a shard whose size and version (mtime on a disk, ETag on S3) still match is taken as
    unchanged; one that differs (or is missing) is hashed again. A shard rewritten with the same
    bytes (a copy, a touch) gets its new size and version recorded in dataset.json, best effort,
    so it is not hashed again."""
    info = info or split_info(uri)
    listing = storage.stat_files(uri)
    changed, refreshed = [], False
    for entry in info["shards"]:
        now = listing.get(entry["file"])
        if now is None:
            changed.append(entry["file"])
            continue
        if all(entry.get(k) == v for k, v in now.items()):
            continue
        if entry.get("sha256") is not None:
            data = storage.read_bytes(storage.join(uri, entry["file"]))
            if storage.sha256(data) != entry["sha256"]:
                changed.append(entry["file"])
                continue
        entry.update(now)  # same content (or a split from before hashes): remember how it looks now
        refreshed = True
    if refreshed and not changed:
        with contextlib.suppress(Exception):  # a read-only store: hashed again next time
            storage.write_json(storage.join(uri, MARKER), info)
    return changed


def shard_uris(uri: str) -> list[str]:
    """Full URIs of the split's parquet files, in order (for Ray Data's read_parquet)."""
    return [storage.join(uri, s["file"]) for s in split_info(uri)["shards"]]


def _read_shard(shard_uri: str, want_rows: int, class_names: list[str], sha256: str | None = None) -> pa.Table:
    data = storage.read_bytes(shard_uri)
    if sha256 is not None and storage.sha256(data) != sha256:
        # written around write_split: every key that names this split's content would be stale
        raise DataError(f"shard {shard_uri} is not the shard dataset.json records (sha256 differs): "
                        "rewrite the split with import-images or prepare")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow and storage raise several types; one message naming the shard
        raise DataError(f"shard {shard_uri} is unreadable: {e}") from e
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    if "class_names" in meta and meta["class_names"] != class_names:
        raise DataError(f"shard {shard_uri} belongs to a split with other class names")
    try:
        table = table.select(["image", "label"]).cast(SCHEMA)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"shard {shard_uri} does not have columns image: binary, label: int32 "
                        f"(has {table.schema.to_string(show_schema_metadata=False)!r})") from e
    if table.num_rows != want_rows:
        raise DataError(f"shard {shard_uri} has {table.num_rows} rows, dataset.json says {want_rows}")
    if table.column("image").null_count or table.column("label").null_count:
        raise DataError(f"shard {shard_uri} has missing images or labels")
    labels = table.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if bad.size:
        raise DataError(f"shard {shard_uri}: label {labels[bad[0]]} at row {bad[0]} is outside "
                        f"[0, {len(class_names)})")
    return table


def read_shard(uri: str, index: int, info: dict | None = None) -> pa.Table:
    """Shard ``index`` of the split at ``uri``, checked like ``read_split`` checks each."""
    info = info or split_info(uri)
    entry = info["shards"][index]
    return _read_shard(storage.join(uri, entry["file"]), entry["num_rows"], info["class_names"], entry.get("sha256"))


def read_split(uri: str) -> Split:
    """Read every shard listed in dataset.json into one table; each shard is checked."""
    info = split_info(uri)
    tables = [_read_shard(storage.join(uri, s["file"]), s["num_rows"], info["class_names"], s.get("sha256"))
              for s in info["shards"]]
    return Split(name=info["name"], role=info["role"], class_names=list(info["class_names"]),
                 table=pa.concat_tables(tables), uri=uri)


# ---- images ----------------------------------------------------------------------------------

def decode_image(data: bytes, source: str = "image"):
    """Encoded bytes -> RGB PIL image, fully decoded (so truncation is caught here)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes; one message naming the source
        raise DataError(f"{source}: cannot decode image: {e}") from e


def encode_png(image) -> bytes:
    """A PIL image or a uint8 array (H, W) / (H, W, 3) -> PNG bytes."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
            raise DataError(f"encode_png: expected a uint8 (H, W) or (H, W, 3) array, "
                            f"got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    sink = io.BytesIO()
    image.save(sink, format="PNG")
    return sink.getvalue()


def decode_split(split: Split, transform: Callable) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Decode a (small) split once: images (N, C, H, W) float after ``transform``, labels int64."""
    import torch

    if split.num_rows == 0:
        raise DataError(f"{split.uri}: split has no rows")
    images = [transform(decode_image(b, source=f"{split.uri} row {i}"))
              for i, b in enumerate(split.table.column("image").to_pylist())]
    labels = torch.from_numpy(split.table.column("label").to_numpy().astype(np.int64))
    return torch.stack(images).float(), labels
