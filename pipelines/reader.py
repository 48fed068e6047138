"""Reading shards: a Ray Dataset for the trainer, a plain pyarrow iterator for tools."""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.shards import read_index, read_table


def shard_uris(output: str, modality: str | None = None) -> list[str]:
    return [s["uri"] for s in read_index(output)["shards"] if modality is None or s["modality"] == modality]


def _filtered(t: pa.Table, split: str | None, dataset: str | None) -> pa.Table:
    if split is not None:
        t = t.filter(pc.equal(t["split"], split))
    if dataset is not None:
        t = t.filter(pc.equal(pc.fill_null(t["dataset"], ""), dataset))
    return t


def iter_tables(output: str, modality: str | None = None, split: str | None = None,
                columns: list[str] | None = None, dataset: str | None = None) -> Iterator[pa.Table]:
    """One pyarrow Table per shard (filtered by split and dataset), in index order."""
    for uri in shard_uris(output, modality):
        t = _filtered(read_table(uri), split, dataset)
        yield t.select(columns) if columns else t


def dataset_counts(output: str, modality: str, split: str | None = None) -> dict[str, int]:
    """Rows per dataset name (the manifest's `dataset`; "" where none was given)."""
    out: dict[str, int] = {}
    for t in iter_tables(output, modality, split, columns=["dataset"]):
        for d in t["dataset"].to_pylist():
            out[d or ""] = out.get(d or "", 0) + 1
    return out


def iter_rows(output: str, **kw) -> Iterator[dict]:
    for t in iter_tables(output, **kw):
        yield from t.to_pylist()


def token_count(output: str, modality: str, split: str | None = None, patch: tuple[int, int, int] = (4, 16, 16),
                dataset: str | None = None) -> int:
    """Tokens the rows of one modality make at full size (from their shape columns; no pixels read)."""
    total = 0
    for t in iter_tables(output, modality, split, columns=["frames", "height", "width", "voxels"], dataset=dataset):
        for r in t.to_pylist():
            if modality == "3d":
                total += len(r["voxels"] or b"") // 6  # int16 x, y, z per occupied voxel
            else:
                nt = max(1, r["frames"] // patch[0]) if modality == "video" else 1
                total += nt * (r["height"] // patch[1]) * (r["width"] // patch[2])
    return total


def read_shards(output: str, modality: str | None = None, split: str | None = None, num_cpus: float | None = None,
                concurrency: int | None = None, repeat: int = 1, dataset: str | None = None,
                block_bytes: int = 64 * 2 ** 20):
    """A Ray Dataset over the committed shards, filtered by split and dataset. `num_cpus` per read task:
    training passes a small value, since reading Arrow is I/O and the train workers hold the CPUs.
    `concurrency` caps the read tasks in flight: zero-CPU tasks are otherwise unbounded, and each epoch
    of a small dataset started a burst of fresh worker processes whose start-up took CPU from training.
    `repeat` makes one pass hold every shard that many times, so a pass spans a whole stage on a small
    dataset (each new pass of a streaming split re-plans and restarts its read tasks); a read task then
    emits several copies of its filtered shard as one block of about `block_bytes` (file bytes), so the
    copies cost neither a read nor a block each."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    shards = [s for s in read_index(output)["shards"] if modality is None or s["modality"] == modality]
    if not shards:
        raise ValueError(f"{output}: no shards{' for modality ' + modality if modality else ''}")
    jobs = []  # (uri, copies)
    for s in shards:
        per_task = max(1, min(repeat, block_bytes // max(int(s["bytes"]), 1)))
        for j in range(0, repeat, per_task):
            jobs.append((s["uri"], min(per_task, repeat - j)))

    class ArrowShardDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            tasks = []
            for uri, copies in jobs:
                def read(uri=uri, copies=copies):
                    t = _filtered(read_table(uri), split, dataset)
                    return [pa.concat_tables([t] * copies) if copies > 1 else t]
                tasks.append(ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                          input_files=(uri,))))
            return tasks

    kw = {} if num_cpus is None else {"num_cpus": num_cpus}
    if concurrency:
        kw["concurrency"] = concurrency
    return ray.data.read_datasource(ArrowShardDatasource(), override_num_blocks=len(jobs), **kw)
