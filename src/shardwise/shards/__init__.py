"""The shard mechanism shared by every sharded stage (docs/design.md §2), in five rooms.

- :mod:`~shardwise.shards.plan` (pure): row ranges, fingerprints, the store's paths, whether a
  shard is done (it only reads).
- :mod:`~shardwise.shards.codecs`: how chunks and shards are written and joined (Parquet here; the
  HDF5 codecs live with their stages).
- :mod:`~shardwise.shards.worker`: inside a worker process, the context a stage's compute gets
  (rows, device, progress, speed stats, chunk commits, the shard's record) and the status file.
- :mod:`~shardwise.shards.store`: the plan file, which shards a job must compute, the merge's
  verification and join, healing (a shard that fails verification is taken out of the store).
- :mod:`~shardwise.shards.runner`: a job's worker processes, their failures, the job's manifest.

Vocabulary: a stage's work is a table of *items* cut into `n_shards` contiguous row ranges
(:func:`shard_ranges`, deterministic). A Snakemake *job* runs `shards_per_job` shards, one
submitit worker per shard, each pinned to its own `gpus_per_shard` GPUs (:func:`run_job`).

Shard store, per stage output (`root`, e.g. ``results/generations/<model>``)::

    root/shards/<run fingerprint>/plan.json                  what this run is (for `shardwise status`)
    root/shards/<run fingerprint>/0001-of-0004.parquet       the shard's data (final name = complete)
    root/shards/<run fingerprint>/0001-of-0004.json          its record, written last = "done"
    root/shards/<run fingerprint>/0001-of-0004.status.json   running / failed (pid, host, error)
    root/shards/<run fingerprint>/0001-of-0004.parts/        committed chunks of an unfinished shard

The *run fingerprint* hashes everything that determines the content (stage, params, model identity,
input hash, code version, number of items, `n_shards`); a shard's own fingerprint adds its index
and row range. Every file is written to a temporary name in its directory and `os.replace`d, so no
partial file ever has a final name. A shard is done when its record exists, names the current
fingerprint and its data file has the recorded size: a rerun skips done shards, and a shard that
was killed resumes from its last committed chunk.

The job's declared Snakemake output is a manifest (JSON) listing its shards' records. The merge
(:func:`verify`) checks every manifest and shard against the current plan: fingerprints, sha256
checksums, and row ranges covering the items exactly once; anything else is refused, naming the shard.

The names below are re-exported from their rooms for importers that want the mechanism as one.
"""

from __future__ import annotations

from shardwise.shards.codecs import Codec, ParquetCodec
from shardwise.shards.plan import ShardPlan, chunk_ranges, file_problem, shard_ranges
from shardwise.shards.runner import job_cpus, log_tail, pid_alive, run_job
from shardwise.shards.store import heal_manifests, invalidate, merge, pending_shards, verify, write_plan_file
from shardwise.shards.worker import ComputeFn, ShardContext, ShardTask, worker_main

__all__ = [
    "Codec",
    "ComputeFn",
    "ParquetCodec",
    "ShardContext",
    "ShardPlan",
    "ShardTask",
    "chunk_ranges",
    "file_problem",
    "heal_manifests",
    "invalidate",
    "job_cpus",
    "log_tail",
    "merge",
    "pending_shards",
    "pid_alive",
    "run_job",
    "shard_ranges",
    "verify",
    "worker_main",
    "write_plan_file",
]
