"""`shardwise status`: per stage output, shards done / running / failed / pending, the failing
shards' log tails, and the throughput of finished shards. Reads only the shard stores."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.config import Config, ShardSpec
from shardwise.errors import ShardwiseError
from shardwise.shards.plan import ShardPlan, file_problem
from shardwise.shards.runner import log_tail, pid_alive


@dataclass
class ShardState:
    index: int
    state: str  # done | running | failed | pending
    detail: str = ""
    record: dict[str, Any] | None = None
    log: Path | None = None


@dataclass
class Billing:
    """What the SLURM jobs that finished a run's shards were billed (elapsed x allocated GPUs, or
    cores for a CPU stage, from sacct) and what its shards computed (their compute time x GPUs, or x
    torch threads)."""

    unit: str  # "GPU-h" | "core-h"
    jobs: int
    billed: float
    used: float


@dataclass
class RunStatus:
    plan: ShardPlan
    shards: list[ShardState] = field(default_factory=list)
    older_runs: int = 0
    billing: Billing | None = None

    def count(self, state: str) -> int:
        return sum(s.state == state for s in self.shards)


def parse_sacct(text: str) -> dict[str, str]:
    """`sacct -X -n -P -o JobIDRaw,State` output -> {job id: state}; a state keeps its detail
    ("CANCELLED by 1000")."""
    states = {}
    for line in text.splitlines():
        job_id, sep, state = line.strip().partition("|")
        if sep and job_id:
            states[job_id] = state.strip()
    return states


def _sacct(job_ids: set[str], fields: str) -> str:
    """`sacct -X -n -P -o <fields>` of the jobs: "" without job ids, without sacct, or on its failure."""
    if not job_ids or shutil.which("sacct") is None:
        return ""
    cmd = ["sacct", "-X", "-n", "-P", "-o", fields, "-j", ",".join(sorted(job_ids))]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_states(job_ids: set[str]) -> dict[str, str]:
    """SLURM job id -> state (RUNNING, TIMEOUT, CANCELLED by ...), from sacct when it is there."""
    return parse_sacct(_sacct(job_ids, "JobIDRaw,State"))


def parse_sacct_usage(text: str) -> dict[str, tuple[float, int, int]]:
    """`sacct -X -n -P -o JobIDRaw,ElapsedRaw,AllocTRES` -> {job id: (elapsed s, cpus, GPUs)}."""
    usage = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        tres = dict(kv.split("=", 1) for kv in parts[2].split(",") if "=" in kv)
        usage[parts[0]] = (float(parts[1]), int(tres.get("cpu", 0) or 0), int(tres.get("gres/gpu", 0) or 0))
    return usage


def slurm_usage(job_ids: set[str]) -> dict[str, tuple[float, int, int]]:
    """Elapsed seconds and allocated cpus and GPUs of ended or running SLURM jobs, from sacct."""
    return parse_sacct_usage(_sacct(job_ids, "JobIDRaw,ElapsedRaw,AllocTRES"))


def billing(run: RunStatus, usage: dict[str, tuple[float, int, int]]) -> Billing | None:
    """Billed vs used of the SLURM jobs that finished `run`'s done shards (None: none known)."""
    done = [s.record for s in run.shards if s.state == "done" and s.record and s.record.get("slurm_job_id")]
    jobs = {str(r["slurm_job_id"]) for r in done} & set(usage)
    if not jobs:
        return None
    gpus = run.plan.spec.gpus_per_shard
    billed = sum(usage[j][0] * (usage[j][2] if gpus else usage[j][1]) for j in jobs) / 3600
    used = 0.0
    for r in done:
        if str(r["slurm_job_id"]) in jobs:
            per = gpus or int((r.get("stats") or {}).get("torch_threads") or 1)
            used += (r["end"] - r["start"]) * per / 3600
    return Billing("GPU-h" if gpus else "core-h", len(jobs), billed, used)


# SLURM job states in which the job's workers still live (or will): anything else ended the job.
ALIVE = ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")
# What an ended job's state means for its unfinished shards, and what the user does.
CAUSES = {
    "TIMEOUT": "the job hit its time limit; a rerun resumes from the last committed chunk, and a "
    "retry gets twice the time (profiles/slurm runtime)",
    "OUT_OF_MEMORY": "the job ran out of memory; raise mem_mb_per_cpu for this rule in the profile, "
    "or lower batch_size / batch_tokens",
    "CANCELLED": "the job was cancelled (scancel, or the scheduler); a rerun resumes",
    "NODE_FAIL": "the job's node failed; a rerun resumes on another node",
    "PREEMPTED": "the job was preempted; a rerun resumes",
    "BOOT_FAIL": "the job's node failed to boot; a rerun resumes on another node",
    "DEADLINE": "the job reached its deadline; a rerun resumes",
    "FAILED": "the job exited non-zero; see the shard's log",
    "COMPLETED": "the job ended without finishing this shard; see the shard's log",
}


