"""URIs on fsspec storage: local paths, file://, s3:// (credentials from the standard AWS chain and
AWS_ENDPOINT_URL for S3-compatible endpoints; never printed or logged).

Writes that must be all-or-nothing go through `commit_bytes` / `commit_file`: a temporary name then a
rename (local) or a single final put (object stores, where a put is atomic).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Whole object, refusing objects above max_bytes (so a huge file cannot exhaust memory)."""
    fs, path = filesystem(uri)
    if max_bytes is not None:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise ValueError(f"{size} bytes is above the limit of {max_bytes}")
    return fs.cat_file(path)


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local file path for `uri`: the file itself when local, else a temporary download (streamed to
    disk, so memory does not grow with the object's size)."""
    if not is_remote(uri):
        yield uri[len("file://"):] if uri.startswith("file://") else uri
        return
    fs, path = filesystem(uri)
    suffix = Path(path).suffix
    with tempfile.TemporaryDirectory(prefix="atoken-") as d:
        local = os.path.join(d, "object" + suffix)
        fs.get_file(path, local)
        yield local


def list_files(prefix: str) -> list[str]:
    """Files under a folder or bucket prefix, as full URIs, sorted."""
    fs, path = filesystem(prefix)
    found = sorted(fs.find(path))
    return found if not is_remote(prefix) else [fs.unstrip_protocol(p) for p in found]


def commit_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)  # a single put: readers see nothing or everything
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_file(local: str, uri: str) -> None:
    """Moves a finished local file to `uri` atomically (rename locally, one put remotely)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.put_file(local, path)
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(local, tmp)
    os.replace(tmp, path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def pyarrow_filesystem(uri: str):
    """(pyarrow FileSystem, path) for Ray Train's RunConfig: the same fsspec filesystem every other
    storage call uses (credentials, endpoint, region from its configuration), wrapped for pyarrow;
    local paths use pyarrow's own local filesystem."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def unstrip(like: str, path: str) -> str:
    """A path on the filesystem of `like` as a full URI (s3://bucket/key), via fsspec's unstrip_protocol;
    local paths stay plain paths."""
    fs, _ = filesystem(like)
    return fs.unstrip_protocol(path) if is_remote(like) else path
