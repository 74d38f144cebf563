"""Content keys, as a build system keys its work: a unit of work (a base model, a trained
ingredient, a score, a search evaluation) is named by a hash of the content hashes it read and
the settings that change its result. Equal key: reuse. Any input changed: another key, so a
stale result can never be mistaken for a current one. See docs/design.md ("Keys")."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

KEY_LENGTH = 32  # hex digits: 128 bits, no accidental collision in any realistic run


def digest(obj: Any) -> str:
    """The key of a JSON-able value: sha256 of its canonical JSON (sorted keys, no spaces)."""
    try:
        blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot key {type(obj).__name__}: {e}") from None
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def is_neutral(model: type[BaseModel], field: str) -> bool:
    """A field marked ``neutral`` changes how fast work runs or where, never what it produces."""
    extra = model.model_fields[field].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("neutral"))


def result_settings(section: BaseModel) -> dict:
    """A config section as the key of its results sees it: every field but the neutral ones,
    recursively."""
    out = {}
    for name in type(section).model_fields:
        if is_neutral(type(section), name):
            continue
        value = getattr(section, name)
        out[name] = result_settings(value) if isinstance(value, BaseModel) else _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return result_settings(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
