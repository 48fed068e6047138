"""Input listing: a manifest (JSONL, CSV or Parquet: uri, optional id, modality, caption, label, split, dataset)
or a folder / bucket prefix. Relative manifest URIs resolve against the manifest's folder. Modality comes
from the manifest, else the extension, else the file's magic bytes."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from preprocess import storage
from preprocess.images import IMAGE_EXTS
from preprocess.video import VIDEO_EXTS

MODALITIES = ("image", "video", "3d")
MANIFEST_EXTS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Item:
    id: str
    uri: str
    modality: str | None
    caption: str
    label: str | None
    split: str
    dataset: str = ""  # the collection an item belongs to (mixing, per-dataset evaluation)


def modality_from_extension(uri: str) -> str | None:
    ext = PurePosixPath(uri.split("?")[0]).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext == ".ply":
        return "3d"
    return None


def sniff_modality(head: bytes) -> str | None:
    """From the first bytes of a file."""
    if head.startswith(b"ply"):
        return "3d"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1aE\xdf\xa3") or head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video"
    if (head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head[:4] in (b"GIF8", b"II*\x00", b"MM\x00*")
            or head.startswith(b"BM") or head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
        return "image"
    return None


def _resolve(base: str, uri: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return storage.join(base, uri)


def _rows(uri: str) -> list[dict]:
    data = storage.read_bytes(uri)
    ext = PurePosixPath(uri).suffix.lower()
    if ext in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{uri}: line {n} is not JSON ({e})") from None
        return rows
    if ext == ".csv":
        return pacsv.read_csv(pa.BufferReader(data)).to_pylist()
    return pq.read_table(io.BytesIO(data)).to_pylist()


def load_items(source: str, default_split: str = "train") -> list[Item]:
    """Items from a manifest or a folder/prefix, with unique ids, sorted by id."""
    items: list[Item] = []
    if source.lower().endswith(MANIFEST_EXTS):
        base = source.rsplit("/", 1)[0] if "/" in source else "."
        for n, row in enumerate(_rows(source), 1):
            if not row.get("uri"):
                raise ValueError(f"{source}: row {n} has no 'uri'")
            modality = row.get("modality") or None
            if modality is not None and modality not in MODALITIES:
                raise ValueError(f"{source}: row {n}: modality={modality!r}, expected one of {MODALITIES}")
            uri = _resolve(base, str(row["uri"]))
            label = row.get("label")
            items.append(Item(str(row.get("id") or _default_id(uri)), uri, modality, str(row.get("caption") or ""),
                              None if label is None or label != label else str(label),  # NaN from CSV
                              str(row.get("split") or default_split), str(row.get("dataset") or "")))
    else:
        prefix = source.rstrip("/")
        for uri in storage.list_files(prefix):
            if uri.lower().endswith(MANIFEST_EXTS) or PurePosixPath(uri).name.startswith("."):
                continue
            rel = uri[len(prefix):].lstrip("/") if uri.startswith(prefix) else PurePosixPath(uri).name
            items.append(Item(rel, uri, modality_from_extension(uri), "", None, default_split))
    seen: dict[str, int] = {}
    for it in items:
        if it.id in seen:
            raise ValueError(f"{source}: duplicate id {it.id!r}")
        seen[it.id] = 1
    return sorted(items, key=lambda it: it.id)


def _default_id(uri: str) -> str:
    return PurePosixPath(uri).stem + "-" + hashlib.sha1(uri.encode()).hexdigest()[:8]
