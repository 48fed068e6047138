"""Reading shards: a Ray Dataset for the trainer, a plain pyarrow iterator for tools."""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.shards import read_index, read_table


def shard_uris(output: str, modality: str | None = None) -> list[str]:
    return [s["uri"] for s in read_index(output)["shards"] if modality is None or s["modality"] == modality]


def iter_tables(output: str, modality: str | None = None, split: str | None = None,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One pyarrow Table per shard (filtered by split), in index order."""
    for uri in shard_uris(output, modality):
        t = read_table(uri)
        if split is not None:
            t = t.filter(pc.equal(t["split"], split))
        yield t.select(columns) if columns else t


def iter_rows(output: str, **kw) -> Iterator[dict]:
    for t in iter_tables(output, **kw):
        yield from t.to_pylist()


def read_shards(output: str, modality: str | None = None, split: str | None = None, num_cpus: float | None = None,
                concurrency: int | None = None):
    """A Ray Dataset over the committed shards (one read task per shard file). `num_cpus` per read task:
    training passes a small value, since reading Arrow is I/O and the train workers hold the CPUs.
    `concurrency` caps the read tasks in flight: zero-CPU tasks are otherwise unbounded, and each epoch
    of a small dataset started a burst of fresh worker processes whose start-up took CPU from training."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    uris = shard_uris(output, modality)

    class ArrowShardDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            tasks = []
            for uri in uris:
                def read(uri=uri):
                    t = read_table(uri)
                    if split is not None:
                        t = t.filter(pc.equal(t["split"], split))
                    return [t]
                tasks.append(ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                          input_files=(uri,))))
            return tasks

    if not uris:
        raise ValueError(f"{output}: no shards{' for modality ' + modality if modality else ''}")
    kw = {} if num_cpus is None else {"num_cpus": num_cpus}
    if concurrency:
        kw["concurrency"] = concurrency
    return ray.data.read_datasource(ArrowShardDatasource(), override_num_blocks=len(uris), **kw)