def slurm_cause(state: str | None) -> str | None:
    """None while the job lives (or its state is unknown), else what its end means."""
    if not state:
        return None
    word = state.split()[0].rstrip("+")
    if word in ALIVE:
        return None
    return f"SLURM job {state}: {CAUSES.get(word, 'the job ended')}"


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
    cause = slurm_cause(job_state)
    if status["state"] == "failed":
        error = status.get("error", "")
        if cause and ("signal" in error or "died" in error):
            error = cause  # a signal from SLURM says less than the job's state
        return ShardState(i, "failed", f"{error} ({where})", log=log_path)
    if cause:
        return ShardState(i, "failed", f"{cause} ({where})", log=log_path)
    gone = status.get("host") == socket.gethostname() and not pid_alive(int(status["pid"]))
    if gone:
        return ShardState(i, "failed", f"worker died without a word, killed? ({where})", log=log_path)
    return ShardState(i, "running", where, log=log_path)


def verify_stores(results: str | Path = "results") -> tuple[list[str], int]:
    """Every recorded shard of the newest run of each stage output, read and checked against its
    record (size, sha256); touches nothing. Returns (one line per run, number of bad shards)."""
    lines, n_bad = [], 0
    for run in collect(results):
        plan, checked, bad = run.plan, 0, []
        for i in range(plan.spec.n_shards):
            record = plan.read_record(i)
            if record is None or record.get("fingerprint") != plan.shard_fingerprint(i):
                continue
            checked += 1
            problem = file_problem(plan.shard_path(i), record, checksum=True)
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


# Snellius bills a gpu_a100 GPU at 128 SBU per hour (a 4-GPU node 512 SBU/h; 1/4 node = 1 GPU +
# 18 cores), per allocated GPU, idle or not. The one place the rate is set: change it here when
# SURF's accounting page says otherwise (README "Cost (SBU)").
SBU_PER_GPU_HOUR = 128


@dataclass
class Progress:
    """What the finished shards of a run measured, and what that projects for the rest."""

    items_per_s: float  # per worker
    tokens_per_s: float | None  # per worker, every stage's model tokens (generate: new tokens)
    remaining_items: int
    workers: int  # in parallel: the running shards, else one job's worth
    eta_s: float
    gpu_hours_spent: float
    gpu_hours_left: float

    @property
    def sbu_spent(self) -> float:
        return self.gpu_hours_spent * SBU_PER_GPU_HOUR

    @property
    def sbu_projected(self) -> float:
        return (self.gpu_hours_spent + self.gpu_hours_left) * SBU_PER_GPU_HOUR


