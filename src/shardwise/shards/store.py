"""The shard store on disk beyond a worker's own writes: the run's plan file, which shards a job
must compute (a corrupt one is taken out of the store), the merge's verification (fingerprints,
checksums, row coverage, one dtype) and join, and the healing of what failed verification (shards
taken out of the store, job manifests removed so they run again)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shardwise import __version__
from shardwise.atomic import atomic_path, atomic_write_json
from shardwise.errors import ShardError
from shardwise.shards.codecs import Codec
from shardwise.shards.plan import ShardPlan, file_problem

log = logging.getLogger(__name__)


def write_plan_file(plan: ShardPlan) -> None:
    """``<store>/plan.json``: what this run is (``shardwise status`` reads it); written once."""
    path = plan.store / "plan.json"
    if not path.exists():
        atomic_write_json(
            path,
            {
                "stage": plan.stage,
                "key": plan.key,
                "n_items": plan.n_items,
                "spec": asdict(plan.spec),
                "identity": plan.identity,
                "fingerprint": plan.fingerprint,
                "log_dir": str(plan.log_dir),
                "ext": plan.ext,
                "align": plan.align,
                "version": __version__,
            },
        )


def invalidate(plan: ShardPlan, index: int, path: Path) -> None:
    """Take a shard that failed verification out of the store: its record goes (so it is pending)
    and its data file is kept aside as ``<file>.bad`` for inspection."""
    plan.record_path(index).unlink(missing_ok=True)
    if path.is_file():
        os.replace(path, path.with_name(path.name + ".bad"))


def pending_shards(plan: ShardPlan, indices: Sequence[int]) -> list[int]:
    """The shards of `indices` that a job must compute: those not done, checksums included. A
    shard whose file has its recorded size but not its recorded sha256 (done to a status poll,
    which reads no data) is taken out of the store (:func:`invalidate`, with a warning), so that
    it is pending to everyone while it is computed again."""
    pending = []
    for i in indices:
        problem = plan.problem(i, checksum=True)
        if problem is None:
            continue
        pending.append(i)
        if plan.is_done(i):  # right size, wrong sha256
            log.warning("shard %d of %s: %s; computing it again", i, plan.name, problem)
            invalidate(plan, i, plan.shard_path(i))
    return pending


def heal_manifests(results: str | Path = "results") -> list[str]:
    """Remove every job manifest (``results/**/jobs/job-NNNN.json``) that lists a shard whose file
    is missing or has another size than recorded, so that Snakemake schedules that job again and
    it recomputes just those shards (the others are done and skipped). Cheap: one stat per shard,
    no reading; the merge checks the checksums. Returns one line per removed manifest."""
    lines = []
    for manifest in sorted(Path(results).glob("**/jobs/job-*.json")):
        try:
            data = json.loads(manifest.read_text())
            store, shards = Path(data["store"]), data["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or half-written: the merge names it
        bad = []
        for record in shards:
            problem = file_problem(store / str(record.get("file")), record, checksum=False)
            if problem:
                bad.append(f"shard {record.get('index')} ({problem})")
        if bad:
            manifest.unlink(missing_ok=True)
            lines.append(
                f"{data.get('stage')}/{data.get('key')} job {data.get('job')}: {', '.join(bad)}; "
                f"its manifest {manifest} is removed, so this run computes those shards again"
            )
    return lines


def merge(plan: ShardPlan, manifests: Sequence[str | Path], out: str | Path, codec: Codec) -> list[Path]:
    """The merge of every sharded stage: :func:`verify` every manifest and shard, let the codec
    check each shard's own metadata (``codec.check(path, where)``, where it has one), then join the
    shards in row order with the codec that joined their chunks, into `out` atomically."""
    paths = verify(plan, manifests)
    check = getattr(codec, "check", None)
    for i, path in enumerate(paths):
        if check is not None:
            check(path, f"{plan.name} shard {i} ({path})")
    with atomic_path(Path(out)) as tmp:
        codec.combine(paths, tmp)
    log.info("%s: merged %d shards of %d items -> %s", plan.name, len(paths), plan.n_items, out)
    return paths


def verify(plan: ShardPlan, manifests: Sequence[str | Path]) -> list[Path]:
    """Check the jobs' manifests against `plan`; return the shard files in row order.

    Checks every shard (size and sha256) and every row range, and on failure raises one
    ShardError naming all bad shards. A shard whose file is missing, truncated or fails its
    checksum is invalidated (:func:`invalidate`) and the manifests listing it are removed, as is a
    manifest of another run (stale fingerprint): the same command run again recomputes exactly
    those shards and merges. Shards computed in different dtypes and row ranges that do not cover
    [0, n_items) exactly once are refused.
    """
    entries: list[tuple[dict[str, Any], Path]] = []
    for manifest in manifests:
        try:
            data = json.loads(Path(manifest).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            Path(manifest).unlink(missing_ok=True)
            raise ShardError(
                f"{plan.name}: manifest {manifest} unreadable ({exc}); it is removed: run the same "
                "command again to recompute its job"
            ) from None
        for record in data.get("shards", []):
            entries.append((record, Path(manifest)))

    bad: list[str] = []
    drop: set[Path] = set()
    for record, manifest in entries:
        i = record["index"]
        label = f"shard {i} ({record.get('file')})"
        if not 0 <= i < plan.spec.n_shards or record["fingerprint"] != plan.shard_fingerprint(i):
            bad.append(f"{label}: stale (fingerprint {record['fingerprint']} is of another config or input)")
            drop.add(manifest)
            continue
        path = plan.store / record["file"]
        problem = file_problem(path, record, checksum=True)
        if problem:
            bad.append(f"{label}: {problem}")
            invalidate(plan, i, path)
            drop.add(manifest)
    if bad:
        for manifest in drop:
            manifest.unlink(missing_ok=True)
        raise ShardError(
            f"{plan.name}: {len(bad)} shard(s) failed verification: {'; '.join(bad)}. They are out "
            f"of the store and their job manifests ({', '.join(sorted(str(m) for m in drop))}) are "
            "removed: run the same command again - it recomputes only these shards, then merges."
        )
    _check_one_numerics(plan, [record for record, _ in entries])
    return _cover_rows(plan, entries)


def _by_value(
    records: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], Any]
) -> dict[str, list[int]]:
    """Shard indices by a value of their records (records without it are left out)."""
    out: dict[str, list[int]] = {}
    for record in records:
        if got := value(record):
            out.setdefault(str(got), []).append(record["index"])
    return out


def _mix(groups: dict[str, list[int]]) -> str:
    return "; ".join(f"{v}: shard(s) {', '.join(map(str, sorted(i)))}" for v, i in sorted(groups.items()))


def _check_one_numerics(plan: ShardPlan, records: Sequence[dict[str, Any]]) -> None:
    """Refuse shards whose records name different model dtypes (``stats.dtype``) and, below float32,
    different device kinds (``device_kind``: an A100 and an H100 round bf16 sums differently)."""
    dtypes = _by_value(records, lambda r: (r.get("stats") or {}).get("dtype"))
    if len(dtypes) > 1:
        raise ShardError(
            f"{plan.name}: shards computed in different dtypes ({_mix(dtypes)}), e.g. `dtype: auto` resolved "
            "on different hardware; set the model's dtype explicitly (a new fingerprint) and rerun"
        )
    kinds = _by_value(records, lambda r: r.get("device_kind"))
    dtype = next(iter(dtypes), "")  # the one dtype ("" where no record names one)
    if len(kinds) > 1 and dtype not in ("", "float32", "float64"):
        raise ShardError(
            f"{plan.name}: {dtype} shards computed on different devices ({_mix(kinds)}): below float32 "
            "their numerics differ; take the records (<shard>.json) of one kind out of "
            f"{plan.store} and rerun on the other kind, or use float32"
        )


def _cover_rows(plan: ShardPlan, entries: Sequence[tuple[dict[str, Any], Path]]) -> list[Path]:
    """The shard files in row order, once their row ranges are checked to cover [0, n_items) once."""
    by_start = sorted(entries, key=lambda e: (e[0]["rows"][0], e[0]["rows"][1]))
    expected = 0
    paths = []
    for record, manifest in by_start:
        i, (start, stop) = record["index"], record["rows"]
        label = f"{plan.name} shard {i} ({record.get('file')}, listed in {manifest})"
        if start < expected:
            raise ShardError(
                f"{label}: rows [{start}, {stop}) overlap rows already covered (duplicated row range)"
            )
        if start > expected:
            raise ShardError(
                f"{plan.name}: rows [{expected}, {start}) are covered by no shard "
                f"(missing shard before {label})"
            )
        expected = stop
        paths.append(plan.store / record["file"])
    if expected != plan.n_items:
        raise ShardError(
            f"{plan.name}: rows [{expected}, {plan.n_items}) are covered by no shard (missing shard)"
        )
    return paths
