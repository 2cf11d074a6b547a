"""`shardwise status`: per stage output, shards done / running / failed / pending, the failing
shards' log tails, and the throughput of finished shards. Reads only the shard stores."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.config import ShardSpec
from shardwise.shards import ShardPlan, log_tail


@dataclass
class ShardState:
    index: int
    state: str  # done | running | failed | pending
    detail: str = ""
    record: dict[str, Any] | None = None
    log: Path | None = None


@dataclass
class RunStatus:
    plan: ShardPlan
    shards: list[ShardState] = field(default_factory=list)
    older_runs: int = 0

    def count(self, state: str) -> int:
        return sum(s.state == state for s in self.shards)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_states(job_ids: set[str]) -> dict[str, str]:
    """SLURM job id -> state (RUNNING, TIMEOUT, CANCELLED by ...), from sacct when it is there."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State", "-j", ",".join(sorted(job_ids))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def load_plan(path: Path) -> ShardPlan:
    data = json.loads(path.read_text())
    root = path.parents[2]
    return ShardPlan(
        stage=data["stage"],
        key=data["key"],
        n_items=data["n_items"],
        spec=ShardSpec(**data["spec"]),
        identity=data["identity"],
        root=root,
        log_dir=Path(data["log_dir"]),
        ext=data["ext"],
        align=data.get("align", 1),
    )


def read_status(plan: ShardPlan, i: int) -> dict[str, Any] | None:
    try:
        return json.loads(plan.status_path(i).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_state(plan: ShardPlan, i: int, slurm: dict[str, str] | None = None) -> ShardState:
    """done / running / failed / pending, from the shard's record and status file (and sacct)."""
    log_path = plan.log_path(i)
    if plan.is_done(i):
        return ShardState(i, "done", record=plan.read_record(i), log=log_path)
    status = read_status(plan, i)
    if status is None:
        return ShardState(i, "pending", log=log_path)
    where = f"host {status.get('host')} pid {status.get('pid')}"
    job_id = status.get("slurm_job_id")
    job_state = (slurm or {}).get(job_id) if job_id else None
    if job_id:
        where += f", SLURM job {job_id}" + (f" {job_state}" if job_state else "")
    if status["state"] == "failed":
        return ShardState(i, "failed", f"{status.get('error', '')} ({where})", log=log_path)
    gone = status.get("host") == socket.gethostname() and not _pid_alive(int(status["pid"]))
    if gone or (job_state and not job_state.startswith(("RUNNING", "PENDING", "REQUEUED"))):
        return ShardState(i, "failed", f"worker died without a word, killed? ({where})", log=log_path)
    return ShardState(i, "running", where, log=log_path)


def verify_stores(results: str | Path = "results") -> tuple[list[str], int]:
    """Every recorded shard of the newest run of each stage output, read and checked against its
    record (size, sha256); touches nothing. Returns (one line per run, number of bad shards)."""
    from shardwise.shards import _shard_problem

    lines, n_bad = [], 0
    for run in collect(results):
        plan, checked, bad = run.plan, 0, []
        for i in range(plan.spec.n_shards):
            record = plan.read_record(i)
            if record is None or record.get("fingerprint") != plan.shard_fingerprint(i):
                continue
            checked += 1
            problem = _shard_problem(plan.shard_path(i), record, checksum=True)
            if problem:
                bad.append(f"shard {i} ({plan.shard_path(i)}): {problem}")
        n_bad += len(bad)
        state = "all verified" if not bad else f"{len(bad)} bad: " + "; ".join(bad)
        lines.append(f"{plan.name}: {checked} of {plan.spec.n_shards} shards recorded, {state}")
    return lines, n_bad


def collect(results: str | Path = "results") -> list[RunStatus]:
    """The newest run of every stage output found under `results`."""
    by_output: dict[tuple[str, str], list[Path]] = {}
    for plan_file in Path(results).glob("**/shards/*/plan.json"):
        data = json.loads(plan_file.read_text())
        by_output.setdefault((data["stage"], data["key"]), []).append(plan_file)
    plans = {}
    for key in sorted(by_output):
        files = sorted(by_output[key], key=lambda p: p.stat().st_mtime)
        plans[key] = (load_plan(files[-1]), len(files) - 1)
    job_ids = {
        str(st["slurm_job_id"])
        for plan, _ in plans.values()
        for i in range(plan.spec.n_shards)
        if (st := read_status(plan, i)) and st.get("slurm_job_id")
    }
    slurm = slurm_states(job_ids)
    return [
        RunStatus(plan, [shard_state(plan, i, slurm) for i in range(plan.spec.n_shards)], older_runs=older)
        for plan, older in plans.values()
    ]


def _throughput(run: RunStatus) -> str:
    records = [s.record for s in run.shards if s.state == "done" and s.record]
    if not records:
        return ""
    seconds = sum(r["end"] - r["start"] for r in records)
    rows = sum(r["n_rows"] for r in records)
    text = f"{rows / seconds:.2f} items/s per worker" if seconds > 0 else ""
    tokens = [r["stats"].get("new_tokens_per_s") for r in records if r.get("stats")]
    tokens = [t for t in tokens if t]
    if tokens:
        text += f", {sum(tokens) / len(tokens):.1f} new tokens/s per worker"
    return text


def render(runs: list[RunStatus], tail: int = 8) -> str:
    if not runs:
        return "no shard stores found (nothing has run yet?)\n"
    lines = []
    for run in runs:
        plan = run.plan
        counts = ", ".join(f"{run.count(s)} {s}" for s in ("done", "running", "failed", "pending"))
        older = f"  [{run.older_runs} older run(s) kept]" if run.older_runs else ""
        lines.append(f"{plan.name}: {plan.spec.n_shards} shards ({counts}), run {plan.fingerprint}{older}")
        speed = _throughput(run)
        if speed:
            lines.append(f"  throughput: {speed}")
        for shard in run.shards:
            if shard.state in ("running", "failed"):
                lines.append(f"  shard {shard.index}: {shard.state}: {shard.detail}")
                if shard.state == "failed" and shard.log is not None:
                    lines.append(f"    --- last lines of {shard.log} ---")
                    lines.extend("    " + ln for ln in log_tail(shard.log, tail).splitlines())
    return "\n".join(lines) + "\n"
