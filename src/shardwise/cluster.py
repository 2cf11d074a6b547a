"""The SLURM cluster as shardwise sees it: the partition table a SLURM profile names, where each job
goes (placed from its own resources), and every job's request checked against its partition before
anything is submitted (at DAG-build time and by `shardwise check --profile`).

The table (profiles/slurm/partitions.yaml for Snellius) is named by the profile's default resource
`shardwise_partitions`. Its `partitions:` section uses the slurm executor plugin's field names (the
file is a valid `--slurm-partition-config`); `allocation:` holds what shardwise adds: the smallest
allocation the site bills and its SBU per hour; `placement:` the partitions CPU and GPU jobs go to.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shardwise.config import Config
from shardwise.errors import ConfigError

# The default resource of a SLURM profile that names its partition table (a path relative to the
# workflow's directory, or absolute).
TABLE_KEY = "shardwise_partitions"
# Resources that the placement sets (and set-resources of the profile may still override).
PLACED = ("slurm_partition", "cpus_per_gpu", "cpus_per_task", "mem_mb_per_cpu", "nodes")


@dataclass(frozen=True)
class Partition:
    name: str
    cores: int  # per node
    gpus: int  # per node
    mem_mb: int  # usable memory per node
    max_runtime: float  # minutes (inf: no limit given)
    gpu_models: tuple[str, ...]
    alloc_cores: int  # the smallest allocation the site bills: cores, GPUs, memory
    alloc_gpus: int
    alloc_mem_mb: int
    sbu_per_hour: float | None  # SBU per hour of that smallest allocation (None: not recorded)


@dataclass(frozen=True)
class PartitionTable:
    path: Path
    source: str
    partitions: dict[str, Partition]
    cpu: tuple[str, ...]  # where CPU jobs go: the first that holds the job
    gpu: tuple[str, ...]  # where GPU jobs go: the first with the asked gpu_model, else the first


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")
    return int(value)


def load_table(path: str | Path) -> PartitionTable:
    """Read a partition table; a missing file or key fails in one line naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"partition table {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"partition table {path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("partitions"), dict):
        raise ConfigError(f"partition table {path}: no `partitions:` mapping")
    alloc = raw.get("allocation") or {}
    parts = {}
    for name, limits in raw["partitions"].items():
        where = f"{path}: partitions.{name}"
        if not isinstance(limits, dict):
            raise ConfigError(f"{where}: expected a mapping")
        bill = alloc.get(name) or {}
        cores = _int(limits.get("max_threads"), f"{where}.max_threads")
        gpus = _int(limits.get("max_gpu", 0), f"{where}.max_gpu")
        mem = _int(limits.get("max_mem_mb"), f"{where}.max_mem_mb")
        if not cores or not mem:
            raise ConfigError(f"{where}: max_threads and max_mem_mb must be > 0")
        runtime = limits.get("max_runtime")
        sbu = bill.get("sbu_per_hour")
        parts[name] = Partition(
            name=name,
            cores=cores,
            gpus=gpus,
            mem_mb=mem,
            max_runtime=math.inf if runtime is None else _int(runtime, f"{where}.max_runtime"),
            gpu_models=tuple(limits.get("available_gpu_models") or ()),
            alloc_cores=_int(bill.get("cores", 1), f"{path}: allocation.{name}.cores") or 1,
            alloc_gpus=_int(bill.get("gpus", 1 if gpus else 0), f"{path}: allocation.{name}.gpus"),
            alloc_mem_mb=_int(bill.get("mem_mb", mem // cores), f"{path}: allocation.{name}.mem_mb"),
            sbu_per_hour=None if sbu is None else float(sbu),
        )
    place = raw.get("placement") or {}
    cpu = tuple(place.get("cpu") or [n for n, p in parts.items() if not p.gpus])
    gpu = tuple(place.get("gpu") or [n for n, p in parts.items() if p.gpus])
    for kind, names in (("cpu", cpu), ("gpu", gpu)):
        for name in names:
            if name not in parts:
                raise ConfigError(f"{path}: placement.{kind} names {name!r}, which is not under partitions")
        if not names:
            raise ConfigError(f"{path}: no {kind.upper()} partition (placement.{kind})")
    return PartitionTable(path, str(raw.get("source", "")), parts, cpu, gpu)


SAFE = {"None": None, "True": True, "False": False, "min": min, "max": max, "int": int, "round": round}


def profile_value(raw: Any, attempt: int = 1) -> Any:
    """A resource value as Snakemake reads it from a profile: a Python expression in `attempt`
    (`30 * 2 ** (attempt - 1)`, `None`), else the string itself (`rome`)."""
    if not isinstance(raw, str):
        return raw
    text = os.path.expanduser(os.path.expandvars(raw))
    try:
        return eval(text, {"__builtins__": SAFE}, {"attempt": attempt})
    except Exception:
        return text


def evaluated(resources: Mapping[str, Any] | None, attempt: int = 1) -> dict[str, Any]:
    """{name: value} of a profile's default-resources or one rule's set-resources."""
    return {k: profile_value(v, attempt) for k, v in (resources or {}).items()}


@dataclass(frozen=True)
class RuleJobs:
    """What one rule's jobs are, from the config alone: how many, their GPUs and threads."""

    n_jobs: int
    gpus: int
    threads: int


def rule_jobs(cfg: Config) -> dict[str, RuleJobs]:
    """Every rule that runs as a cluster job, with how many jobs this config makes of it (0: the
    stage is off) and the GPUs and threads each asks for (the rules' `threads` and `gpu`)."""
    gen, tl, pr, an = cfg.generate, cfg.teacher_logits, cfg.probes, cfg.analysis
    n_runs, n_teachers, n_an = len(gen.runs), len(tl.teachers), len(an.runs)
    n_probed = len(cfg.probe_sets()) * len(pr.probed())
    neural = an.toxicity.scorer != "profanity-check"

    def sharded(spec: Any, n: int) -> RuleJobs:
        return RuleJobs(n * spec.n_jobs, spec.gpus_per_job, spec.shards_per_job)

    return {
        "generate": sharded(gen.shards, n_runs),
        "merge_generate": RuleJobs(n_runs, 0, 1),
        "teacher_logits": sharded(tl.shards, n_teachers),
        "merge_teacher_logits": RuleJobs(n_teachers, 0, 1),
        "activations": sharded(pr.shards, n_probed),
        "merge_activations": RuleJobs(n_probed, 0, 1),
        # the probe set `toxicity` from the analysed generations (all of them in memory at once)
        "toxicity_probe_data": RuleJobs(1 if "toxicity" in cfg.probe_sets() else 0, 0, 1),
        "train_probes": RuleJobs(n_probed, 1 if pr.shards.gpus_per_shard else 0, 1),
        "score_fluency": sharded(an.fluency.shards, n_an),
        "merge_fluency": RuleJobs(n_an, 0, 1),
        # neural scorers get a GPU where the config has GPUs (the fluency shards use them)
        "score_toxicity": RuleJobs(n_an, 1 if neural and an.fluency.shards.gpus_per_shard else 0, 1),
        # the bootstrap's resamples run in threads (the results do not depend on how many)
        "analysis": RuleJobs(1 if n_an else 0, 0, 16),
        "report": RuleJobs(1 if n_an else 0, 0, 1),
    }


def _int_or(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def place(table: PartitionTable, gpus: int, threads: int, asked: Mapping[str, Any]) -> dict[str, Any]:
    """The SLURM resources of one job from what it asks: GPU jobs a whole GPU's share of a GPU
    node per GPU (cores and memory), on the first GPU partition with the asked `gpu_model`;
    CPU jobs whole units of the smallest billed allocation (enough for their threads), on the
    first CPU partition whose node holds them. `asked` is the profile's resources for the job
    (default-resources, then its set-resources): a partition, cores or memory given there is kept."""
    gpus = _int_or(asked.get("gpu", gpus))
    name = asked.get("slurm_partition")
    model = asked.get("gpu_model")
    if not name:
        if gpus:
            matching = [n for n in table.gpu if model and model in table.partitions[n].gpu_models]
            name = (matching or list(table.gpu))[0]
        else:
            fits = [n for n in table.cpu if threads <= table.partitions[n].cores]
            name = (fits or list(table.cpu))[0]
    part = table.partitions.get(str(name))
    if part is None:  # the check names it
        return {"slurm_partition": name}
    if gpus:
        placed = {
            "slurm_partition": name,
            "cpus_per_gpu": part.cores // max(part.gpus, 1),
            "mem_mb_per_cpu": part.mem_mb // part.cores,
            "nodes": 1,
        }
    else:
        units = max(1, -(-threads // part.alloc_cores))
        placed = {
            "slurm_partition": name,
            "cpus_per_task": min(part.cores, units * part.alloc_cores),
            "mem_mb_per_cpu": part.alloc_mem_mb // part.alloc_cores,
        }
    # what the profile asks for wins (and is checked); Snakemake would otherwise let the rule's
    # placement silently win over default-resources
    return {key: asked.get(key) if asked.get(key) is not None else value for key, value in placed.items()}


@dataclass(frozen=True)
class Request:
    """One rule's jobs as they would be submitted (attempt 1)."""

    rule: str
    n_jobs: int
    resources: dict[str, Any]


class Cluster:
    """A config's jobs on a SLURM profile: `resources(rule)` for a rule's `resources:`, `requests()`
    and `problems()` for the check. With no table (`table` None), only the `gpu` resource."""

    def __init__(
        self,
        cfg: Config,
        table: PartitionTable | None,
        defaults: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.cfg, self.table = cfg, table
        self.defaults = evaluated(defaults)
        self.overrides = {rule: evaluated(res) for rule, res in (overrides or {}).items()}
        self.jobs = rule_jobs(cfg)

    def threads(self, rule: str) -> int:
        return self.jobs[rule].threads

    def gpus(self, rule: str) -> int:
        return self.jobs[rule].gpus

    def resources(self, rule: str) -> dict[str, Any]:
        """A rule's own resources: its GPUs, and where the table is known its placement."""
        jobs = self.jobs[rule]
        res: dict[str, Any] = {"gpu": jobs.gpus}
        if self.table is not None:
            asked = {**self.defaults, **self.overrides.get(rule, {})}
            res.update(place(self.table, jobs.gpus, jobs.threads, asked))
        return res

    def requests(self) -> list[Request]:
        """What each rule this config runs asks SLURM for: the profile's default-resources, the
        rule's own (placement), then the profile's set-resources, as Snakemake merges them."""
        out = []
        for rule, jobs in self.jobs.items():
            if jobs.n_jobs:
                res = {**self.defaults, **self.resources(rule), **self.overrides.get(rule, {})}
                res.setdefault("threads", jobs.threads)
                out.append(Request(rule, jobs.n_jobs, res))
        return out

    def problems(self) -> list[str]:
        """One line per rule whose jobs no partition of the table can run."""
        if self.table is None:
            return []
        return [line for req in self.requests() if (line := check_request(req, self.table))]


def _gib(mb: float) -> str:
    gib = mb / 1024
    return f"{gib:,.0f} GiB" if gib >= 100 else f"{gib:,.1f} GiB"


def check_request(req: Request, table: PartitionTable) -> str | None:
    """None when the request fits its partition's nodes, else one line: the rule, what it asks,
    what the partition has."""
    res = req.resources
    what = f"rule {req.rule} ({req.n_jobs} job{'s' if req.n_jobs != 1 else ''})"
    name = res.get("slurm_partition")
    part = table.partitions.get(str(name))
    if part is None:
        return f"{what}: partition {name!r} is not in {table.path} ({', '.join(table.partitions)})"
    gpus = _int_or(res.get("gpu"))
    nodes = max(1, _int_or(res.get("nodes"), 1))
    issues = []
    if gpus and not part.gpus:
        issues.append(f"asks for {gpus} GPU(s) on {name}, which has none")
    elif gpus > part.gpus * nodes:
        issues.append(f"asks for {gpus} GPUs in one job (gpu={gpus}); a {name} node has {part.gpus}")
    model = res.get("gpu_model")
    if gpus and model and part.gpu_models and model not in part.gpu_models:
        issues.append(f"asks for gpu_model {model}; {name} has {', '.join(part.gpu_models)}")
    if _int_or(res.get("cpus_per_task")):
        cores = _int_or(res["cpus_per_task"])
    elif gpus and _int_or(res.get("cpus_per_gpu")):
        cores = _int_or(res["cpus_per_gpu"]) * gpus
        if issues:  # too many GPUs: their cores and memory are too many by the same factor
            cores = _int_or(res["cpus_per_gpu"]) * min(gpus, part.gpus * nodes)
    else:
        cores = max(1, _int_or(res.get("threads"), 1))
    if cores > part.cores * nodes:
        issues.append(f"asks for {cores} cores; a {name} node has {part.cores}")
    per_cpu = _int_or(res.get("mem_mb_per_cpu"))
    mem = per_cpu * cores if per_cpu else _int_or(res.get("mem_mb"))
    if mem > part.mem_mb * nodes:
        how = f"mem_mb_per_cpu={per_cpu} x {cores} cores" if per_cpu else f"mem_mb={mem}"
        issues.append(f"asks for {_gib(mem)} ({how}); a {name} node has {_gib(part.mem_mb)} usable")
    runtime = res.get("runtime")
    if isinstance(runtime, (int, float)) and runtime > part.max_runtime:
        issues.append(f"asks for {runtime:g} min (runtime); {name} allows {part.max_runtime:g} min")
    return f"{what}: " + "; ".join(issues) if issues else None


def table_from(defaults: Mapping[str, Any] | None) -> PartitionTable | None:
    """The partition table a profile's default-resources name (None: not a SLURM profile of ours)."""
    path = evaluated(defaults).get(TABLE_KEY)
    return load_table(path) if path else None


def account_problem(defaults: Mapping[str, Any] | None, where: str) -> str | None:
    """The one line for a SLURM profile whose account is missing or still a placeholder."""
    account = evaluated(defaults).get("slurm_account")
    if account and not (str(account).startswith("<") and str(account).endswith(">")):
        return None
    return (
        f"{where}: default-resources.slurm_account is not set: put the SLURM account to bill there "
        "(`accinfo` on Snellius lists yours)"
    )


def load_profile(profile: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], Path]:
    """(default-resources, set-resources, config.yaml path) of a Snakemake profile directory."""
    path = Path(profile) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"profile {profile}: cannot read {path} ({exc.strerror or exc})") from None
    return raw.get("default-resources") or {}, raw.get("set-resources") or {}, path


def check_profile(cfg: Config, profile: str | Path) -> list[str]:
    """`shardwise check --profile`: one line per rule whose jobs no partition can run, and one if
    the profile's account is not set (the same lines a run on that profile stops with)."""
    defaults, overrides, path = load_profile(profile)
    table = table_from(defaults)
    if table is None:
        raise ConfigError(f"{path}: names no partition table (default-resources.{TABLE_KEY})")
    lines = Cluster(cfg, table, defaults, overrides).problems()
    account = account_problem(defaults, str(path))
    return lines + ([account] if account else [])
