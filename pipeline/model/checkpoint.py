"""Checkpoint files read safely: safetensors, and legacy torch pickles only through
``weights_only=True`` (nothing here ever unpickles arbitrary objects); their tensors loaded into
a module strictly. Below the factory and the classifier, which load weights with it."""
from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from .. import storage
from ..errors import UserError

LEGACY_SUFFIXES = (".pt", ".pth", ".bin")


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
