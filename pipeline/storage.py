"""Everything a run writes goes through here: URIs -> pyarrow.fs, safetensors IO, atomic publish.

A URI is a local path or a URI of one of ``SCHEMES`` (``file://``, ``s3://``). ``s3://`` honours
``AWS_ENDPOINT_URL`` (and the usual AWS_* credentials), so the same code talks to AWS or to
an S3-compatible server.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from .errors import UserError


class StorageError(UserError, RuntimeError):
    """A storage URI that cannot be read or written; the message names the URI."""


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str
    uri: str


# The URI schemes a run can use, one line each (pyarrow.fs opens them): scheme -> whether it is
# object storage, reached over the network and seen alike by every node (False: this machine's
# files). A path without a scheme is local. Config checks and messages read this table.
SCHEMES: dict[str, bool] = {
    "file": False,
    "s3": True,
}


def scheme_names() -> str:
    """The schemes for a message: ``file:// or s3://``."""
    names = [f"{s}://" for s in SCHEMES]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def is_remote(uri: str) -> bool:
    """Object storage (``SCHEMES``), not a path on this machine."""
    return "://" in uri and SCHEMES.get(uri.split("://", 1)[0], True)


def _normalise(uri: str) -> str:
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise StorageError(f"unsupported storage URI {uri!r}: use a local path, {scheme_names()}")
        return uri.rstrip("/") if not uri.endswith("://") else uri
    return os.path.abspath(os.path.expanduser(uri))


def normalise(uri: str) -> str:
    """The canonical spelling of a URI (absolute local path, no trailing slash)."""
    return _normalise(uri)


def resolve(uri: str) -> Location:
    """Turn a URI into (filesystem, path). Fails with the URI named."""
    uri = _normalise(uri)
    if "://" not in uri:
        return Location(pafs.LocalFileSystem(), uri, uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises several types; one message for the user
        raise StorageError(f"cannot open storage URI {uri!r}: {e}") from e
    return Location(fs, path, uri)


# How long a command waits for object storage to answer before it says it is unreachable:
# pyarrow's defaults retry for minutes against an endpoint that accepts but never replies.
REACH_CONNECT_S = 3.0
REACH_REPLY_S = 5.0
REACH_DEADLINE_S = 12.0


def s3_endpoint(uri: str) -> str:
    """The endpoint an ``s3://`` URI is served from: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, or an
    ``endpoint_override`` in the URI's query), else AWS's regional endpoint."""
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(uri).query)
    if query.get("endpoint_override"):
        return query["endpoint_override"][0]
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return f"https://s3.{region}.amazonaws.com"


def _probe(uri: str) -> None:
    """One request to the store behind ``uri`` with short timeouts and no retries; OSError when
    the endpoint does not answer. Any answer (even 'no such key' or 'access denied') is an answer."""
    loc = resolve(uri)
    endpoint = s3_endpoint(uri)
    scheme, _, host = endpoint.rpartition("://")
    fs = pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme or "https", region=loc.fs.region,
                           connect_timeout=REACH_CONNECT_S, request_timeout=REACH_REPLY_S,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    try:
        fs.get_file_info(loc.path)
    except OSError as e:
        if "NETWORK_CONNECTION" in str(e) or "curlCode" in str(e):
            raise
        # the endpoint answered (with an error of its own, which the command reports in its place)


def check_reachable(uris, deadline_s: float = REACH_DEADLINE_S) -> None:
    """Refuse, in one line naming the URI and its endpoint, object storage that does not answer
    within a few seconds. Local paths are not checked. One probe per bucket and endpoint."""
    import threading

    seen = set()
    for uri in uris:
        if not uri or not is_remote(uri):
            continue
        uri = _normalise(uri)
        endpoint = s3_endpoint(uri)
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        if (endpoint, bucket) in seen:
            continue
        seen.add((endpoint, bucket))
        outcome: list = []

        def probe(uri=uri, outcome=outcome):
            try:
                _probe(uri)
                outcome.append(None)
            except Exception as e:  # reported below with the URI and endpoint
                outcome.append(e)

        worker = threading.Thread(target=probe, daemon=True)  # a hung resolver must not hold the exit
        worker.start()
        worker.join(deadline_s)
        if not outcome:
            why = f"no answer within {deadline_s:g} s"
        elif outcome[0] is None:
            continue
        else:
            why = str(outcome[0]).split("Details: ")[-1].strip()
        raise StorageError(f"storage unreachable: {uri} at endpoint {endpoint}: {why}")


def join(uri: str, *parts: str) -> str:
    uri = _normalise(uri)
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    loc = resolve(uri)
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"cannot reach {uri!r}: {e}") from e


def is_dir(uri: str) -> bool:
    loc = resolve(uri)
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory


def listdir(uri: str) -> list[str]:
    """Names directly under ``uri`` (sorted); empty if it does not exist."""
    loc = resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri!r}: {e}") from e
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def _s3_client():
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def stat_files(dir_uri: str) -> dict[str, dict]:
    """{file name: {"size", "version"}} of the files directly under ``dir_uri``, from one listing:
    ``version`` is the object's ETag on S3 (pyarrow does not list ETags), the mtime in ns on a
    disk. Either changes whenever the file is written."""
    dir_uri = _normalise(dir_uri)
    try:
        if is_remote(dir_uri):
            bucket, _, prefix = dir_uri.split("://", 1)[1].partition("/")
            prefix = prefix.rstrip("/") + "/" if prefix else ""
            out = {}
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                                Delimiter="/"):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(prefix):]] = {"size": obj["Size"], "version": obj["ETag"].strip('"')}
            return out
        loc = resolve(dir_uri)
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
        return {posixpath.basename(i.path): {"size": i.size, "version": str(i.mtime_ns)} for i in infos if i.is_file}
    except Exception as e:  # botocore and pyarrow raise several types; one message naming the URI
        raise StorageError(f"cannot list {dir_uri!r}: {e}") from e


