"""open_clip by name: the demo architecture, model creation from any weights source, the
preprocess config, transforms, tokenizers, and a save format open_clip itself can load
(``local-dir:``)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip import CLIP
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from safetensors.torch import save as safetensors_bytes

from .. import storage
from .checkpoint import CheckpointError, load_state_strict, read_checkpoint

DEMO_MODEL = "frankensoup-demo-vit"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")

# architectures are data: our JSON configs join open_clip's registry on import
_CONFIG_DIR = Path(__file__).parent / "configs"
if DEMO_MODEL not in open_clip.list_models():
    open_clip.add_model_config(_CONFIG_DIR)


def model_config(name: str) -> dict:
    """open_clip's architecture config for a registered name or a ``local-dir:`` path."""
    try:
        cfg = open_clip.get_model_config(name)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model {name!r}: cannot read its open_clip config: {e}") from e
    if cfg is None:
        raise CheckpointError(f"unknown model name {name!r}: not an open_clip architecture "
                              f"(see open_clip.list_models()) nor a 'local-dir:' path")
    return cfg


def preprocess_of(model: torch.nn.Module) -> dict:
    """The model's preprocess config as plain JSON data (size as an int when square)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = [int(s) for s in size] if isinstance(size, (tuple, list)) else int(size)
    if isinstance(size, list) and size[0] == size[1]:
        size = size[0]
    return {
        "size": size,
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }


def image_transform(preprocess: dict, train: bool = False):
    """open_clip's PIL -> normalised tensor transform for a preprocess dict."""
    missing = [k for k in ("size", "mean", "std") if k not in preprocess]
    if missing:
        raise ValueError(f"preprocess config {preprocess!r} lacks {missing}")
    cfg = merge_preprocess_dict(PreprocessCfg(), preprocess)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=train)


def tokenizer_for(name: str):
    """The tokenizer belonging to a model name (the stock BPE ships inside open_clip)."""
    return open_clip.get_tokenizer(name)


def _random_clip(name: str) -> CLIP:
    model_config(name)  # a clear error for unknown names before open_clip's own
    return open_clip.create_model(name, pretrained=None)


def _load_weights_file(model: CLIP, uri: str) -> None:
    tensors, _ = read_checkpoint(uri)
    load_state_strict(model, tensors, uri)


def create_clip(name: str, pretrained: str | None = None) -> tuple[CLIP, dict]:
    """Build open_clip model ``name`` and return (model in eval mode, preprocess dict).

    ``pretrained``: None (random init), a directory written by `save_clip`, a weights file
    (safetensors, or legacy .pt/.pth/.bin read with weights_only), or an open_clip tag."""
    if pretrained is None:
        model = _random_clip(name)
    elif pretrained == "demo":
        raise CheckpointError("pretrained='demo' names the base model that `prepare` makes; "
                              "resolve it to that directory before calling create_clip")
    elif storage.exists(pretrained) and storage.is_dir(pretrained):
        _check_same_architecture(name, pretrained)
        return load_clip(pretrained)
    elif storage.exists(pretrained):
        model = _random_clip(name)
        _load_weights_file(model, pretrained)
    elif open_clip.get_pretrained_cfg(name, pretrained):
        # an open_clip tag: open_clip downloads and caches the weights itself
        model = open_clip.create_model(name, pretrained=pretrained)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise CheckpointError(f"pretrained={pretrained!r} for model {name!r} is neither a "
                              f"directory, a weights file nor an open_clip tag (tags: {tags})")
    return model.eval(), preprocess_of(model)


def _require_clip_dir(dir_uri: str) -> None:
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if not storage.exists(storage.join(dir_uri, fname)):
            raise CheckpointError(f"{dir_uri!r} is not a saved CLIP directory: {fname} is missing")


def _check_same_architecture(name: str, dir_uri: str) -> None:
    _require_clip_dir(dir_uri)
    saved = storage.read_json(storage.join(dir_uri, CONFIG_FILE)).get("model_cfg")
    if saved is None:
        raise CheckpointError(f"{storage.join(dir_uri, CONFIG_FILE)!r} lacks 'model_cfg'")
    try:
        wanted = open_clip.get_model_config(name)
    except (OSError, ValueError):
        wanted = None
    # an unregistered name cannot be compared; the directory's own config decides
    if wanted is not None and wanted != saved:
        raise CheckpointError(f"{dir_uri!r} holds a different architecture than model {name!r}")


def clip_files(model: CLIP, name: str, preprocess: dict) -> dict[str, bytes]:
    """The two files of a `save_clip` directory as bytes (for `storage.publish`)."""
    config = {"model_cfg": model_config(name),
              "preprocess_cfg": {k: preprocess[k] for k in PREPROCESS_KEYS if k in preprocess}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(),
            WEIGHTS_FILE: safetensors_bytes(tensors, metadata={"format": "pt"})}


def save_clip(dir_uri: str, model: CLIP, name: str, preprocess: dict) -> dict[str, bytes]:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` under ``dir_uri``;
    a local copy loads with ``open_clip.create_model("local-dir:<dir>")``."""
    files = clip_files(model, name, preprocess)
    for fname, data in files.items():
        storage.write_bytes(storage.join(dir_uri, fname), data)
    return files


def load_clip(dir_uri: str) -> tuple[CLIP, dict]:
    """Load a `save_clip` directory (local, file:// or s3://) -> (model in eval mode, preprocess)."""
    _require_clip_dir(dir_uri)
    with tempfile.TemporaryDirectory(prefix="frankensoup-clip-") as tmp:
        local = _local_copy(dir_uri, tmp)
        try:
            model = open_clip.create_model(f"local-dir:{local}")
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot load CLIP from {dir_uri!r}: {e}") from e
    return model.eval(), preprocess_of(model)


def _local_copy(dir_uri: str, tmp: str) -> str:
    """A local directory holding just our two files (open_clip reads only local paths)."""
    loc = storage.resolve(dir_uri)
    if not storage.is_remote(dir_uri):
        return loc.path
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        with open(os.path.join(tmp, fname), "wb") as f:
            f.write(storage.read_bytes(storage.join(dir_uri, fname)))
    return tmp
