"""Storage URIs -> filesystems.

Every path in a config is a URI: a local path (`/data/x`, `~/x`, `./x`), `file://`,
`s3://bucket/key` or `memory://` (process-local: for tests and driver-only scratch; Ray
workers cannot see it). Two views of the same URI:

- `arrow_fs(uri)`: a `pyarrow.fs.FileSystem` + path, what Ray Data and Ray Train take
  (`filesystem=` / `storage_filesystem=`). It pickles with its options, so Ray workers reach
  the same bucket with the same endpoint and credentials as the driver.
- `fsspec_fs(uri)`: an fsspec filesystem + path, for small side files (manifests, tokenizers,
  quarantine files) written by the driver.

S3 settings come from the standard AWS environment variables, read where the URI is resolved
(the driver): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION
(or AWS_REGION), and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores
(MinIO, moto, R2, ...).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

SCHEMES = ("file", "s3", "memory")


class StorageError(Exception):
    """A URI that cannot be used (unknown scheme, bad bucket, ...); the message is for the user."""


def scheme_of(uri: str) -> str:
    uri = str(uri)
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("s3a", "s3n"):
        return "s3"
    if scheme not in SCHEMES:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file://, s3:// or memory://")
    return scheme


def is_local(uri: str) -> bool:
    return scheme_of(uri) == "file"


def normalize(uri: str) -> str:
    """Canonical form: local paths become absolute `/...` paths; others keep their scheme."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return str(Path(path).expanduser().resolve())
    if scheme == "s3":
        rest = uri.split("://", 1)[1]
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"s3 URI {uri!r} has no bucket: expected s3://BUCKET/path")
        return "s3://" + rest.rstrip("/")
    return "memory://" + uri.split("://", 1)[1].lstrip("/")


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if scheme_of(uri) == "file":
        return str(Path(uri, *parts))
    return posixpath.join(uri, *parts)


def _s3_settings() -> dict[str, Any]:
    env = os.environ
    return {
        "endpoint": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        "key": env.get("AWS_ACCESS_KEY_ID") or None,
        "secret": env.get("AWS_SECRET_ACCESS_KEY") or None,
        "token": env.get("AWS_SESSION_TOKEN") or None,
        "region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
    }


def fsspec_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    uri = normalize(uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), uri
    if scheme == "s3":
        s = _s3_settings()
        client_kwargs: dict[str, Any] = {"region_name": s["region"]}
        if s["endpoint"]:
            client_kwargs["endpoint_url"] = s["endpoint"]
        fs = fsspec.filesystem(
            "s3", key=s["key"], secret=s["secret"], token=s["token"], client_kwargs=client_kwargs,
            skip_instance_cache=False,
            use_listings_cache=False,  # other processes write the same buckets: never answer from a stale listing
        )
        return fs, uri[len("s3://"):]
    return fsspec.filesystem("memory"), "/" + uri[len("memory://"):]


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for `uri`, as Ray Data / Ray Train want them."""
    uri = normalize(uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), uri
    if scheme == "s3":
        s = _s3_settings()
        kwargs: dict[str, Any] = {"region": s["region"]}
        if s["key"] and s["secret"]:
            kwargs.update(access_key=s["key"], secret_key=s["secret"])
            if s["token"]:
                kwargs["session_token"] = s["token"]
        if s["endpoint"]:
            ep = urlparse(s["endpoint"])
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
            kwargs["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
    fs, path = fsspec_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# --- small-file helpers (driver side) ---------------------------------------------------

def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fsspec_fs(uri)
    fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local files are written aside and renamed, so a reader never
    sees half a file; object stores publish an object only when its upload completes."""
    fs, path = fsspec_fs(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(uri):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write `uri` only if nothing is there yet; True when this call created it. Local: the
    content is written aside and hard-linked into place (`link` fails when the name exists, so
    a reader never sees half a file); S3: a conditional PUT (`If-None-Match: *`). Two writers
    racing for one name: exactly one gets True. Other object stores have no such primitive
    here: an existence check, then a write (documented as not atomic)."""
    fs, path = fsspec_fs(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if scheme_of(uri) == "s3":
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:  # s3fs passes some precondition failures through untranslated
            if "PreconditionFailed" in repr(e) or "412" in str(e):
                return False
            raise
    if fs.exists(path):
        return False
    write_bytes(uri, data)
    return True


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json_bytes(obj))


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under `uri`; [] when it does not exist."""
    fs, path = fsspec_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(uri: str) -> None:
    fs, path = fsspec_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def file_info(uri: str) -> dict[str, Any]:
    """Size plus what identifies a version of the file (mtime, ETag) where the store has it."""
    fs, path = fsspec_fs(uri)
    info = fs.info(path)
    out = {"size": info.get("size")}
    for key in ("mtime", "ETag", "etag", "LastModified", "created"):
        if key in info and info[key] is not None:
            out[key.lower()] = str(info[key])
    return out


def glob_files(uri: str) -> list[str]:
    """Files under a URI: the file itself, every file below a directory, or a glob's matches.
    Returned as URIs in the same scheme; hidden files and `_`-prefixed ones are skipped."""
    fs, path = fsspec_fs(uri)
    scheme = scheme_of(uri)
    if any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = fs.find(path)
    elif fs.exists(path):
        paths = [path]
    else:
        raise StorageError(f"no such file or directory: {uri}")
    out = []
    for p in sorted(paths):
        base = posixpath.basename(p)
        if base.startswith((".", "_")) or fs.isdir(p):
            continue
        out.append(p if scheme == "file" else f"{scheme}://{p.lstrip('/')}")
    return out


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory's files to `uri` (any scheme)."""
    local_dir = Path(local_dir)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            write_bytes(join(uri, str(f.relative_to(local_dir))), f.read_bytes())


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every file under `uri` into `local_dir` (a no-op copy for local URIs is avoided
    by callers that can read local paths directly)."""
    local_dir = Path(local_dir)
    base = normalize(uri)
    fs, root = fsspec_fs(base)
    for p in fs.find(root):
        rel = posixpath.relpath(p, root)
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open(p, "rb") as src:
            target.write_bytes(src.read())
    return local_dir
