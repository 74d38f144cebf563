"""One writer per output: a lease file ``<output_uri>/_LEASE.json`` that every command that
writes (``run``, a stage, ``import-ingredients``) holds while it runs.

The lease names its holder (host, pid, run id, command) and carries a heartbeat: the holder
rewrites it every ``ttl / 4`` seconds. A second writer waits (one line saying for whom) or, with
``--no-wait``, stops. A lease whose heartbeat is older than the TTL is taken over, and the taker
says so. Age is measured by the storage's own clock, never a host's: on S3 the response's
``Date`` minus the lease's ``Last-Modified``; on a local or mounted disk a fresh probe file's
modification time minus the lease's (on NFS both are the server's).

Exactly one writer wins each step because each step is a conditional write:
- S3: create with ``If-None-Match: *``; heartbeat, takeover and release with ``If-Match`` on the
  ETag last seen (AWS S3 since 2024, MinIO, moto). A store that refuses those headers gets the
  fallback: write, back off a random moment, read back and keep the lease only if the token
  read is ours.
- Local disk: create by hard-linking a complete temporary file (fails if the lease exists);
  takeover by renaming the stale lease aside (only one rename of a name succeeds) and checking
  it was the stale one; heartbeat by atomic replace.
"""
from __future__ import annotations

import _thread
import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable

from . import storage
from .errors import UserError

LEASE_NAME = "_LEASE.json"
POLL_S = 2.0


class LeaseBusy(UserError):
    """Another writer holds the output and the command was told not to wait."""


class _Local:
    """Conditional writes on a local (or mounted) filesystem; an 'etag' is the content itself."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def _tmp(self, data: bytes) -> str:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    def read(self):
        """(content bytes, etag, age in seconds by the filesystem's clock) or None."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        probe = self._tmp(b"")
        now = os.stat(probe).st_mtime
        os.unlink(probe)
        return data, data, now - mtime

    def create(self, data: bytes):
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)  # atomic, and fails where the lease exists (NFS too)
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def replace(self, etag: bytes, data: bytes, *, mine: bool):
        if mine:  # our own heartbeat: nobody else writes a lease that is not stale
            current = self.read()
            if current is None or current[1] != etag:
                return None
            os.replace(self._tmp(data), self.path)
            return data
        aside = f"{self.path}.taken-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)  # one taker wins the rename
        except FileNotFoundError:
            return None
        with open(aside, "rb") as f:
            was = f.read()
        if was != etag:  # it was beaten or taken over since we looked: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return None
        os.unlink(aside)
        return self.create(data)

    def delete(self, etag: bytes) -> None:
        current = self.read()
        if current is not None and current[1] == etag:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class _S3:
    """Conditional writes on S3 (If-None-Match / If-Match), through boto3: pyarrow does not
    send those headers."""

    def __init__(self, uri: str):
        import boto3

        bucket_key = uri.split("://", 1)[1]
        self.bucket, self.key = bucket_key.split("/", 1)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client("s3", endpoint_url=endpoint or None)
        self.conditional = True  # until the store refuses the headers

    @staticmethod
    def _code(e) -> str:
        return str(e.response.get("Error", {}).get("Code", ""))

    def _refused(self, e) -> bool:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status == 501 or self._code(e) in ("NotImplemented", "InvalidArgument")

    def read(self):
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e) in ("NoSuchKey", "404"):
                return None
            raise
        from email.utils import parsedate_to_datetime

        now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return r["Body"].read(), r["ETag"], (now - r["LastModified"]).total_seconds()

    def _put(self, data: bytes, **condition):
        from botocore.exceptions import ClientError

        if not self.conditional:
            return self._put_then_verify(data)
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as e:
            if self._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            if self._refused(e):
                self.conditional = False
                return self._put_then_verify(data)
            raise

    def _put_then_verify(self, data: bytes):
        """A store without conditional writes: write, back off, keep it only if it is still ours."""
        self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data)
        time.sleep(1.0 + random.random())
        current = self.read()
        return current[1] if current is not None and current[0] == data else None

    def create(self, data: bytes):
        if not self.conditional and self.read() is not None:
            return None
        return self._put(data, IfNoneMatch="*")

    def replace(self, etag: str, data: bytes, *, mine: bool):
        return self._put(data, IfMatch=etag)

    def delete(self, etag: str) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(ClientError):
            if self.conditional:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
            else:
                current = self.read()
                if current is not None and current[1] == etag:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)


