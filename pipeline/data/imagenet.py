"""What the ImageNet family of test sets needs beyond plain image folders, taken from the libraries
that already ship it: the 1,000 class ids (WordNet ids, timm), the readable names CLIP's prompts
use (OpenAI's curated list, open_clip), the 200-class subsets of ImageNet-R and -A (timm), and
ObjectNet's class map, read from the ``mappings/`` folder ObjectNet ships with its images.

Class ids are WordNet ids (``n01440764``): the folder names of ImageNet, -Sketch, -R and -A,
unique where readable names are not (OpenAI's list names two classes ``missile``).
See docs/data.md.
"""
from __future__ import annotations

import json
import pkgutil
from functools import lru_cache

from .. import storage
from .shards import DataError

# the files of ObjectNet's `mappings/` folder this module reads
OBJECTNET_FILES = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                   "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")


def _timm_list(name: str) -> list[str]:
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    if data is None:
        raise RuntimeError(f"timm ships no _info/{name}")
    return data.decode("utf-8").split()


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class ids in label order (sorted, as torchvision's ImageFolder gives)."""
    wnids = tuple(_timm_list("imagenet_synsets.txt"))
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    return wnids


@lru_cache(maxsize=None)
def subset_wnids(name: str) -> tuple[str, ...]:
    """The class ids of ``imagenet-r`` or ``imagenet-a`` (200 each), in label order."""
    files = {"imagenet-r": "imagenet_r_synsets.txt", "imagenet-a": "imagenet_a_synsets.txt"}
    if name not in files:
        raise ValueError(f"unknown ImageNet subset {name!r}; known: {sorted(files)}")
    return tuple(sorted(_timm_list(files[name])))


@lru_cache(maxsize=None)
def imagenet_prompt_names() -> dict[str, str]:
    """Class id -> the readable name CLIP's ImageNet prompts use (OpenAI's curated names)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return dict(zip(imagenet_wnids(), IMAGENET_CLASSNAMES, strict=True))


PROMPT_NAME_SETS = {"imagenet": imagenet_prompt_names}


def prompt_names(class_names: list[str], names: str | dict[str, str] | None) -> list[str]:
    """The words the prompt templates get for each class: the class name itself, or its entry in
    ``names`` (a mapping, or the name of a built-in set such as ``imagenet``)."""
    if names is None:
        return list(class_names)
    if isinstance(names, str):
        if names not in PROMPT_NAME_SETS:
            raise DataError(f"model.prompt_names: unknown set {names!r}; known: {sorted(PROMPT_NAME_SETS)}")
        table, what = PROMPT_NAME_SETS[names](), f"the {names!r} prompt names"
    else:
        table, what = names, "model.prompt_names"
    missing = [c for c in class_names if c not in table]
    if missing:
        raise DataError(f"{what} lack the classes {missing[:5]} ({len(missing)} of {len(class_names)})")
    return [table[c] for c in class_names]


# ---- ObjectNet ------------------------------------------------------------------------------

def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as e:
        raise DataError(f"ObjectNet mapping file: {e}") from None


def _read_json(uri: str) -> dict:
    try:
        value = json.loads(_read(uri))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"ObjectNet mapping file {uri} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise DataError(f"ObjectNet mapping file {uri} must hold a JSON object")
    return value


def objectnet_class_map(mappings_uri: str) -> dict[str, list[str]]:
    """ObjectNet folder name -> the ImageNet class ids it stands for (113 folders), read from
    ObjectNet's own ``mappings/`` folder (local or s3://).

    ``objectnet_to_imagenet_1k.json`` gives, per ObjectNet label, ImageNet labels joined by "; ";
    an ImageNet label is a line of ``imagenet_to_label_2012_v2`` (line i: ILSVRC-2012 id i),
    ``pytorch_to_imagenet_2012_id.json`` takes a label index (sorted class ids) to that id, and
    ``folder_to_objectnet_label.json`` names each ObjectNet label's image folder."""
    uri = lambda name: storage.join(mappings_uri, name)  # noqa: E731
    folder_of = {label: folder for folder, label in _read_json(uri(OBJECTNET_FILES[0])).items()}
    to_imagenet = _read_json(uri(OBJECTNET_FILES[1]))
    index_of_2012 = {}
    for index, id_2012 in _read_json(uri(OBJECTNET_FILES[2])).items():
        try:
            index_of_2012[int(id_2012)] = int(index)
        except (TypeError, ValueError):
            raise DataError(f"{uri(OBJECTNET_FILES[2])}: entry {index!r}: {id_2012!r} is not an integer pair") from None
    try:
        lines = _read(uri(OBJECTNET_FILES[3])).decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"ObjectNet mapping file {uri(OBJECTNET_FILES[3])} is not UTF-8 text: {e}") from None
    wnids = imagenet_wnids()
    index_of_label: dict[str, int | None] = {}
    for id_2012, label in enumerate(lines):
        label = label.strip()
        if id_2012 not in index_of_2012 or not 0 <= index_of_2012[id_2012] < len(wnids):
            raise DataError(f"{uri(OBJECTNET_FILES[2])} gives no label index for ImageNet 2012 id {id_2012}")
        # a label written twice names no class (it is never looked up in ObjectNet's map)
        index_of_label[label] = None if label in index_of_label else index_of_2012[id_2012]

    class_map: dict[str, list[str]] = {}
    for label, imagenet_labels in to_imagenet.items():
        if label not in folder_of:
            raise DataError(f"{uri(OBJECTNET_FILES[1])}: ObjectNet label {label!r} has no folder "
                            f"in {OBJECTNET_FILES[0]}")
        targets = []
        for name in str(imagenet_labels).split("; "):
            if index_of_label.get(name, -1) is None:
                raise DataError(f"{uri(OBJECTNET_FILES[1])}: ImageNet label {name!r} (for {label!r}) "
                                f"is ambiguous: {OBJECTNET_FILES[3]} lists it twice")
            if name not in index_of_label:
                raise DataError(f"{uri(OBJECTNET_FILES[1])}: ImageNet label {name!r} (for {label!r}) "
                                f"is not a line of {OBJECTNET_FILES[3]}")
            targets.append(wnids[index_of_label[name]])
        class_map[folder_of[label]] = targets
    return dict(sorted(class_map.items()))
