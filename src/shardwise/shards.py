"""The shard mechanism shared by every sharded stage (docs/design.md §2).

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
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shardwise import __version__
from shardwise.atomic import atomic_path, atomic_write_json
from shardwise.clock import forward_seconds
from shardwise.config import ShardSpec
from shardwise.environment import export_package_path, redirect_output
from shardwise.errors import ShardError, recurs
from shardwise.fingerprint import sha256_file, stable_hash

log = logging.getLogger(__name__)

TAIL_LINES = 20
FORCE_CPU = "SHARDWISE_FORCE_CPU"


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


class Codec(Protocol):
    """How a stage's chunks are written and joined into a shard file."""

    ext: str

    def write(self, obj: Any, path: Path) -> None: ...

    def combine(self, parts: Sequence[Path], path: Path) -> None: ...


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

    def is_done(self, i: int, checksum: bool = False) -> bool:
        """Done = record at its final name, current fingerprint, data file of the recorded size
        (and, with `checksum`, of the recorded sha256: a job checks that before skipping a shard;
        a status poll does not read the data). A shard that fails the checksum is invalidated."""
        record = self.read_record(i)
        if record is None or record.get("fingerprint") != self.shard_fingerprint(i):
            return False
        path = self.shard_path(i)
        problem = _shard_problem(path, record, checksum)
        if problem and checksum and path.is_file() and path.stat().st_size == record.get("bytes"):
            log.warning("shard %d of %s: %s; computing it again", i, self.name, problem)
            invalidate(self, i, path)
        return problem is None

    def write_plan_file(self) -> None:
        path = self.store / "plan.json"
        if not path.exists():
            atomic_write_json(
                path,
                {
                    "stage": self.stage,
                    "key": self.key,
                    "n_items": self.n_items,
                    "spec": asdict(self.spec),
                    "identity": self.identity,
                    "fingerprint": self.fingerprint,
                    "log_dir": str(self.log_dir),
                    "ext": self.ext,
                    "align": self.align,
                    "version": __version__,
                },
            )


# --------------------------------------------------------------------------- inside a worker


def _slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


@dataclass
class ShardContext:
    """What a stage's compute function gets inside its worker process."""

    plan: ShardPlan
    index: int
    codec: Codec
    args: dict[str, Any]
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


ComputeFn = Callable[[ShardContext], None]


@dataclass(frozen=True)
class ShardTask:
    """One shard's work order, pickled by submitit to its worker process."""

    plan: ShardPlan
    index: int
    codec: Codec
    compute: ComputeFn
    args: dict[str, Any]
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


def _stop_on_sigterm() -> None:
    """submitit's task wrapper ignores SIGTERM (it expects USR2 before a SLURM time-out); a shard
    worker stops at once instead — its committed chunks are safe — and says why in its status."""

    def terminate(signum: int, _frame: Any) -> None:
        raise ShardError(f"terminated by signal {signal.Signals(signum).name} (time limit, scancel, Ctrl-C?)")

    signal.signal(signal.SIGTERM, terminate)


def worker_main(task: ShardTask) -> dict[str, Any]:
    """Entry point of one worker process (run by submitit): compute one shard, or record why not."""
    _stop_on_sigterm()
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


# --------------------------------------------------------------------------- the job runner


def visible_gpus() -> list[str]:
    """The GPUs this job may use: its CUDA_VISIBLE_DEVICES (set by SLURM), else all there are."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    try:
        import torch

        return [str(d) for d in range(torch.cuda.device_count())]
    except ImportError:
        return []


def job_cpus(threads: int) -> int:
    """CPUs this job may use: under SLURM the step's CPUs (SLURM_CPUS_ON_NODE, bounded by the CPU
    affinity where cgroups set it), else Snakemake's `threads`. Workers split them, so that
    several jobs on one node never oversubscribe it (OpenMP threads spin: 30x slower)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return threads
    cpus = len(os.sched_getaffinity(0))
    on_node = os.environ.get("SLURM_CPUS_ON_NODE", "")
    return min(cpus, int(on_node)) if on_node.isdigit() else cpus


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup (the
    SLURM job's, under SLURM): cgroup v2 memory.events, v1 memory.oom_control. None: not readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events"]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control"]
        else:
            continue
        for candidate in candidates:
            try:
                for entry in candidate.read_text().splitlines():
                    key, _, value = entry.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit():
                        return int(value)
            except OSError:
                continue
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failed_recurring(plan: ShardPlan, i: int) -> bool:
    """Whether shard i's worker recorded an error that a rerun meets again (errors.recurs)."""
    try:
        return bool(json.loads(plan.status_path(i).read_text()).get("recurring"))
    except (OSError, ValueError, AttributeError):
        return False


def describe_failure(plan: ShardPlan, i: int, oom_before: int | None) -> str:
    """Why shard i's worker failed, from what it left: its own error (status file), else how its
    compute process ended. A compute process still alive (its submitit wrapper was killed) is
    killed, so that no process outlives its job."""
    try:
        status = json.loads(plan.status_path(i).read_text())
    except (OSError, ValueError):
        status = {}
    if status.get("state") == "failed" and status.get("error"):
        return str(status["error"])
    pid = status.get("pid")
    if not pid:
        return "its worker ended before it started computing (see the submitit log in the log directory)"
    if status.get("host") == socket.gethostname() and pid_alive(int(pid)):
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGKILL)
        return f"its submitit wrapper died; its compute process pid {pid}, still running, was killed"
    after = oom_kills()
    if oom_before is not None and after is not None and after > oom_before:
        return (
            f"its compute process pid {pid} was killed by the kernel's OOM killer (out of memory: lower "
            "batch_size / batch_tokens, or ask for more memory)"
        )
    return (
        f"its compute process pid {pid} died without a word: killed by a signal (SIGKILL?) or the "
        "OOM killer outside this job"
    )


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return "(no log)\n"


