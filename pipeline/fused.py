"""Using a published soup: ``load_fused(uri)`` -> (classifier, preprocessing, class names), and
``predict_files`` behind ``frankensoup predict URI IMAGES...``.

``uri`` may be an output_uri (follows soup/LATEST), its soup/ directory, a soup/<run-id>
directory or that run's fused/ directory; local, file:// or s3://."""
from __future__ import annotations

import json
import os
import tempfile

import torch

from . import storage
from .errors import UserError
from .model.classifier import Classifier
from .soup.publish import CLASSNAMES_FILE, FUSED_DIR, HEAD_FILE

CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
FUSED_FILES = (*CLIP_FILES, HEAD_FILE, CLASSNAMES_FILE)


class FusedModelError(UserError, ValueError):
    """A URI that holds no usable fused model; the message names it."""


def _is_fused_dir(uri: str) -> bool:
    return all(storage.exists(storage.join(uri, f)) for f in (CLIP_FILES[0], HEAD_FILE))


def _follow_latest(soup_uri: str) -> str | None:
    run_id = storage.read_pointer(storage.join(soup_uri, "LATEST"))
    return None if run_id is None else storage.join(soup_uri, run_id)


def locate(uri: str) -> tuple[str, str | None]:
    """(fused/ directory, run directory or None) for any of the accepted URIs."""
    candidates = [uri, storage.join(uri, FUSED_DIR)]
    for soup in (uri, storage.join(uri, "soup")):
        run = _follow_latest(soup)
        if run is not None:
            candidates.append(storage.join(run, FUSED_DIR))
    for c in candidates:
        if _is_fused_dir(c):
            run = c.rsplit("/", 1)[0] if storage.is_remote(c) else os.path.dirname(storage.resolve(c).path)
            return c, run if storage.exists(storage.join(run, "MANIFEST.json")) else None
    raise FusedModelError(f"{uri!r} holds no fused model: expected an output_uri with soup/LATEST, "
                          "a soup/<run-id> directory or its fused/ directory")


def _fetch(fused_uri: str, run_uri: str | None, local_dir: str) -> dict[str, bytes]:
    """Read the fused files (checked against the run's manifest when there is one) into
    ``local_dir``, where open_clip's local-dir: can read them."""
    manifest = storage.read_json(storage.join(run_uri, "MANIFEST.json"))["files"] if run_uri else {}
    out = {}
    for name in FUSED_FILES:
        data = storage.read_bytes(storage.join(fused_uri, name))
        want = manifest.get(f"{FUSED_DIR}/{name}")
        if want is not None and (len(data) != want["size"] or storage.sha256(data) != want["sha256"]):
            raise FusedModelError(f"{storage.join(fused_uri, name)!r} does not match its run's MANIFEST.json")
        with open(os.path.join(local_dir, name), "wb") as f:
            f.write(data)
        out[name] = data
    return out


def _head(data: bytes, source: str) -> torch.nn.Linear:
    from safetensors.torch import load

    try:
        tensors = load(data)
        weight, bias = tensors["weight"], tensors["bias"]
    except Exception as e:  # safetensors raises several types; one message naming the file
        raise FusedModelError(f"{source!r} is not a head checkpoint (weight, bias): {e}") from e
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def load_fused(uri: str):
    """A published fused model -> (classifier in eval mode, preprocess transform, class names).
    ``classifier(preprocess(pil_image)[None])`` gives logits over ``class_names``."""
    import open_clip

    fused_uri, run_uri = locate(uri)
    with tempfile.TemporaryDirectory(prefix="frankensoup-fused-") as tmp:
        files = _fetch(fused_uri, run_uri, tmp)
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
        except (RuntimeError, ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise FusedModelError(f"cannot load the CLIP in {fused_uri!r}: {e}") from e
    class_names = json.loads(files[CLASSNAMES_FILE])
    head = _head(files[HEAD_FILE], storage.join(fused_uri, HEAD_FILE))
    if head.out_features != len(class_names):
        raise FusedModelError(f"{fused_uri!r}: the head has {head.out_features} outputs but "
                              f"{CLASSNAMES_FILE} names {len(class_names)} classes")
    return Classifier(clip.visual, head).eval(), preprocess, class_names


def predict_files(uri: str, image_paths: list[str], top: int = 1) -> list[tuple[str, list[tuple[str, float]]]]:
    """Classify image files with a published fused model: (path, [(class, probability)] * top)."""
    from .data.shards import decode_image

    if top < 1:
        raise FusedModelError(f"--top must be >= 1, got {top}")
    classifier, preprocess, class_names = load_fused(uri)
    out = []
    for path in image_paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise FusedModelError(f"cannot read image {path!r}: {e.strerror}") from None
        image = preprocess(decode_image(data, source=path))[None]
        with torch.inference_mode():
            probs = classifier(image).softmax(dim=-1)[0]
        values, indices = probs.topk(min(top, len(class_names)))
        out.append((path, [(class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]))
    return out
