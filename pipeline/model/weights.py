"""Checkpoints: ingredient classifiers as safetensors with metadata; legacy torch pickles only
through ``weights_only=True``. Nothing here ever unpickles arbitrary objects."""
from __future__ import annotations

import io
import json
import pickle
from typing import Any

import torch

from .. import storage
from ..errors import UserError

FORMAT = "frankensoup-classifier-v1"
LEGACY_SUFFIXES = (".pt", ".pth", ".bin")
# metadata keys save_classifier owns; `extra` may not overwrite them
RESERVED_KEYS = ("format", "model_name", "class_names", "preprocess", "model_cfg")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def _unwrap(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} dict out of a legacy checkpoint ({"state_dict": ...} allowed)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{uri!r} holds no state dict (a mapping of names to tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{uri!r}: entries that are not tensors: {not_tensors[:5]}")
    # DataParallel checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _refusal_reason(message: str) -> str:
    """The line of torch's weights_only error that says what was blocked."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    blocked = [line for line in lines if "unsupported" in line.lower()]
    return (blocked or lines or ["no reason given"])[0]


def _load_legacy(uri: str) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {uri!r}: its pickle needs more than tensors and plain containers, "
            f"so loading it could run code ({_refusal_reason(str(e))}); convert it to "
            f"safetensors where you trust it") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{uri!r} is not a readable torch checkpoint: {e}") from None
    return _unwrap(obj, uri)


def read_checkpoint(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, raw string metadata) of a .safetensors file or a legacy .pt/.pth/.bin."""
    lower = uri.lower()
    if lower.endswith(".safetensors"):
        return storage.load_tensors(uri)
    if lower.endswith(LEGACY_SUFFIXES):
        return _load_legacy(uri), {}
    raise CheckpointError(f"{uri!r}: unknown checkpoint format (use .safetensors, or a legacy "
                          f"{'/'.join(LEGACY_SUFFIXES)} state dict)")


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


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor of ``module`` from ``state``: same keys, same shapes, or CheckpointError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                   for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = [(f"{len(missing)} missing", missing), (f"{len(unexpected)} unexpected", unexpected),
                (f"{len(wrong_shape)} with the wrong shape", wrong_shape)]
    found = [f"{label} (first: {', '.join(keys[:3])})" for label, keys in problems if keys]
    if found:
        raise CheckpointError(f"checkpoint {source!r} does not fit the architecture: "
                              + "; ".join(found))
    module.load_state_dict(state, strict=True)


def save_classifier(uri: str, clf: torch.nn.Module, *, model_name: str, class_names: list[str],
                    preprocess: dict, extra: dict | None = None) -> bytes:
    """Write an ingredient checkpoint (``visual.*``, ``head.*`` + metadata); returns its bytes.
    ``extra`` values are stored JSON-encoded and come back decoded from `load_classifier`."""
    from .factory import model_config

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
    from .classifier import classifier_from_state  # classifier.py imports this module

    tensors, raw = read_checkpoint(uri)
    meta = decode_metadata(raw, uri)
    clf = classifier_from_state(meta["model_name"], tensors, len(meta["class_names"]),
                                source=uri, model_cfg=meta.get("model_cfg"))
    return clf, meta
