"""Publishing a soup result: ``output_uri/soup/<run-id>/`` written in full, verified against a
manifest, and only then named by ``soup/LATEST``. A crash before the pointer moves leaves the
previous result (and LATEST) in force, and the half-written directory is removed."""
from __future__ import annotations

import json
import time

import torch

from .. import layout, storage
from ..config import Config
from ..model import factory
from ..model.weights import load_state_strict

FUSED_DIR = "fused"
HEAD_FILE = "head.safetensors"
CLASSNAMES_FILE = "classnames.json"
HEAD_FORMAT = "frankensoup-head-v1"


def make_run_id(key: str, now: float | None = None) -> str:
    """Timestamp (sortable) + the soup key, so a run-id says when and from what inputs."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{key[:8]}"


def run_uri(cfg: Config, run_id: str) -> str:
    return storage.join(layout.soup_root(cfg), run_id)


def fused_clip(base_clip: torch.nn.Module, classifier_state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The base CLIP with its image tower replaced by the fused classifier's ``visual.*``
    (the text tower stays the base model's). Modifies and returns ``base_clip``."""
    visual = {k[len("visual."):]: v for k, v in classifier_state.items() if k.startswith("visual.")}
    load_state_strict(base_clip.visual, visual, source)
    return base_clip


def head_bytes(classifier_state: dict[str, torch.Tensor], model_name: str, class_names: list[str]) -> bytes:
    from safetensors.torch import save

    tensors = {"weight": classifier_state["head.weight"].contiguous(),
               "bias": classifier_state["head.bias"].contiguous()}
    return save(tensors, metadata={"format": HEAD_FORMAT, "model_name": model_name,
                                   "class_names": json.dumps(list(class_names))})


def fused_files(base_clip: torch.nn.Module, model_name: str, preprocess: dict,
                classifier_state: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, bytes]:
    """``fused/`` as bytes: a full CLIP open_clip loads with ``local-dir:``, the head, class names."""
    clip = fused_clip(base_clip, classifier_state, "the fused classifier")
    files = {f"{FUSED_DIR}/{name}": data for name, data in factory.clip_files(clip, model_name, preprocess).items()}
    files[f"{FUSED_DIR}/{HEAD_FILE}"] = head_bytes(classifier_state, model_name, class_names)
    files[f"{FUSED_DIR}/{CLASSNAMES_FILE}"] = json.dumps(list(class_names), indent=2).encode()
    return files


def publish_run(cfg: Config, run_id: str, files: dict[str, bytes]) -> str:
    """Write ``files`` under soup/<run-id>/, verify them, write MANIFEST.json, then move LATEST.
    On any failure the run directory is removed and LATEST is untouched."""
    dest = run_uri(cfg, run_id)
    if storage.exists(dest):
        raise storage.StorageError(f"{dest!r} exists already: a run-id is never reused")
    try:
        # the pointer moves only once the whole directory is verified and has its manifest
        storage.publish(files, dest, layout.latest_pointer(cfg), run_id)
    except BaseException:
        _remove_quietly(dest)
        raise
    return dest


def _remove_quietly(uri: str) -> None:
    try:
        storage.delete(uri)
    except Exception:  # cleaning up after a failure must not hide the failure itself
        pass


def latest_run(cfg: Config) -> str | None:
    return storage.read_pointer(layout.latest_pointer(cfg))


def read_report(cfg: Config, run_id: str | None = None) -> dict | None:
    """report.json of a run (default: the one LATEST names), or None when there is none."""
    run_id = run_id or latest_run(cfg)
    if run_id is None:
        return None
    return storage.read_json(storage.join(run_uri(cfg, run_id), "report.json"))