def _log_compute_pids(plan: ShardPlan, running: list[tuple[int, Any]], wait_s: float = 30.0) -> None:
    """Name each worker's compute process in the job log (the pid submitit reports is its wrapper's),
    as soon as the worker has written its status (within `wait_s`)."""
    todo = {i: handle for i, handle in running}
    deadline = time.monotonic() + wait_s
    while todo and time.monotonic() < deadline:
        for i in list(todo):
            try:
                pid = json.loads(plan.status_path(i).read_text()).get("pid")
            except (OSError, ValueError):
                pid = None
            if pid or todo[i].done():
                log.info(
                    "shard %d of %s: compute pid %s (submitit wrapper pid %s)",
                    i,
                    plan.name,
                    pid,
                    todo[i].job_id,
                )
                del todo[i]
        if todo:
            time.sleep(0.2)


def run_job(
    plan: ShardPlan,
    job: int,
    compute: ComputeFn,
    codec: Codec,
    args: dict[str, Any],
    manifest: str | Path,
    threads: int = 1,
) -> dict[str, Any]:
    """Run job `job` of `plan`: skip done shards, run the others in parallel workers, write the
    manifest. Raises ShardError naming each failed shard and its log; other workers finish."""
    import submitit

    indices = plan.spec.job_shards(job)
    plan.write_plan_file()
    pending = [i for i in indices if not plan.is_done(i, checksum=True)]
    for i in sorted(set(indices) - set(pending)):
        log.info("shard %d of %s: done, skipped (%s)", i, plan.name, plan.shard_path(i))

    if pending:
        g = plan.spec.gpus_per_shard
        gpus = visible_gpus() if g else []
        if len(gpus) < g * len(pending):
            raise ShardError(
                f"{plan.name} job {job}: needs {g * len(pending)} GPU(s) for "
                f"{len(pending)} shard(s) x gpus_per_shard {g}, sees {len(gpus)}"
            )
        export_package_path()  # workers import this same shardwise
        # a fixed share per shard of the job (not per pending shard): the torch thread count changes
        # bf16 sums on the CPU, so a resumed job and every layout compute each shard alike
        per_worker = max(1, job_cpus(threads) // plan.spec.shards_per_job)
        folder = plan.log_dir / "submitit"
        running = []
        for k, i in enumerate(pending):
            plan.status_path(i).unlink(missing_ok=True)  # a former attempt's: this one writes its own
            mine = gpus[k * g : (k + 1) * g]
            executor = submitit.LocalExecutor(folder=folder)
            params: dict[str, Any] = {"timeout_min": 60 * 24 * 14, "gpus_per_node": len(mine)}
            if mine and all(d.isdigit() for d in mine):
                params["visible_gpus"] = tuple(int(d) for d in mine)
            executor.update_parameters(**params)
            task = ShardTask(
                plan=plan,
                index=i,
                codec=codec,
                compute=compute,
                args=args,
                cuda_visible_devices=",".join(mine),
                threads=per_worker,
            )
            running.append((i, executor.submit(worker_main, task)))
            log.info(
                "shard %d of %s: started worker (submitit wrapper pid %s) on %s, log %s",
                i,
                plan.name,
                running[-1][1].job_id,
                ",".join(mine) or "cpu",
                plan.log_path(i),
            )

        def stop_workers(signum: int, _frame: Any) -> None:
            for _, handle in running:
                with contextlib.suppress(Exception):
                    handle._process.send_signal(signal.SIGTERM)  # controller forwards to the worker
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, stop_workers) for s in (signal.SIGTERM, signal.SIGINT)}
        failures = []
        oom_before = oom_kills()
        try:
            _log_compute_pids(plan, running)
            for i, handle in running:
                try:
                    record = handle.result()
                    log.info("shard %d of %s: done in %.1f s", i, plan.name, record["end"] - record["start"])
                except Exception:  # FailedJobError, UncompletedJobError (killed worker)
                    failures.append((i, describe_failure(plan, i, oom_before)))
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        for i, reason in failures:
            path = plan.log_path(i)
            log.error(
                "shard %d of %s failed: %s\n--- tail of %s ---\n%s",
                i,
                plan.name,
                reason,
                path,
                log_tail(path),
            )
        if failures:
            names = "; ".join(f"shard {i}: {reason} (log {plan.log_path(i)})" for i, reason in failures)
            error = ShardError(
                f"{plan.name} job {job}: {len(failures)} of {len(pending)} worker(s) "
                f"failed: {names}. Finished shards are kept; rerun to compute the rest."
            )
            # every failed worker met an error that a rerun meets again: retrying the job is pointless
            error.recurring = all(_failed_recurring(plan, i) for i, _ in failures)
            raise error

    records = []
    for i in indices:
        record = plan.read_record(i)
        if record is None or not plan.is_done(i):
            raise ShardError(f"{plan.name} shard {i}: worker returned but the shard is not done")
        records.append(record)
    manifest_obj = {
        "stage": plan.stage,
        "key": plan.key,
        "job": job,
        "run_fingerprint": plan.fingerprint,
        "store": str(plan.store),
        "shards": records,
    }
    atomic_write_json(Path(manifest), manifest_obj)
    log.info("%s job %d: %d shard(s) verified, manifest %s", plan.name, job, len(records), manifest)
    return manifest_obj


