"""The workflow on a real SLURM cluster (tests/slurm/cluster.sh: slurmctld, slurmd, slurmdbd, MariaDB,
munge on localhost; one node with 4 fake A100s). Runs through profiles/slurm, deep-merged with the
small tests/slurm/local-cluster.yaml override. GPU shards run on the CPU (SHARDWISE_FORCE_CPU=1).

Fault matrix: a SIGKILLed worker, a scancelled job, a time limit, a killed Snakemake head. Each ends
with a complete, verified output and no finished shard recomputed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, SLURM_POLLING, Workflow, scaled, stop_started, tiny_config, write_prompts

from shardwise.config import load_config
from shardwise.generate import generate_table
from shardwise.models import load_model
from shardwise.tables import load_prompts

pytestmark = [pytest.mark.slurm, pytest.mark.system]

CLUSTER = REPO / "tests/slurm/cluster.sh"


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local SLURM cluster needs root and apt-get")
    already_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"cluster.sh up failed:\n{up.stderr[-3000:]}")
    facts = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    yield facts
    if not already_up:  # leave a cluster someone else started running
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


LIVE = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING")


@pytest.fixture(autouse=True)
def _cancel_what_the_test_submitted(slurm_cluster) -> Iterator[None]:
    """A failed test leaves no Snakemake head and no SLURM job of its own behind for the next test."""
    before = job_ids()
    yield
    stop_started()  # before the scancel, so that no head submits again
    left = [j["id"] for j in sacct() if j["id"] not in before and j["state"].split()[0] in LIVE]
    if left:
        subprocess.run(["scancel", *left], check=False)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


class SlurmWorkflow(Workflow):
    """The workflow run through profiles/slurm + the local-cluster override (+ a test's own)."""

    def __init__(self, root: Path, **override: Any):
        super().__init__(root)
        profile = yaml.safe_load((root / "profiles/slurm/config.yaml").read_text())
        local = yaml.safe_load((REPO / "tests/slurm/local-cluster.yaml").read_text())
        self.profile = root / ".test-profile"
        self.profile.mkdir()
        local["default-resources"]["shardwise_partitions"] = str(REPO / "tests/slurm/partitions.yaml")
        merged = deep_merge(deep_merge(profile, local), override)
        (self.profile / "config.yaml").write_text(yaml.safe_dump(merged))

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, SLURM_POLLING, "--profile", str(self.profile), *args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.update(HF_HUB_OFFLINE="1", SHARDWISE_FORCE_CPU="1")
        return env


def slurm_workflow(
    tmp_path: Path, model: Path | None, n_prompts: int, shards: dict, **kw: Any
) -> SlurmWorkflow:
    from conftest import copy_workflow

    wf = SlurmWorkflow(copy_workflow(tmp_path / "wf").root, **kw.pop("profile", {}))
    if model is not None:
        write_prompts(wf.path("config/prompts.jsonl"), n_prompts)
        wf.write_config(tiny_config(model, shards=shards, **kw))
    return wf


def sacct(job_ids: list[str] | None = None) -> list[dict[str, str]]:
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,Partition,AllocTRES,State,JobName"]
    if job_ids:
        cmd += ["-j", ",".join(job_ids)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    keys = ["id", "partition", "tres", "state", "name"]
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]


def records(wf: Workflow, run: str = "tiny") -> dict[int, dict[str, Any]]:
    (store,) = wf.path(f"results/generations/{run}/shards").iterdir()
    return {r["index"]: r for p in store.glob("*-of-*[0-9].json") if (r := json.loads(p.read_text()))}


def shard_mtimes(wf: Workflow, indices, run: str = "tiny") -> dict[int, int]:
    (store,) = wf.path(f"results/generations/{run}/shards").iterdir()
    return {i: next(store.glob(f"{i:04d}-of-*.parquet")).stat().st_mtime_ns for i in indices}


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    """Poll until `predicate()` is truthy; the deadline is `timeout` stretched by the machine's load."""
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def shard_status(wf: Workflow, i: int, run: str = "tiny") -> dict[str, Any] | None:
    for path in wf.path(f"results/generations/{run}/shards").glob(f"*/{i:04d}-of-*.status.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def committed_chunks(wf: Workflow, i: int, run: str = "tiny") -> int:
    return len(list(wf.path(f"results/generations/{run}/shards").glob(f"*/{i:04d}-of-*.parts/*.parquet")))


def job_ids() -> set[str]:
    return {j["id"] for j in sacct()}


def mid_run_with_one_done(wf: Workflow, n_shards: int, min_chunks: int):
    """(index, status, done shards) once one shard is mid-run (chunks committed) and another is done:
    Snakemake does not run shard jobs in index order."""
    try:
        done = records(wf)
    except (ValueError, FileNotFoundError):  # no shard store yet
        return None
    for i in range(n_shards):
        status = shard_status(wf, i)
        if done and i not in done and status and committed_chunks(wf, i) >= min_chunks:
            return i, status, sorted(done)
    return None


def generate_jobs(before: set[str]) -> list[dict[str, str]]:
    """The jobs submitted since `before` on gpu_a100 (tests here run only `generate` there)."""
    return [j for j in sacct() if j["partition"] == "gpu_a100" and j["id"] not in before]


def assert_complete(wf: Workflow, n_rows: int, run: str = "tiny") -> pd.DataFrame:
    table = pd.read_parquet(wf.path(f"results/generations/{run}.parquet"))
    assert len(table) == n_rows and table.continuation.notna().all()
    return table


def test_the_whole_demo_dag_runs_through_slurm_as_node_jobs(slurm_cluster, tmp_path):
    """Every stage of the embedded demo (SmolLM2: two generation runs, teacher logits, both probe
    sets, fluency, toxicity, analysis, report) through sbatch. Each sharded stage is one gpu_a100
    job of 4 shards pinned to 4 GPUs; merges, analysis and report are CPU jobs on rome. The demo's
    config on 12 of its prompts, 3 of its 31 layers, 5 permutations for the probes' null and 200
    bootstrap resamples (the DAG, the jobs and what they ask for are the demo's; the time is CI's)."""
    wf = slurm_workflow(tmp_path, None, 0, {})
    prompts = wf.path("config/demo/prompts.jsonl")
    lines = prompts.read_text().splitlines()
    # 6 prompts whose demo continuations are toxic (the toxicity probe needs both classes), 6 others
    toxic = [line for line in lines if any(f'"conflict-{i:02d}"' in line for i in (5, 6, 7, 10, 12, 13))]
    prompts.write_text("\n".join(toxic + [line for line in lines if "conflict" not in line][::10][:6]) + "\n")
    cfg = yaml.safe_load(wf.path("config/config.yaml").read_text())
    node_job = {"n_shards": 4, "shards_per_job": 4, "gpus_per_shard": 1, "chunk_size": 4}
    for stage in (cfg["generate"], cfg["teacher_logits"], cfg["probes"], cfg["analysis"]["fluency"]):
        stage["shards"].update(node_job)
    cfg["generate"]["shards"]["chunk_size"] = 3  # 12 prompts: 4 chunks, one per shard
    cfg["probes"].update(layers=[0, 15, 30], permutations=5)
    cfg["analysis"]["bootstrap"] = 200
    wf.write_config(cfg)
    before = job_ids()
    wf.run(timeout=1500)
    dry = wf.run("-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    assert wf.path("results/analysis/report.html").stat().st_size > 10_000
    for run in ("smollm2", "smollm2-t07"):
        assert_complete(wf, 2 * 12, run=run)

    jobs = [j for j in sacct() if j["id"] not in before]
    assert jobs and all(j["state"] == "COMPLETED" for j in jobs), jobs
    asking = [j for j in jobs if "gres/gpu=" in j["tres"]]
    assert all(j["partition"] == "gpu_a100" and "gres/gpu:a100=" in j["tres"] for j in asking), asking
    # generate x 2 runs, teacher logits, activations x 2 probe sets, score_fluency x 2 runs: 4 GPUs
    node_jobs = [j for j in asking if "gres/gpu=4" in j["tres"]]
    assert len(node_jobs) == 7
    assert sorted(j["tres"].split("gres/gpu=")[1].split(",")[0] for j in asking) == ["1", "1"] + ["4"] * 7
    # The merges, analysis, report and score_toxicity (the embedded CPU scorer asks for no GPU) go to
    # rome: placed by their own resources.
    cpu = [j for j in jobs if "gres/gpu" not in j["tres"]]
    assert len(cpu) >= 11 and all(j["partition"] == "rome" for j in cpu), cpu
    for run in ("smollm2", "smollm2-t07"):  # the 4 shards of a run in its one job, one GPU each
        shard_records = records(wf, run).values()
        (job,) = {r["slurm_job_id"] for r in shard_records}
        assert job in {j["id"] for j in node_jobs}
        assert sorted(r["cuda_visible_devices"] for r in shard_records) == ["0", "1", "2", "3"]
    shown = wf.shardwise("status").stdout
    assert shown.count("4 shards (4 done, 0 running, 0 failed, 0 pending)") == 7, shown


def test_one_job_per_shard_with_one_gpu_each(slurm_cluster, tmp_path, tiny_model_src):
    wf = slurm_workflow(
        tmp_path,
        tiny_model_src,
        24,
        {"n_shards": 4, "shards_per_job": 1, "gpus_per_shard": 1, "chunk_size": 6},
    )
    before = job_ids()
    wf.run()
    assert_complete(wf, 48)
    gen = generate_jobs(before)
    assert len(gen) == 4
    assert all("gres/gpu=1" in j["tres"] and j["state"] == "COMPLETED" for j in gen)
    assert sorted(r["slurm_job_id"] for r in records(wf).values()) == sorted(j["id"] for j in gen)


def test_killed_worker_of_a_node_job(slurm_cluster, tmp_path, tiny_model_src):
    """(a) One of four workers is SIGKILLed: the job fails, Snakemake retries it, and the retry
    computes only that shard (from its last committed chunk). The merged table is the one an
    uninterrupted run of one shard with the same batches and threads gives. (The local executor takes
    the same path, shardwise.shards.runner.run_job; tests/test_shards.py kills and resumes a worker
    without Snakemake.)"""
    shards = {"n_shards": 4, "shards_per_job": 4, "gpus_per_shard": 1, "chunk_size": 5}
    sampling = {"max_new_tokens": 48}
    wf = slurm_workflow(tmp_path, tiny_model_src, 160, shards, batch_size=2, sampling=sampling)
    before = job_ids()
    proc = wf.popen()
    status = wait_for(lambda: committed_chunks(wf, 1) >= 2 and shard_status(wf, 1), what="shard 1 chunks")
    os.kill(status["pid"], signal.SIGKILL)
    others = wait_for(lambda: len(records(wf)) >= 3 and records(wf), what="the other shards")
    assert set(others) == {0, 2, 3}
    done = shard_mtimes(wf, [0, 2, 3])
    output = proc.communicate(timeout=scaled(600))[0]
    assert proc.returncode == 0, output
    assert shard_mtimes(wf, [0, 2, 3]) == done
    assert "resuming: " in wf.path("logs/generate/tiny/shard-0001.log").read_text()
    assert [j["state"] for j in generate_jobs(before)] == ["FAILED", "COMPLETED"]
    merged = assert_complete(wf, 320)
    model, tok = load_model(wf.path("resources/models/tiny"))
    cfg = load_config(tiny_config(tiny_model_src, sampling=sampling))
    prompts = load_prompts(wf.path("config/prompts.jsonl"))
    # the workers' batches (2 = one prompt's 2 samples) and torch threads: on an AMD EPYC CPU an
    # uninterrupted run at batch size 32 with the test's threads differed in 1 of 320 fp32 texts
    (threads,) = {r["stats"]["torch_threads"] for r in records(wf).values()}
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = generate_table(model, tok, prompts, cfg.generate.runs["tiny"].sampling, batch_size=2)
    finally:
        torch.set_num_threads(default)
    pd.testing.assert_frame_equal(merged, expected)


def test_scancelled_job(slurm_cluster, tmp_path, tiny_model_src):
    """(b) A running job is scancelled. snakemake-executor-plugin-slurm 2.8.0 reads sacct's
    "CANCELLED by <uid>" as still running, so the user stops Snakemake (Ctrl-C) and runs the same
    command again (README): finished shards are kept, the cancelled shard resumes from its chunks."""
    shards = {"n_shards": 3, "shards_per_job": 1, "gpus_per_shard": 1, "chunk_size": 5}
    wf = slurm_workflow(tmp_path, tiny_model_src, 120, shards, batch_size=2, sampling={"max_new_tokens": 48})
    proc = wf.popen("--jobs", "1")  # one job at a time
    i, status, finished = wait_for(lambda: mid_run_with_one_done(wf, 3, 2), what="a shard mid-run")
    done = shard_mtimes(wf, finished)
    subprocess.run(["scancel", status["slurm_job_id"]], check=True)
    wait_for(lambda: sacct([status["slurm_job_id"]])[0]["state"].startswith("CANCELLED"), what="CANCELLED")
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.communicate(timeout=scaled(300))
    wf.run("--unlock")
    wf.run()
    assert shard_mtimes(wf, finished) == done
    assert "resuming: " in wf.path(f"logs/generate/tiny/shard-{i:04d}.log").read_text()
    assert_complete(wf, 240)


def prompts_per_minute(tmp_path: Path, tiny_model_src: Path, n: int = 20) -> float:
    """How many of the time-limit test's generations (1 sample, 64 new tokens, batch size 1) this
    machine does per minute now, timed here on `n` prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_src).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_src)
    prompts = load_prompts(write_prompts(tmp_path / "calibration.jsonl", n, seed=1))
    sampling = {"samples_per_prompt": 1, "max_new_tokens": 64}
    cfg = load_config(tiny_config(tiny_model_src, sampling=sampling))
    started = time.perf_counter()
    generate_table(model, tok, prompts, cfg.generate.runs["tiny"].sampling, batch_size=1)
    return n * 60 / (time.perf_counter() - started)


def test_time_limit_then_retry_with_more_time(slurm_cluster, tmp_path, tiny_model_src):
    """(c) A shard outlives its 1-minute limit; the retry gets 4 minutes and resumes from its last
    committed chunk. The work is ~3 minutes of this machine's measured speed (the same generation in
    this process, just before), so that the first attempt times out and the retry completes on a
    slow, fast, quiet or busy machine (3, not 2: under pytest-xdist the other process's tests may
    slow the measurement and then end before the job runs). Fixed counts failed both ways: on one
    2-core machine 1,500 prompts needed TIMEOUT, TIMEOUT, COMPLETED beside a CPU hog (1:19, 4:27,
    14:25); on a faster one (AMD EPYC) 600 completed within the first minute, and so did 300 (600 /
    the 1-minute load, which the tests before had left at 2)."""
    n_prompts = int(3 * prompts_per_minute(tmp_path, tiny_model_src))
    shards = {"n_shards": 1, "shards_per_job": 1, "gpus_per_shard": 1, "chunk_size": 10}
    profile = {"set-resources": {"generate": {"runtime": "1 * 4 ** (attempt - 1)"}}}
    wf = slurm_workflow(
        tmp_path,
        tiny_model_src,
        n_prompts,
        shards,
        batch_size=1,
        sampling={"samples_per_prompt": 1, "max_new_tokens": 64},
        profile=profile,
    )
    before = job_ids()
    wf.run(timeout=1200)
    table = assert_complete(wf, n_prompts)
    assert table.prompt_id.is_unique
    # On a quiet machine the 4-minute retry completes; on a busy one it may time out too and the
    # 16-minute one completes: each attempt resumes from the last, and none starts over.
    states = [j["state"] for j in generate_jobs(before)]
    assert states[0] == "TIMEOUT" and states[-1] == "COMPLETED" and set(states[1:-1]) <= {"TIMEOUT"}, states
    log = wf.path("logs/generate/tiny/shard-0000.log").read_text()
    assert "resuming: " in log  # (an attempt that committed nothing before its limit has nothing to resume)


def test_killed_snakemake_head_then_restart(slurm_cluster, tmp_path, tiny_model_src):
    """(d) The Snakemake head dies mid-run; its orphan job is scancelled (as the README says), the
    lock released, and the same command finishes the run without recomputing finished shards."""
    shards = {"n_shards": 3, "shards_per_job": 1, "gpus_per_shard": 1, "chunk_size": 5}
    wf = slurm_workflow(tmp_path, tiny_model_src, 120, shards, batch_size=2, sampling={"max_new_tokens": 48})
    proc = wf.popen("--jobs", "1")
    i, status, finished = wait_for(lambda: mid_run_with_one_done(wf, 3, 1), what="a shard mid-run")
    proc.kill()
    proc.communicate()
    done = shard_mtimes(wf, finished)
    subprocess.run(["scancel", status["slurm_job_id"]], check=True)  # the orphan
    wait_for(lambda: not sacct([status["slurm_job_id"]])[0]["state"].startswith("RUNNING"), what="scancel")
    proc = wf.shardwise("status", check=False)
    shown = proc.stdout
    assert proc.returncode == 2  # a failed shard
    assert f"SLURM job {status['slurm_job_id']} CANCELLED" in shown, shown
    assert f"shard {i}: failed" in shown and f"{len(finished)} done" in shown
    wf.run("--unlock")
    wf.run()
    assert shard_mtimes(wf, finished) == done
    assert_complete(wf, 240)
    shown = wf.shardwise("status").stdout
    assert "generate/tiny: 3 shards (3 done, 0 running, 0 failed, 0 pending)" in shown


def test_a_failure_that_recurs_runs_once(slurm_cluster, tmp_path, tiny_model_src):
    """A job failing on its input (here its model: resources/models/tiny is no prepared model) is
    submitted once, not `retries: 2` more times, and the run ends with the job's one-line cause.
    (Before, it ran 3 times, with 120, 240 and 480 minutes.)"""
    shards = {"n_shards": 1, "shards_per_job": 1, "gpus_per_shard": 1, "chunk_size": 8}
    wf = slurm_workflow(tmp_path, tiny_model_src, 8, shards)
    wf.path("resources/models/tiny").mkdir(parents=True)  # "prepared" already, but empty
    before = job_ids()
    proc = wf.run(check=False)
    assert proc.returncode != 0
    jobs = generate_jobs(before)
    assert [j["state"] for j in jobs] == ["FAILED"], jobs
    said = "shardwise: not retrying rule generate (logs/generate/tiny/job-0000.log): ModelError: "
    assert said in proc.stderr
    assert "not a prepared model" in proc.stderr
    assert "Trying to restart job" not in proc.stdout + proc.stderr