def progress(run: RunStatus) -> Progress | None:
    """Throughput of the done shards and, at that rate, the time and GPU-hours the others need."""
    records = [s.record for s in run.shards if s.state == "done" and s.record]
    seconds = sum(r["end"] - r["start"] for r in records)
    if not records or seconds <= 0:
        return None
    rate = sum(r["n_rows"] for r in records) / seconds
    tokens = [r.get("stats", {}).get("tokens_per_s") for r in records]
    tokens = [x for x in tokens if x]
    ranges = run.plan.ranges()
    remaining = sum(len(ranges[s.index]) for s in run.shards if s.state != "done")
    workers = run.count("running") or min(run.plan.spec.shards_per_job, max(1, len(ranges) - len(records)))
    gpus = run.plan.spec.gpus_per_shard
    return Progress(
        items_per_s=rate,
        tokens_per_s=sum(tokens) / len(tokens) if tokens else None,
        remaining_items=remaining,
        workers=workers,
        eta_s=remaining / rate / workers,
        gpu_hours_spent=seconds * gpus / 3600,
        gpu_hours_left=remaining / rate * gpus / 3600,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _throughput(run: RunStatus) -> list[str]:
    p = progress(run)
    if p is None:
        return []
    unit = "new tokens/s" if run.plan.stage == "generate" else "tokens/s"
    speed = f"{p.items_per_s:.2f} items/s per worker"
    if p.tokens_per_s:
        speed += f", {p.tokens_per_s:.1f} {unit} per worker"
    lines = [f"  throughput: {speed}"]
    if p.remaining_items:
        lines.append(
            f"  ETA: {_duration(p.eta_s)} for {p.remaining_items} items at {p.workers} worker(s) in parallel"
        )
    if run.plan.spec.gpus_per_shard:
        lines.append(
            f"  cost: {p.sbu_spent:,.0f} SBU spent, {p.sbu_projected:,.0f} SBU projected "
            f"({SBU_PER_GPU_HOUR} SBU per GPU-hour, shard compute time only)"
        )
    return lines


def _billing(run: RunStatus) -> list[str]:
    b = run.billing
    if b is None or b.billed <= 0:
        return []
    return [
        f"  billed: {b.billed:,.2f} {b.unit} in {b.jobs} SLURM job(s) (elapsed x allocated); the shards "
        f"computed {b.used:,.2f} {b.unit} of it ({100 * b.used / b.billed:.0f} %)"
    ]


def render(runs: list[RunStatus], tail: int = 8) -> str:
    if not runs:
        return "no shard stores found (nothing has run yet?)\n"
    lines = []
    for run in runs:
        plan = run.plan
        counts = ", ".join(f"{run.count(s)} {s}" for s in ("done", "running", "failed", "pending"))
        older = f"  [{run.older_runs} older run(s) kept]" if run.older_runs else ""
        lines.append(f"{plan.name}: {plan.spec.n_shards} shards ({counts}), run {plan.fingerprint}{older}")
        lines.extend(_throughput(run))
        lines.extend(_billing(run))
        for shard in run.shards:
            if shard.state in ("running", "failed"):
                lines.append(f"  shard {shard.index}: {shard.state}: {shard.detail}")
                if shard.state == "failed" and shard.log is not None:
                    lines.append(f"    --- last lines of {shard.log} ---")
                    lines.extend("    " + ln for ln in log_tail(shard.log, tail).splitlines())
    return "\n".join(lines) + "\n"


def expected_stages(cfg: Config) -> dict[str, ShardSpec]:
    """Every sharded stage output a config asks for, by its name in the shard stores
    (`<stage>/<key>`, ShardPlan.name), with its shard layout."""
    gen, tl, pr, an = cfg.generate, cfg.teacher_logits, cfg.probes, cfg.analysis
    names: dict[str, ShardSpec] = {f"generate/{run}": gen.shards for run in gen.runs}
    names.update({f"teacher_logits/{teacher}": tl.shards for teacher in tl.teachers})
    for probe_set in cfg.probe_sets():
        names.update({f"activations/{probe_set}/{model}": pr.shards for model in pr.probed()})
    names.update({f"score_fluency/{run}": an.fluency.shards for run in an.runs})
    return names


@dataclass
class Report:
    """`shardwise status`: the newest run of each stage output found, and the config's stages that
    have not started (when a config is given)."""

    results: Path
    runs: list[RunStatus]
    not_started: dict[str, ShardSpec]

    @property
    def n_failed(self) -> int:
        return sum(run.count("failed") for run in self.runs)

    @property
    def exit_code(self) -> int:
        """0: no shard failed (all done, or still running / pending); 2: a shard failed."""
        return 2 if self.n_failed else 0

    def as_dict(self) -> dict[str, Any]:
        stages = []
        for run in self.runs:
            counts = {s: run.count(s) for s in ("done", "running", "failed", "pending")}
            state = next((s for s in ("failed", "running", "pending") if counts[s]), "done")
            stages.append(
                {
                    "name": run.plan.name,
                    "state": state,
                    "n_shards": run.plan.spec.n_shards,
                    "counts": counts,
                    "run": run.plan.fingerprint,
                    "older_runs": run.older_runs,
                    "billing": None if run.billing is None else vars(run.billing),
                    "shards": [
                        {"index": s.index, "state": s.state, "detail": s.detail, "log": str(s.log or "")}
                        for s in run.shards
                        if s.state in ("running", "failed")
                    ],
                }
            )
        for name, spec in self.not_started.items():
            counts = {"done": 0, "running": 0, "failed": 0, "pending": spec.n_shards}
            stages.append(
                {
                    "name": name,
                    "state": "pending",
                    "n_shards": spec.n_shards,
                    "counts": counts,
                    "run": None,
                    "older_runs": 0,
                    "billing": None,
                    "shards": [],
                }
            )
        return {"results": str(self.results), "failed_shards": self.n_failed, "stages": stages}


def report(results: str | Path = "results", cfg: Config | None = None) -> Report:
    """The status of `results` (and, given the config, of its stages not started yet). A results
    path that does not exist, or holds no shard store while no config says what to expect, is an
    error (a mistyped --results)."""
    results = Path(results)
    if not results.is_dir():
        raise ShardwiseError(f"{results}: no such directory (no shardwise run there; --results?)")
    runs = collect(results)
    if not runs and cfg is None:
        raise ShardwiseError(
            f"{results}: holds no shardwise run (no shard store under it; --results? nothing ran yet?)"
        )
    ids = {
        str(s.record["slurm_job_id"])
        for run in runs
        for s in run.shards
        if s.record and s.record.get("slurm_job_id")
    }
    usage = slurm_usage(ids)
    for run in runs:
        run.billing = billing(run, usage)
    found = {run.plan.name for run in runs}
    expected = expected_stages(cfg) if cfg is not None else {}
    return Report(results, runs, {n: spec for n, spec in expected.items() if n not in found})


def render_report(rep: Report, tail: int = 8) -> str:
    text = render(rep.runs, tail=tail) if rep.runs else ""
    for name, spec in rep.not_started.items():
        n = spec.n_shards
        text += f"{name}: {n} shards (0 done, 0 running, 0 failed, {n} pending), not started\n"
    if rep.n_failed:
        text += f"{rep.n_failed} shard(s) failed: see above; rerun the workflow to retry them\n"
    return text