def stat_file(uri: str) -> dict:
    """``stat_files``'s entry of one file (one HEAD on S3, one stat on a disk)."""
    uri = _normalise(uri)
    try:
        if is_remote(uri):
            bucket, _, key = uri.split("://", 1)[1].partition("/")
            head = _s3_client().head_object(Bucket=bucket, Key=key)
            return {"size": head["ContentLength"], "version": head["ETag"].strip('"')}
        loc = resolve(uri)
        info = loc.fs.get_file_info(loc.path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(uri)
        return {"size": info.size, "version": str(info.mtime_ns)}
    except Exception as e:  # botocore and pyarrow raise several types; one message naming the URI
        raise StorageError(f"cannot stat {uri!r}: {e}") from e


def makedirs(uri: str) -> None:
    loc = resolve(uri)
    loc.fs.create_dir(loc.path, recursive=True)


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri!r} does not exist") from e
    except OSError as e:
        raise StorageError(f"cannot read {uri!r}: {e}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files go to a temporary name first and are renamed, so a
    reader never sees half a file; an S3 PUT is all-or-nothing already."""
    loc = resolve(uri)
    try:
        parent = posixpath.dirname(loc.path) if "://" in loc.uri else os.path.dirname(loc.path)
        if parent:
            loc.fs.create_dir(parent, recursive=True)
        if isinstance(loc.fs, pafs.LocalFileSystem):
            tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
            with loc.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, loc.path)
        else:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {uri!r}: {e}") from e


def delete(uri: str) -> None:
    """Remove a file or a directory tree; missing is fine."""
    loc = resolve(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri!r} is not valid JSON: {e}") from e


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copy_to_local(uri: str, local_dir: str) -> str:
    """Mirror a directory (or one file) at ``uri`` into ``local_dir``; returns the local path.
    Local URIs are returned as they are."""
    loc = resolve(uri)
    if isinstance(loc.fs, pafs.LocalFileSystem):
        return loc.path
    os.makedirs(local_dir, exist_ok=True)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        dst = os.path.join(local_dir, posixpath.basename(loc.path))
        pafs.copy_files(loc.path, dst, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
        return dst
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri!r} does not exist")
    pafs.copy_files(loc.path, local_dir, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


# ---- safetensors ---------------------------------------------------------------------------

def save_tensors(uri: str, tensors: dict, metadata: dict[str, Any] | None = None) -> bytes:
    """Write torch tensors as safetensors; metadata values that are not strings are JSON-encoded.
    Returns the bytes written (callers hash them for manifests)."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    write_bytes(uri, data)
    return data


def safetensors_header(data: bytes) -> dict:
    """The JSON header of safetensors bytes (tensor entries + ``__metadata__``); ValueError if malformed."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def read_safetensors_header(uri: str) -> dict:
    """The header of a safetensors file, reading only the header's bytes (a ViT's weights need
    not be fetched to learn its metadata). Raises OSError / ValueError for the caller to name."""
    loc = resolve(uri)
    with loc.fs.open_input_file(loc.path) as f:
        n = int.from_bytes(f.read_at(8, 0), "little")
        return json.loads(f.read_at(n, 8))


def load_tensors(uri: str) -> tuple[dict, dict[str, str]]:
    """Read a safetensors file -> (tensors, raw string metadata)."""
    from safetensors.torch import load

    data = read_bytes(uri)
    try:
        tensors = load(data)
        header = safetensors_header(data)
    except Exception as e:
        raise StorageError(f"{uri!r} is not a valid safetensors file: {e}") from e
    return tensors, dict(header.get("__metadata__") or {})


# ---- atomic publish -------------------------------------------------------------------------

def publish(files: dict[str, bytes], dest_uri: str, pointer_uri: str | None = None, pointer_value: str | None = None) -> dict:
    """Write ``files`` (relative name -> bytes) under ``dest_uri``, read each back to verify size
    and sha256, write ``MANIFEST.json`` last, then (optionally) replace ``pointer_uri`` with
    ``pointer_value``. A crash before the pointer moves leaves the previous result in force."""
    manifest = {"files": {}}
    for name, data in sorted(files.items()):
        uri = join(dest_uri, name)
        write_bytes(uri, data)
        manifest["files"][name] = {"size": len(data), "sha256": sha256(data)}
    verify(dest_uri, manifest)
    write_json(join(dest_uri, "MANIFEST.json"), manifest)
    if pointer_uri is not None:
        write_bytes(pointer_uri, (pointer_value or "").encode() + b"\n")
    return manifest


def verify(dest_uri: str, manifest: dict | None = None) -> dict:
    """Check every file of a published directory against its manifest."""
    if manifest is None:
        manifest = read_json(join(dest_uri, "MANIFEST.json"))
    for name, want in manifest["files"].items():
        data = read_bytes(join(dest_uri, name))
        if len(data) != want["size"] or sha256(data) != want["sha256"]:
            raise StorageError(f"published file {join(dest_uri, name)!r} does not match its manifest")
    return manifest


def read_pointer(pointer_uri: str) -> str | None:
    if not exists(pointer_uri):
        return None
    return read_bytes(pointer_uri).decode().strip() or None
