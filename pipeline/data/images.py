"""Import an image folder ``DIR/<class folder>/<file>`` (png/jpg/jpeg) as a shard set.

Everything is checked before anything is written: every image must decode, every class folder
must hold images and be a known class. Images are stored as their original encoded bytes.
"""
from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass
from typing import Sequence

from .. import storage
from .shards import DataError, check_class_names, check_role, decode_image, remove_split, write_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class LabelledFile:
    uri: str
    label: int


class FileBytes(Sequence):
    """The bytes of a list of files, read when a shard asks for them, so a large folder never
    sits in memory whole."""

    def __init__(self, uris: list[str]):
        self.uris = uris

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [storage.read_bytes(u) for u in self.uris[i]]
        return storage.read_bytes(self.uris[i])


def _visible(name: str) -> bool:
    # hidden entries (.DS_Store, .ipynb_checkpoints) are tool litter, not data
    return not name.startswith(".")


def class_folders(src_dir: str) -> list[str]:
    """Names of the visible subfolders of ``src_dir``, sorted; there must be at least one."""
    if not storage.is_dir(src_dir):
        raise DataError(f"image folder {src_dir} does not exist or is not a directory")
    folders = [n for n in storage.listdir(src_dir) if _visible(n) and storage.is_dir(storage.join(src_dir, n))]
    if not folders:
        raise DataError(f"image folder {src_dir} has no class subfolders (expected DIR/<classname>/<image>)")
    return folders


def image_files(folder_uri: str) -> list[str]:
    """URIs of the image files directly in one class folder, sorted by name."""
    return [storage.join(folder_uri, n) for n in storage.listdir(folder_uri)
            if _visible(n) and n.lower().endswith(IMAGE_SUFFIXES)
            and not storage.is_dir(storage.join(folder_uri, n))]


def list_labelled_files(src_dir: str, class_names: list[str], folder_classes: dict[str, str] | None = None,
                        only_listed: bool = False) -> tuple[list[LabelledFile], list[str]]:
    """Every image under ``src_dir`` with its label (index in ``class_names``), and the folders
    skipped; checks the layout. A folder's class is its name, or its entry in ``folder_classes``;
    a folder of no known class is an error, or skipped with ``only_listed``."""
    folders = class_folders(src_dir)
    index = {c: i for i, c in enumerate(class_names)}
    found: list[LabelledFile] = []
    skipped: list[str] = []
    for folder in folders:
        folder_uri = storage.join(src_dir, folder)
        cls = folder if folder_classes is None else folder_classes.get(folder)
        if cls not in index:
            if only_listed:
                skipped.append(folder)
                continue
            raise DataError(f"class folder {folder_uri} is not one of the given "
                            f"{'folders' if folder_classes is not None else 'class names'}")
        files = image_files(folder_uri)
        if not files:
            raise DataError(f"class folder {folder_uri} has no images ({'/'.join(IMAGE_SUFFIXES)})")
        found += [LabelledFile(u, index[cls]) for u in files]
    if not found:
        raise DataError(f"image folder {src_dir} has no folder of the given classes")
    return found, skipped


def read_class_list(uri: str) -> tuple[list[str], dict[str, str] | None]:
    """A class list file: one class name per line (label order), or ``FOLDER<TAB>CLASS`` lines
    (labels in the order classes first appear). Returns (class_names, folder_classes or None)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except storage.StorageError as e:
        raise DataError(f"class list: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"class list {uri} is not UTF-8 text: {e}") from None
    lines = [(n, line.strip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    tabbed = {"\t" in line for _, line in lines}
    if len(tabbed) > 1:
        raise DataError(f"class list {uri}: mixes 'CLASS' and 'FOLDER<TAB>CLASS' lines")
    if tabbed != {True}:
        return [line.strip() for _, line in lines], None
    folders: dict[str, str] = {}
    for n, line in lines:
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"class list {uri} line {n}: expected 'FOLDER<TAB>CLASS', got {line!r}")
        if parts[0] in folders:
            raise DataError(f"class list {uri} line {n}: folder {parts[0]!r} is listed twice")
        folders[parts[0]] = parts[1]
    return list(dict.fromkeys(folders.values())), folders


def verify_images(files: list[LabelledFile]) -> None:
    """Decode every image once; the first that fails is named."""
    for f in files:
        decode_image(storage.read_bytes(f.uri), source=f.uri)


def import_image_folder(src_dir: str, out_uri: str, *, name: str | None = None, role: str = "ood",
                        class_names: list[str] | None = None, folder_classes: dict[str, str] | None = None,
                        only_listed: bool = False, shuffle_seed: int | None = None,
                        holdout: float = 0.0, holdout_uri: str | None = None,
                        rows_per_shard: int = 512) -> dict:
    """Turn ``src_dir/<folder>/<image>`` into a shard set at ``out_uri``; returns its
    dataset.json plus ``skipped_folders``. A folder's class is its name, or its entry in
    ``folder_classes`` (e.g. ImageNet-V2's ``0`` .. ``999`` -> WordNet ids). Labels follow
    ``class_names`` (default: the sorted classes found), so sets with the same class list get the
    same labels; with ``class_names`` given, a subset of the classes may be present. With
    ``only_listed``, folders of no given class are skipped instead of refused. Rows are written
    folder by folder, or in an order shuffled by ``shuffle_seed``: what a train set streamed
    shard by shard needs (docs/finetune.md). ``holdout``: this fraction of the images, drawn
    with ``shuffle_seed`` (or 0), goes to a ``val`` split at ``holdout_uri`` instead (model
    soups' 2 % of ImageNet train); both splits are written, or neither."""
    check_role(role, f"import {src_dir}")
    if not 0.0 <= holdout < 1.0 or (holdout > 0) != (holdout_uri is not None):
        raise DataError(f"import {src_dir}: holdout must lie in [0, 1) and come with a holdout URI "
                        f"(got {holdout} and {holdout_uri!r})")
    if class_names is None:
        if folder_classes is not None:
            class_names = sorted(set(folder_classes.values()))
        else:
            class_names = class_folders(src_dir)
    class_names = check_class_names(class_names, f"import {src_dir}")
    files, skipped = list_labelled_files(src_dir, class_names, folder_classes, only_listed)
    verify_images(files)
    if shuffle_seed is not None:
        order = random.Random(shuffle_seed).sample(range(len(files)), len(files))
        files = [files[i] for i in order]
    name = name or posixpath.basename(src_dir.rstrip("/").rstrip("\\")) or "images"
    held: list[LabelledFile] = []
    if holdout > 0:
        picked = set(random.Random(shuffle_seed or 0).sample(range(len(files)), round(holdout * len(files))))
        if not picked or len(picked) == len(files):
            raise DataError(f"import {src_dir}: a holdout of {holdout} of {len(files)} images leaves a split empty")
        held = [f for i, f in enumerate(files) if i in picked]
        files = [f for i, f in enumerate(files) if i not in picked]
        write_split(holdout_uri, FileBytes([f.uri for f in held]), [f.label for f in held],
                    name=f"{name}-holdout", role="val", class_names=class_names, rows_per_shard=rows_per_shard)
    try:
        info = write_split(out_uri, FileBytes([f.uri for f in files]), [f.label for f in files],
                           name=name, role=role, class_names=class_names, rows_per_shard=rows_per_shard)
    except BaseException:
        if held:
            remove_split(holdout_uri)
        raise
    return {**info, "skipped_folders": skipped, "holdout_rows": len(held)}
