"""No blind retries: which failures recur, the job's record of one (rule_main), and the Snakemake
head reading it (shardwise.retries). On a real SLURM cluster: tests/test_slurm.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from shardwise.errors import ConfigError, InputError, ModelError, ShardError, recurs
from shardwise.retries import install, recorded_cause
from shardwise.smk import no_retry_path

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"


def test_what_recurs():
    assert all(recurs(e) for e in (InputError("x"), ConfigError("x"), ModelError("x")))
    arrow = type("ArrowTypeError", (TypeError,), {})  # pyarrow.lib's, by name
    oom = type("OutOfMemoryError", (RuntimeError,), {})  # torch.cuda's
    assert recurs(arrow("Expected bytes, got a 'int' object")) and recurs(oom("CUDA out of memory"))
    # a shard store problem, a signal, a crash: a retry may do better
    assert not recurs(ShardError("terminated by signal SIGTERM")) and not recurs(SystemExit(143))
    assert not recurs(RuntimeError("boom")) and not recurs(KeyboardInterrupt())
    workers = ShardError("generate/x job 0: 1 of 1 worker(s) failed: shard 0: InputError: ...")
    workers.recurring = True  # every failed worker's error recurs (shards.run_job)
    assert recurs(workers)


RULE = """
import sys
from types import SimpleNamespace
from shardwise.errors import InputError, ShardError
from shardwise.smk import rule_main

def fn(smk):
    raise {error}

smk = SimpleNamespace(log=[sys.argv[1]], rule="generate", output=SimpleNamespace())
rule_main(smk, fn)
"""


def run_rule(tmp_path: Path, error: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "rule.py"
    script.write_text(RULE.format(error=error))
    log = tmp_path / "logs/job-0000.log"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, env=env)


def test_a_job_records_a_failure_that_recurs_and_only_that(tmp_path):
    marker = no_retry_path(tmp_path / "logs/job-0000.log")
    proc = run_rule(tmp_path, 'InputError("prompts file p.jsonl: duplicate prompt_id 3 (rows 1, 2)")')
    assert proc.returncode == 1
    assert json.loads(marker.read_text())["cause"] == (
        "InputError: prompts file p.jsonl: duplicate prompt_id 3 (rows 1, 2)"
    )
    # the next attempt (or run) starts by removing it; a failure a retry may mend leaves none
    proc = run_rule(tmp_path, 'ShardError("generate/x job 0: terminated by signal SIGTERM")')
    assert proc.returncode == 1 and not marker.exists()
    proc = run_rule(tmp_path, 'RuntimeError("a crash")')
    assert proc.returncode == 1 and not marker.exists()


def job(log: Path, retries: int = 2) -> SimpleNamespace:
    return SimpleNamespace(rule=SimpleNamespace(restart_times=retries, name="generate"), log=[str(log)])


def test_the_head_does_not_retry_a_recorded_failure(tmp_path, capsys):
    from snakemake.jobs import Job

    assert install(since=time.time() - 60)
    assert install(since=time.time() - 60)  # once only
    log = tmp_path / "job-0000.log"
    restart_times = Job.restart_times.fget
    assert restart_times(job(log)) == 2
    no_retry_path(log).write_text(json.dumps({"cause": "ModelError: x: not a prepared model"}))
    assert recorded_cause(job(log), since=time.time() - 60) == "ModelError: x: not a prepared model"
    assert restart_times(job(log)) == 0 and restart_times(job(log)) == 0
    err = capsys.readouterr().err
    said = f"shardwise: not retrying rule generate ({log}): ModelError: x: not a prepared model"
    assert err.count(said) == 1
    assert restart_times(job(log, retries=0)) == 0
    # a record older than this run is an earlier run's
    assert recorded_cause(job(log), since=time.time() + 60) is None


@pytest.mark.parametrize("recurring", [True, False])
def test_a_node_jobs_failure_recurs_when_every_failed_worker_says_so(tmp_path, recurring):
    from shardwise.config import ShardSpec
    from shardwise.shards.plan import ShardPlan
    from shardwise.shards.runner import _failed_recurring

    spec = ShardSpec(n_shards=2, shards_per_job=2, gpus_per_shard=0, chunk_size=1)
    plan = ShardPlan("generate", "x", 4, spec, {"a": 1}, tmp_path / "results", tmp_path / "logs", "parquet")
    plan.status_path(0).parent.mkdir(parents=True)
    plan.status_path(0).write_text(json.dumps({"state": "failed", "recurring": recurring}))
    assert _failed_recurring(plan, 0) is recurring
    assert _failed_recurring(plan, 1) is False  # no status: died without a word