# --------------------------------------------------------------------------- merge verification


def _shard_problem(path: Path, record: dict[str, Any], checksum: bool) -> str | None:
    """Why a shard file does not hold its record's data (None: it does)."""
    if not path.is_file():
        return "file missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes, recorded {record.get('bytes')} (truncated or altered)"
    if checksum and sha256_file(path) != record.get("sha256"):
        return "fails its sha256 checksum (altered or corrupt)"
    return None


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
            problem = _shard_problem(store / str(record.get("file")), record, checksum=False)
            if problem:
                bad.append(f"shard {record.get('index')} ({problem})")
        if bad:
            manifest.unlink(missing_ok=True)
            lines.append(
                f"{data.get('stage')}/{data.get('key')} job {data.get('job')}: {', '.join(bad)}; "
                f"its manifest {manifest} is removed, so this run computes those shards again"
            )
    return lines


def invalidate(plan: ShardPlan, index: int, path: Path) -> None:
    """Take a shard that failed verification out of the store: its record goes (so it is pending)
    and its data file is kept aside as ``<file>.bad`` for inspection."""
    plan.record_path(index).unlink(missing_ok=True)
    if path.is_file():
        os.replace(path, path.with_name(path.name + ".bad"))


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
    those shards and merges. Row ranges that do not cover [0, n_items) exactly once are refused.
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
        problem = _shard_problem(path, record, checksum=True)
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

    dtypes: dict[str, list[int]] = {}
    for record, _ in entries:
        dtype = (record.get("stats") or {}).get("dtype")
        if dtype:
            dtypes.setdefault(str(dtype), []).append(record["index"])
    if len(dtypes) > 1:
        mix = "; ".join(f"{d}: shard(s) {', '.join(map(str, sorted(i)))}" for d, i in sorted(dtypes.items()))
        raise ShardError(
            f"{plan.name}: shards computed in different dtypes ({mix}), e.g. `dtype: auto` resolved on "
            "different hardware; set the model's dtype explicitly (a new fingerprint) and rerun"
        )

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


# --------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class ParquetCodec:
    """Chunks are pandas DataFrames; a shard is their concatenation as one Parquet file."""

    ext: str = "parquet"

    def write(self, obj: Any, path: Path) -> None:
        obj.to_parquet(path, index=False)

    def combine(self, parts: Sequence[Path], path: Path) -> None:
        """Stream the parts into one file, one part in memory at a time (a row group each): a
        merged run of the Snellius example is 2.5M generations, ~0.6 GB as one Arrow table. Schemas
        are unified as ``pa.concat_tables(promote_options="default")`` does (a column that is all
        None in one chunk has type null there; a column missing from a part is null in its rows)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="default")
        empty = schema.empty_table()
        with pq.ParquetWriter(path, schema) as writer:
            for part in parts:
                table = pa.concat_tables([empty, pq.read_table(part)], promote_options="default")
                writer.write_table(table)
