"""Ingredient checkpoints: classifiers as safetensors with metadata (format, architecture,
class names, preprocess), written and rebuilt. Reading files safely and loading tensors strictly
is checkpoint.py's; its names are part of this module's interface."""
from __future__ import annotations

import json
from typing import Any

import torch

from .. import storage
from .checkpoint import CheckpointError, load_state_strict, read_checkpoint
from .classifier import classifier_from_state
from .factory import model_config

__all__ = ["FORMAT", "RESERVED_KEYS", "CheckpointError", "check_finite", "decode_metadata", "load_classifier",
           "load_state_strict", "read_checkpoint", "save_classifier", "tensors_sha256"]

FORMAT = "frankensoup-classifier-v1"
# metadata keys save_classifier owns; `extra` may not overwrite them
RESERVED_KEYS = ("format", "model_name", "class_names", "preprocess", "model_cfg")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of tensors (names, dtypes, shapes, bytes). Unlike a safetensors file's
    sha256 it does not depend on the metadata's order, which safetensors does not fix."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """A checkpoint with NaN or inf weights poisons every mixture it enters: refuse it, naming
    the file and the first such tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf")


def save_classifier(uri: str, clf: torch.nn.Module, *, model_name: str, class_names: list[str],
                    preprocess: dict, extra: dict | None = None) -> bytes:
    """Write an ingredient checkpoint (``visual.*``, ``head.*`` + metadata); returns its bytes.
    ``extra`` values are stored JSON-encoded and come back decoded from `load_classifier`."""
    clashes = sorted(set(extra or {}) & set(RESERVED_KEYS))
    if clashes:
        raise ValueError(f"extra metadata may not set reserved keys {clashes}")
    head_rows = clf.head.weight.shape[0]
    if head_rows != len(class_names):
        raise ValueError(f"classifier has {head_rows} outputs but {len(class_names)} class names")
    meta = {"format": FORMAT, "model_name": model_name, "class_names": json.dumps(list(class_names)),
            "preprocess": json.dumps(preprocess), "model_cfg": json.dumps(model_config(model_name))}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    return storage.save_tensors(uri, clf.state_dict(), meta)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a plain string written by someone else


def decode_metadata(raw: dict[str, str], uri: str) -> dict[str, Any]:
    """Check the format tag and decode the JSON values of an ingredient's metadata."""
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{uri!r} is not a {FORMAT} checkpoint "
                              f"(format metadata: {raw.get('format')!r})")
    missing = [k for k in ("model_name", "class_names", "preprocess") if k not in raw]
    if missing:
        raise CheckpointError(f"{uri!r} lacks metadata {missing}")
    meta = {k: v if k in ("format", "model_name") else _decode(v) for k, v in raw.items()}
    if not isinstance(meta["class_names"], list):
        raise CheckpointError(f"{uri!r}: metadata class_names is not a JSON list")
    return meta


def load_classifier(uri: str):
    """An ingredient checkpoint -> (Classifier in eval mode, decoded metadata)."""
    tensors, raw = read_checkpoint(uri)
    meta = decode_metadata(raw, uri)
    clf = classifier_from_state(meta["model_name"], tensors, len(meta["class_names"]),
                                source=uri, model_cfg=meta.get("model_cfg"))
    return clf, meta
