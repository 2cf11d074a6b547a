"""Inside a worker process: the :class:`ShardContext` a stage's compute function gets (its rows,
device, progress bar, speed stats, chunk commits and the shard's record) and :func:`worker_main`,
which runs one shard (a :class:`ShardTask`) and writes its status file (running, or failed and why)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise import __version__
from shardwise.atomic import atomic_path, atomic_write_json
from shardwise.clock import forward_seconds
from shardwise.environment import redirect_output
from shardwise.errors import ShardError, recurs
from shardwise.fingerprint import sha256_file
from shardwise.shards.codecs import Codec
from shardwise.shards.plan import ShardPlan, chunk_ranges

log = logging.getLogger(__name__)

FORCE_CPU = "SHARDWISE_FORCE_CPU"


def _slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


@dataclass
class ShardContext:
    """What a stage's compute function gets inside its worker process."""

    plan: ShardPlan
    index: int
    codec: Codec
    args: Any  # the stage's arguments dataclass (shardwise.sharded)
    threads: int
    started: float = field(default_factory=time.time)
    stats: dict[str, Any] = field(default_factory=dict)
    clock: float = field(default=0.0, repr=False)
    forward_clock: float | None = field(default=None, repr=False)  # clock.forward_seconds() then

    @contextlib.contextmanager
    def progress(self, total: int, unit: str = "item") -> Iterator[Any]:
        """A tqdm bar over the shard's pending work (in the shard's log), and the start of the
        clock that :meth:`record_speed` reads."""
        from tqdm import tqdm

        self.clock = time.perf_counter()
        self.forward_clock = forward_seconds()
        with tqdm(total=total, unit=unit, mininterval=5, desc=f"shard {self.index}") as bar:
            yield bar

    def record_speed(self, model: Any, items: int, tokens: int, **extra: Any) -> None:
        """The stats every stage records in the shard's record (`shardwise status` reads them):
        the dtype the model ran in, torch threads, items, the model's tokens (generate: new
        tokens), seconds since :meth:`progress` began, tokens/s; then the stage's own."""
        import torch

        seconds = time.perf_counter() - self.clock
        self.stats.update(
            dtype=str(model.dtype).removeprefix("torch."),
            torch_threads=torch.get_num_threads(),
            items=items,
            tokens=tokens,
            seconds=round(seconds, 2),
            tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else None,
            **extra,
        )
        forward = forward_seconds()
        if forward is not None and self.forward_clock is not None:  # SHARDWISE_TIME_FORWARD=1
            self.stats["forward_seconds"] = round(forward - self.forward_clock, 3)

    @property
    def rows(self) -> range:
        return self.plan.ranges()[self.index]

    @property
    def n_gpus(self) -> int:
        return self.plan.spec.gpus_per_shard

    @property
    def device(self) -> str:
        """The worker's device: its first visible GPU, or the CPU when gpus_per_shard is 0.

        ``SHARDWISE_FORCE_CPU=1`` runs GPU shards on the CPU (for testing the SLURM plumbing on a
        cluster whose GPUs are fake); otherwise a GPU shard without CUDA is an error, not a silent
        and slow CPU run.
        """
        if self.n_gpus == 0:
            return "cpu"
        if os.environ.get(FORCE_CPU) == "1":
            log.warning(
                "%s=1: shard %d runs on the CPU despite gpus_per_shard %d", FORCE_CPU, self.index, self.n_gpus
            )
            return "cpu"
        import torch

        if not torch.cuda.is_available():
            raise ShardError(
                f"{self.plan.name} shard {self.index}: gpus_per_shard is {self.n_gpus} but "
                f"CUDA sees no GPU on {socket.gethostname()} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        return "cuda:0"

    def _part_path(self, chunk: range) -> Path:
        return self.plan.parts_dir(self.index) / f"{chunk.start:09d}-{chunk.stop:09d}.{self.plan.ext}"

    def pending_chunks(self) -> list[range]:
        """The shard's chunks that no earlier attempt committed (in order)."""
        chunks = chunk_ranges(self.rows, self.plan.spec.chunk_size)
        pending = [c for c in chunks if not self._part_path(c).is_file()]
        if len(pending) < len(chunks):
            log.info("resuming: %d of %d chunks already committed", len(chunks) - len(pending), len(chunks))
        return pending

    def commit(self, chunk: range, obj: Any) -> None:
        """Write one chunk's result under its final part name (atomically)."""
        with atomic_path(self._part_path(chunk)) as tmp:
            self.codec.write(obj, tmp)

    def finish(self) -> dict[str, Any]:
        """Join the committed chunks into the shard file, then write its record (= done)."""
        chunks = chunk_ranges(self.rows, self.plan.spec.chunk_size)
        parts = [self._part_path(c) for c in chunks]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise ShardError(f"{self.plan.name} shard {self.index}: chunks not committed: {missing}")
        path = self.plan.shard_path(self.index)
        with atomic_path(path) as tmp:
            self.codec.combine(parts, tmp)
        rows = self.rows
        record = {
            "stage": self.plan.stage,
            "key": self.plan.key,
            "index": self.index,
            "n_shards": self.plan.spec.n_shards,
            "rows": [rows.start, rows.stop],
            "n_rows": len(rows),
            "fingerprint": self.plan.shard_fingerprint(self.index),
            "run_fingerprint": self.plan.fingerprint,
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "host": socket.gethostname(),
            "device": _device_name(self.n_gpus),
            "device_kind": _device_kind(self.n_gpus),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "slurm_job_id": _slurm_job_id(),
            "pid": os.getpid(),
            "start": self.started,
            "end": time.time(),
            "version": __version__,
            "stats": self.stats,
        }
        atomic_write_json(self.plan.record_path(self.index), record)
        for part in parts:
            part.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.plan.parts_dir(self.index).rmdir()
        return record


def _device_name(n_gpus: int) -> str:
    if n_gpus == 0:
        return "cpu"
    import torch

    return ", ".join(torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count()))


