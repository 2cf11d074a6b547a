"""`shardwise status` on big stores: --runs stage outputs of --shards shards each (done, running and
pending), with canned records; prints the time of `collect` + `render` and of `verify`.

    python bench/status.py [--shards 1024] [--runs 9]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from shardwise.config import ShardSpec
from shardwise.shards.plan import ShardPlan
from shardwise.shards.store import write_plan_file
from shardwise.status import collect, render, verify_stores


def build(root: Path, n_runs: int, n_shards: int) -> None:
    spec = ShardSpec(n_shards=n_shards, shards_per_job=4, gpus_per_shard=1, chunk_size=8)
    data = b"x" * 4096
    sha = hashlib.sha256(data).hexdigest()
    for r in range(n_runs):
        plan = ShardPlan(
            stage="generate",
            key=f"run{r}",
            n_items=n_shards * 100,
            spec=spec,
            identity={"run": r},
            root=root / "results" / "generations" / f"run{r}",
            log_dir=root / "logs" / "generate" / f"run{r}",
            ext="parquet",
        )
        write_plan_file(plan)
        for i in range(n_shards):
            if i % 10 == 9:  # pending
                continue
            if i % 10 == 8:  # running (on another host)
                plan.status_path(i).write_text(
                    json.dumps({"state": "running", "pid": 1, "host": "elsewhere"})
                )
                continue
            plan.shard_path(i).write_bytes(data)
            rows = plan.ranges()[i]
            record = {
                "fingerprint": plan.shard_fingerprint(i),
                "index": i,
                "file": plan.shard_path(i).name,
                "bytes": len(data),
                "sha256": sha,
                "n_rows": len(rows),
                "rows": [rows.start, rows.stop],
                "start": 0.0,
                "end": 100.0,
                "stats": {"tokens_per_s": 1000.0},
            }
            plan.record_path(i).write_text(json.dumps(record))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, a.runs, a.shards)
        started = time.perf_counter()
        text = render(collect(root / "results"))
        status_s = time.perf_counter() - started
        started = time.perf_counter()
        _, bad = verify_stores(root / "results")
        verify_s = time.perf_counter() - started
    print(f"{a.runs} stage outputs x {a.shards} shards ({a.runs * a.shards} shards):")
    print(f"  status (collect + render, {len(text.splitlines())} lines): {status_s:.2f} s")
    print(f"  verify (sha256 of every done shard): {verify_s:.2f} s, {bad} bad")


if __name__ == "__main__":
    main()
