"""Import an image folder ``DIR/<classname>/<file>`` (png/jpg/jpeg) as a shard set.

Everything is checked before anything is written: every image must decode, every class folder
must hold images and be a known class. Images are stored as their original encoded bytes.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Sequence

from .. import storage
from .shards import DataError, check_class_names, check_role, decode_image, write_split

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


def list_labelled_files(src_dir: str, class_names: list[str]) -> list[LabelledFile]:
    """Every image under ``src_dir`` with its label (index in ``class_names``); checks the layout."""
    folders = class_folders(src_dir)
    index = {c: i for i, c in enumerate(class_names)}
    found: list[LabelledFile] = []
    for folder in folders:
        folder_uri = storage.join(src_dir, folder)
        if folder not in index:
            raise DataError(f"class folder {folder_uri} is not one of the given class names")
        files = image_files(folder_uri)
        if not files:
            raise DataError(f"class folder {folder_uri} has no images ({'/'.join(IMAGE_SUFFIXES)})")
        found += [LabelledFile(u, index[folder]) for u in files]
    return found


def verify_images(files: list[LabelledFile]) -> None:
    """Decode every image once; the first that fails is named."""
    for f in files:
        decode_image(storage.read_bytes(f.uri), source=f.uri)


def import_image_folder(src_dir: str, out_uri: str, *, name: str | None = None, role: str = "ood",
                        class_names: list[str] | None = None, rows_per_shard: int = 512) -> dict:
    """Turn ``src_dir/<classname>/<image>`` into a shard set at ``out_uri``; returns its
    dataset.json. Labels follow ``class_names`` (default: the sorted folder names), so folders
    with the same classes get the same labels; with ``class_names`` given, a subset of the
    classes may be present."""
    check_role(role, f"import {src_dir}")
    if class_names is None:
        class_names = class_folders(src_dir)
    class_names = check_class_names(class_names, f"import {src_dir}")
    files = list_labelled_files(src_dir, class_names)
    verify_images(files)
    name = name or posixpath.basename(src_dir.rstrip("/").rstrip("\\")) or "images"
    return write_split(out_uri, FileBytes([f.uri for f in files]), [f.label for f in files],
                       name=name, role=role, class_names=class_names, rows_per_shard=rows_per_shard)