def _device_kind(n_gpus: int) -> str:
    """The kind of processor that computed a shard (below float32 its numerics depend on it): the
    first visible GPU's name, or ``cpu: <model name>`` (also for GPU shards forced onto the CPU)."""
    if n_gpus and os.environ.get(FORCE_CPU) != "1":
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu: {model or platform.machine()}"


ComputeFn = Callable[[ShardContext], None]


@dataclass(frozen=True)
class ShardTask:
    """One shard's work order, pickled by submitit to its worker process."""

    plan: ShardPlan
    index: int
    codec: Codec
    compute: ComputeFn
    args: Any
    cuda_visible_devices: str
    threads: int


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when its parent (submitit's controller) dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _redirect_output(path: Path) -> None:
    redirect_output(path, append=True)
    logging.getLogger("submitit").propagate = False  # it has its own handler on stderr


def _write_status(plan: ShardPlan, index: int, state: str, **extra: Any) -> None:
    atomic_write_json(
        plan.status_path(index),
        {
            "state": state,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job_id": _slurm_job_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "time": time.time(),
            "log": str(plan.log_path(index)),
            **extra,
        },
    )


def _stop_on_signals() -> None:
    """submitit's task wrapper ignores SIGTERM (it expects USR2 before a SLURM time-out); a shard
    worker stops at once instead — its committed chunks are safe — and says why in its status.
    The same for SIGINT: the job stops its workers with submitit's ``cancel()``, whose local
    controller passes SIGINT on to the worker (and SIGKILL about a second later). A second signal
    is ignored, so that it does not cut short the writing of why the worker stopped."""

    def terminate(signum: int, _frame: Any) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise ShardError(f"terminated by signal {signal.Signals(signum).name} (time limit, scancel, Ctrl-C?)")

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, terminate)


def worker_main(task: ShardTask) -> dict[str, Any]:
    """Entry point of one worker process (run by submitit): compute one shard, or record why not."""
    _stop_on_signals()
    _die_with_parent()
    os.environ["CUDA_VISIBLE_DEVICES"] = task.cuda_visible_devices
    plan, i = task.plan, task.index
    _redirect_output(plan.log_path(i))
    rows = plan.ranges()[i]
    log.info(
        "shard %d of %s: rows [%d, %d), fingerprint %s, host %s, CUDA_VISIBLE_DEVICES=%r, threads %d",
        i,
        plan.name,
        rows.start,
        rows.stop,
        plan.shard_fingerprint(i),
        socket.gethostname(),
        task.cuda_visible_devices,
        task.threads,
    )
    _write_status(plan, i, "running")
    try:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(task.threads)  # read by torch/numpy when the stage imports them
        ctx = ShardContext(plan=plan, index=i, codec=task.codec, args=task.args, threads=task.threads)
        task.compute(ctx)
        record = ctx.finish()
    except BaseException as exc:
        log.error("shard %d failed:\n%s", i, traceback.format_exc())
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _write_status(plan, i, "failed", error=error, recurring=recurs(exc))
        raise
    plan.status_path(i).unlink(missing_ok=True)
    log.info(
        "shard %d done: %d rows in %.1f s -> %s",
        i,
        record["n_rows"],
        record["end"] - record["start"],
        plan.shard_path(i),
    )
    return record