def lease_uri(output_uri: str) -> str:
    return storage.join(output_uri, LEASE_NAME)


def _backend(output_uri: str):
    uri = lease_uri(output_uri)
    return _S3(uri) if storage.is_remote(uri) else _Local(storage.resolve(uri).path)


def describe(holder: dict) -> str:
    return (f"{holder.get('command', '?')} on host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"(run {holder.get('run_id', '?')})")


class Lease:
    """A held lease: its heartbeat thread rewrites it until ``release``."""

    def __init__(self, output_uri: str, backend, holder: dict, etag, ttl_s: float, log: Callable[[str], None]):
        self.output_uri, self.backend, self.holder, self.etag, self.ttl_s = output_uri, backend, holder, etag, ttl_s
        self.log = log
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="frankensoup-lease", daemon=True)
        self._thread.start()

    def _encode(self) -> bytes:
        return json.dumps(self.holder, sort_keys=True).encode()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.holder["beat"] += 1
            try:
                etag = self.backend.replace(self.etag, self._encode(), mine=True)
            except Exception as e:  # storage hiccup: try again at the next beat, inside the TTL
                self.log(f"lease on {self.output_uri}: heartbeat failed ({e}); retrying")
                continue
            if etag is None:
                current = self.backend.read()
                self.lost = json.loads(current[0]) if current else {}
                self.log(f"frankensoup: lease on {self.output_uri} lost to {describe(self.lost)}: stopping")
                _thread.interrupt_main()
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost is None:
            self.backend.delete(self.etag)


def acquire(output_uri: str, command: str, *, ttl_s: float = 60.0, wait: bool = True,
            log: Callable[[str], None] = print, poll_s: float = POLL_S) -> Lease:
    """Hold the lease on ``output_uri``: at once if it is free, after waiting while another
    writer's heartbeat is fresh, or by taking over one whose heartbeat is older than ``ttl_s``."""
    backend = _backend(output_uri)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": uuid.uuid4().hex[:12],
              "token": uuid.uuid4().hex, "command": command, "beat": 0,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = json.dumps(holder, sort_keys=True).encode()
    said = None
    while True:
        current = backend.read()
        if current is None:
            etag = backend.create(data)
            if etag is not None:
                return Lease(output_uri, backend, holder, etag, ttl_s, log)
        else:
            raw, etag_seen, age = current
            try:
                other = json.loads(raw)
            except ValueError:
                other = {}
            if age > ttl_s:
                etag = backend.replace(etag_seen, data, mine=False)
                if etag is not None:
                    log(f"took over the lease on {output_uri} from {describe(other)}: "
                        f"no heartbeat for {age:.0f} s (lease TTL {ttl_s:g} s)")
                    return Lease(output_uri, backend, holder, etag, ttl_s, log)
            elif not wait:
                raise LeaseBusy(f"{output_uri} is being written by {describe(other)}, "
                                f"heartbeat {age:.0f} s ago; stopping (--no-wait)")
            elif said != other.get("token"):
                said = other.get("token")
                log(f"{output_uri} is being written by {describe(other)}, heartbeat {age:.0f} s ago: "
                    "waiting for it to finish (--no-wait stops instead)")
        time.sleep(poll_s * (0.5 + random.random()))


@contextlib.contextmanager
def holding(output_uri: str, command: str, *, ttl_s: float = 60.0, wait: bool = True,
            log: Callable[[str], None] = print):
    lease = acquire(output_uri, command, ttl_s=ttl_s, wait=wait, log=log)
    try:
        yield lease
    finally:
        lease.release()
