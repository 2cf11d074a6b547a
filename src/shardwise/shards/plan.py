"""The plan of a stage output's shards: row ranges, fingerprints, the store's paths, and whether a
shard is done. Nothing here writes; reading a shard's record (and, asked for it, its data) is all."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.config import ShardSpec
from shardwise.errors import ShardError
from shardwise.fingerprint import sha256_file, stable_hash


def shard_ranges(n_items: int, n_shards: int, align: int = 1) -> list[range]:
    """Cut [0, n_items) into `n_shards` contiguous ranges; the first ones get one extra item.

    With `align` > 1 the cut is made in blocks of `align` items (only the last block may be short),
    so every shard boundary is a multiple of `align`, whatever `n_shards` is. A stage whose batches
    are formed inside such blocks then computes every item in the same batch for any `n_shards`.
    """
    if n_shards < 1 or align < 1:
        raise ValueError("n_shards and align must be >= 1")
    n_blocks = -(-n_items // align)
    size, extra = divmod(n_blocks, n_shards)
    ranges, start = [], 0
    for i in range(n_shards):
        stop = start + size + (1 if i < extra else 0)
        ranges.append(range(min(start * align, n_items), min(stop * align, n_items)))
        start = stop
    return ranges


def chunk_ranges(rows: range, chunk_size: int) -> list[range]:
    """Cut a shard's rows into commit chunks (fixed boundaries from the shard start)."""
    return [range(a, min(a + chunk_size, rows.stop)) for a in range(rows.start, rows.stop, chunk_size)]


def file_problem(path: Path, record: dict[str, Any], checksum: bool) -> str | None:
    """Why a shard file does not hold its record's data (None: it does): missing, another size
    than recorded, or (with `checksum`, which reads the whole file) another sha256."""
    if not path.is_file():
        return "file missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes, recorded {record.get('bytes')} (truncated or altered)"
    if checksum and sha256_file(path) != record.get("sha256"):
        return "fails its sha256 checksum (altered or corrupt)"
    return None


@dataclass(frozen=True)
class ShardPlan:
    """Everything that fixes a stage output's shards: what they hold, where they live."""

    stage: str
    key: str
    n_items: int
    spec: ShardSpec
    identity: dict[str, Any]
    root: Path
    log_dir: Path
    ext: str
    align: int = 1
    fingerprint: str = field(init=False)
    _ranges: tuple[range, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ShardError(f"{self.stage}/{self.key}: no items to shard")
        n_blocks = -(-self.n_items // self.align)
        if self.spec.n_shards > n_blocks:
            what = "items" if self.align == 1 else f"blocks of {self.align} items (chunk_size)"
            raise ShardError(
                f"{self.stage}/{self.key}: n_shards ({self.spec.n_shards}) exceeds the number "
                f"of {what} ({n_blocks})"
            )
        content = {
            "stage": self.stage,
            "key": self.key,
            "n_items": self.n_items,
            "align": self.align,
            **self.spec.content_params(),
            "identity": self.identity,
        }
        object.__setattr__(self, "fingerprint", stable_hash(content)[:16])
        # cut once: a status poll or a merge asks for every shard's range (O(shards), not O(shards^2))
        object.__setattr__(self, "_ranges", tuple(shard_ranges(self.n_items, self.spec.n_shards, self.align)))

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def store(self) -> Path:
        return self.root / "shards" / self.fingerprint

    def ranges(self) -> tuple[range, ...]:
        return self._ranges

    def _stem(self, i: int) -> str:
        return f"{i:04d}-of-{self.spec.n_shards:04d}"

    def shard_path(self, i: int) -> Path:
        return self.store / f"{self._stem(i)}.{self.ext}"

    def record_path(self, i: int) -> Path:
        return self.store / f"{self._stem(i)}.json"

    def status_path(self, i: int) -> Path:
        return self.store / f"{self._stem(i)}.status.json"

    def parts_dir(self, i: int) -> Path:
        return self.store / f"{self._stem(i)}.parts"

    def log_path(self, i: int) -> Path:
        return self.log_dir / f"shard-{i:04d}.log"

    def shard_fingerprint(self, i: int) -> str:
        rows = self.ranges()[i]
        return stable_hash({"run": self.fingerprint, "index": i, "rows": [rows.start, rows.stop]})[:16]

    def read_record(self, i: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path(i).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def problem(self, i: int, checksum: bool = False) -> str | None:
        """Why shard i is not done (None: it is done): no record at its final name, a record of
        another run (fingerprint), or a data file missing, of another size than recorded or (with
        `checksum`, which reads the whole file) of another sha256. Only reads."""
        record = self.read_record(i)
        if record is None:
            return "no record"
        if record.get("fingerprint") != self.shard_fingerprint(i):
            return f"its record is of another run (fingerprint {record.get('fingerprint')})"
        return file_problem(self.shard_path(i), record, checksum)

    def is_done(self, i: int, checksum: bool = False) -> bool:
        """Done = record at its final name, current fingerprint, data file of the recorded size
        (and, with `checksum`, of the recorded sha256: a job checks that before skipping a shard;
        a status poll does not read the data). Only reads: a job takes a shard that fails its
        checksum out of the store itself (:func:`shardwise.shards.store.pending_shards`)."""
        return self.problem(i, checksum) is None
