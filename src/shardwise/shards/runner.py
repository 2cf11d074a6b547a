"""The job runner: one Snakemake job runs its pending shards in parallel worker processes
(submitit's local executor, one per shard, each pinned to its own GPUs), waits for them, names each
failed shard and its cause (its own error, a killed process, the OOM killer), writes the job's
manifest. Stopped by SIGTERM or SIGINT, the job stops its workers through submitit's public
``job.cancel()`` (each worker then writes why it ended into its status)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from shardwise.atomic import atomic_write_json
from shardwise.environment import export_package_path
from shardwise.errors import ShardError
from shardwise.shards.codecs import Codec
from shardwise.shards.plan import ShardPlan
from shardwise.shards.store import pending_shards, write_plan_file
from shardwise.shards.worker import ComputeFn, ShardTask, worker_main

log = logging.getLogger(__name__)

TAIL_LINES = 20


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
    args: Any,
    manifest: str | Path,
    threads: int = 1,
) -> dict[str, Any]:
    """Run job `job` of `plan`: skip done shards, run the others in parallel workers, write the
    manifest. Raises ShardError naming each failed shard and its log; other workers finish."""
    import submitit

    indices = plan.spec.job_shards(job)
    write_plan_file(plan)
    pending = pending_shards(plan, indices)
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
            # submitit's public cancel: SIGINT to the worker's controller (the wrapper), which
            # passes SIGINT on to the worker, then SIGKILL ~1 s later (submitit.local.Controller)
            for _, handle in running:
                with contextlib.suppress(Exception):
                    handle.cancel(check=False)
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
        done = plan.read_record(i)
        if done is None or not plan.is_done(i):
            raise ShardError(f"{plan.name} shard {i}: worker returned but the shard is not done")
        records.append(done)
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
