"""The Snellius profile without a cluster: install-profile, both --profile spellings in a dry run,
and the sbatch lines it produces (recorded by stand-in SLURM commands)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SLURM_POLLING, Workflow, tiny_config, write_prompts

from shardwise.errors import ShardwiseError
from shardwise.profile import install_profile

# Snakemake submits jobs concurrently: the lock keeps each (long) line whole and each job id unique.
FAKE_SBATCH = """#!/bin/sh
exec 9>>"$FAKE_SLURM_DIR/sbatch.log"
flock 9
echo "$@" >&9
echo $((1000 + $(wc -l < "$FAKE_SLURM_DIR/sbatch.log")))
"""
# Every submitted job "failed", so Snakemake retries it and the runtime for each attempt shows.
FAKE_SACCT = """#!/bin/sh
n=$(wc -l < "$FAKE_SLURM_DIR/sbatch.log")
i=1; while [ $i -le $n ]; do echo "$((1000 + i))|FAILED"; i=$((i + 1)); done
"""
FAKE_SACCTMGR = "#!/bin/sh\necho shardwise\n"
FAILING = "#!/bin/sh\nexit 1\n"


@pytest.mark.unit
def test_install_profile_links_once_and_refuses_to_replace(tmp_path):
    link, created = install_profile("slurm", tmp_path)
    assert created and link.is_symlink()
    assert link.resolve() == (REPO / "profiles/slurm").resolve()
    assert install_profile("slurm", tmp_path) == (link, False)

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "slurm").mkdir()
    with pytest.raises(ShardwiseError, match=r"already exists \(a different profile\); not replacing it"):
        install_profile("slurm", other)
    with pytest.raises(ShardwiseError, match="no profile 'nope'"):
        install_profile("nope", tmp_path)


def gpu_resources(out: str) -> list[str]:
    return re.findall(r"rule generate:.*?resources: ([^\n]*)", out, re.S)


@pytest.mark.integration
@pytest.mark.parametrize("spelling", ["profiles/slurm", "slurm"])
def test_dry_run_with_the_slurm_profile_needs_no_slurm(workflow_copy, tiny_model_src, tmp_path, spelling):
    wf = workflow_copy
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    wf.write_config(
        tiny_config(
            tiny_model_src, shards={"n_shards": 8, "shards_per_job": 4, "gpus_per_shard": 1, "chunk_size": 2}
        )
    )
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    if spelling == "slurm":
        subprocess.run(
            [sys.executable, "-m", "shardwise.cli", "install-profile"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
    out = wf.run("-n", "--profile", spelling, extra_env=env).stdout
    resources = gpu_resources(out)
    assert len(resources) == 2  # 8 shards / 4 per job
    for line in resources:
        assert "slurm_partition=gpu_a100" in line and "gpu=4" in line and "cpus_per_gpu=18" in line
        assert "mem_mb_per_cpu=6826" in line and "runtime=120" in line
    merge = re.search(r"rule merge_generate:.*?resources: ([^\n]*)", out, re.S)[1]
    assert "slurm_partition=rome" in merge and "mem_mb=" not in merge  # no hidden memory default


def fake_slurm(root: Path) -> dict[str, str]:
    bin_dir = root / "fake-slurm"
    bin_dir.mkdir()
    scripts = {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT, "sacctmgr": FAKE_SACCTMGR, "sshare": FAKE_SACCTMGR}
    for name in ("scontrol", "sinfo", "squeue", "scancel"):
        scripts[name] = FAILING
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "sbatch.log").touch()
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(bin_dir)}


@pytest.mark.integration
@pytest.mark.parametrize(("shards_per_job", "gpus"), [(4, 4), (1, 1)])
def test_sbatch_lines_of_the_snellius_profile(workflow_copy: Workflow, tiny_model_src, shards_per_job, gpus):
    wf = workflow_copy
    wf.snakemake = [SLURM_POLLING]  # each failed attempt is seen within 3 s, not 10, 20, 30 s later
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    shards = {"n_shards": 4, "shards_per_job": shards_per_job, "gpus_per_shard": 1, "chunk_size": 6}
    wf.write_config(tiny_config(tiny_model_src, shards=shards))
    env = fake_slurm(wf.root)
    profile = wf.path("profiles/slurm/config.yaml")
    account = profile.read_text().replace("slurm_account: <your-account>", "slurm_account: shardwise")
    profile.write_text(account)  # the account the stand-in sacctmgr knows
    args = (
        "--profile",
        "profiles/slurm",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--latency-wait",
        "1",
    )
    log = Path(env["FAKE_SLURM_DIR"], "sbatch.log")
    n_jobs = 4 // shards_per_job

    # A CPU rule: the merge, given (stand-in) generation manifests.
    wf.run("resources/models/tiny")  # a localrule; prepared here once
    jobs = wf.path("results/generations/tiny/jobs")
    jobs.mkdir(parents=True)
    for j in range(n_jobs):
        (jobs / f"job-{j:04d}.json").touch()
    only_merge = (
        "--allowed-rules",
        "merge_generate",
        "--retries",
        "0",
        "results/generations/tiny.parquet",
    )
    wf.run(*args, *only_merge, check=False, extra_env=env)
    (merge,) = log.read_text().splitlines()
    assert "rule_merge_generate" in merge
    assert "-p rome" in merge and " -t 30" in merge and "--mem-per-cpu 1792" in merge
    assert "-A shardwise" in merge
    # the 1/8 rome node it is billed for: 16 cores and their 28 GiB
    assert "--cpus-per-task=16" in merge and "--gpus" not in merge and "--mem " not in merge

    # The GPU rule: every attempt of every job (each "fails", so Snakemake retries it twice).
    for manifest in jobs.iterdir():
        manifest.unlink()
    log.write_text("")
    proc = wf.run(*args, check=False, extra_env=env)
    assert proc.returncode != 0
    lines = log.read_text().splitlines()
    attempts: dict[str, list[int]] = {}
    for line in lines:
        assert "-p gpu_a100" in line and f"--gpus={gpus}" in line and "--cpus-per-task" not in line
        assert "--cpus-per-gpu=18" in line and "--mem-per-cpu 6826" in line and "--nodes=1" in line
        assert "--mem " not in line
        job = re.search(r"rule_generate_wildcards_tiny_(\d{4})", line)[1]
        attempt = int(re.search(r"--attempt (\d+)", line)[1])
        assert re.search(r" -t (\d+)", line)[1] == str(120 * 2 ** (attempt - 1))  # runtime grows
        attempts.setdefault(job, []).append(attempt)
    assert sorted(attempts) == [f"{j:04d}" for j in range(n_jobs)]
    # Every job is retried up to retries: 2 (3 attempts). When all jobs fail at once, Snakemake
    # occasionally ends the run before submitting one last retry (a race in its scheduler, seen in
    # CI), so this allows a job to stop early but not to skip or repeat an attempt.
    for job, seen in attempts.items():
        assert sorted(seen) == list(range(1, len(seen) + 1)) and len(seen) <= 3, (job, seen)
    assert sum(map(len, attempts.values())) >= 3 * n_jobs - 1


def placements(out: str) -> list[tuple[str, int, str]]:
    """(rule, gpu, slurm_partition) of every cluster job of a dry run (local rules have no gpu)."""
    jobs = []
    for rule, res in re.findall(r"^rule (\w+):\n.*?^    resources: ([^\n]*)", out, re.S | re.M):
        values = dict(kv.split("=", 1) for kv in res.split(", ") if "=" in kv)
        if "gpu" in values:
            jobs.append((rule, int(values["gpu"]), values.get("slurm_partition", "")))
    return jobs


def snellius_copy(wf: Workflow) -> None:
    """config/snellius.yaml with its placeholders filled and a stand-in prompts table of its size."""
    text = wf.path("config/snellius.yaml").read_text()
    text = text.replace("<commit-sha>", "0" * 40).replace("<project>", "demo")
    wf.path("config/snellius.yaml").write_text(text)
    wf.path("data").mkdir()
    with open(wf.path("data/rtp_prompts.jsonl"), "w") as fh:
        fh.writelines(f'{{"prompt": "prompt {i}"}}\n' for i in range(99_442))


@pytest.mark.integration
@pytest.mark.parametrize("config", ["config/config.yaml", "config/snellius.yaml"])
def test_dry_run_places_every_job_by_its_own_gpus(workflow_copy: Workflow, config):
    """The demo (CPU workers, the CPU toxicity scorer) and the Snellius example, with the SLURM
    profile as shipped: every gpu=0 job on a CPU partition, every GPU job on a GPU partition.
    (Before placement, the demo's generate and score_toxicity went to gpu_a100 with gpu=0.)"""
    wf = workflow_copy
    if config == "config/snellius.yaml":
        snellius_copy(wf)
    out = wf.run("-n", "--profile", "profiles/slurm", "--configfile", config).stdout
    jobs = placements(out)
    assert len(jobs) >= 20
    cpu = {p for _, gpus, p in jobs if not gpus}
    gpu = {p for _, gpus, p in jobs if gpus}
    assert cpu == {"rome"} and gpu <= {"gpu_a100", "gpu_h100"}, (cpu, gpu)
    rules = {rule for rule, gpus, _ in jobs if gpus}
    if config == "config/config.yaml":
        assert not rules  # the demo asks for no GPU
        # the toxicity probe set is built in a CPU job, not on the login node
        assert ("toxicity_probe_data", 0, "rome") in jobs
    else:
        assert rules == {"generate", "teacher_logits", "score_fluency", "score_toxicity"}
        assert "rule analysis:" in out and re.search(r"cpus_per_task=16, mem_mb_per_cpu=1792", out)


@pytest.mark.integration
def test_dry_run_refuses_what_no_partition_can_run(workflow_copy: Workflow):
    """8 GPUs per shard x 2 shards in one job, and a profile asking more memory than a node has:
    one line each (per rule), exit 1, before any job (nothing is listed)."""
    import yaml

    wf = workflow_copy
    cfg = yaml.safe_load(wf.path("config/config.yaml").read_text())
    cfg["generate"]["shards"].update(gpus_per_shard=8, shards_per_job=2)
    wf.write_config(cfg)
    profile = yaml.safe_load(wf.path("profiles/slurm/config.yaml").read_text())
    profile["set-resources"]["merge_generate"] = {"mem_mb_per_cpu": 10_000_000}
    wf.path("profiles/big").mkdir()
    wf.path("profiles/big/config.yaml").write_text(yaml.safe_dump(profile))
    proc = wf.run("-n", "--profile", "profiles/big", check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert errors == [
        "shardwise: error: rule generate (2 jobs): asks for 16 GPUs in one job (gpu=16); "
        "a gpu_a100 node has 4",
        "shardwise: error: rule merge_generate (2 jobs): asks for 156,250 GiB (mem_mb_per_cpu=10000000 "
        "x 16 cores); a rome node has 224 GiB usable",
    ]
    assert "rule generate:" not in proc.stdout


@pytest.mark.unit
def test_the_workflow_profile_changes_nothing_of_slurm_jobs():
    """profiles/default is loaded next to profiles/slurm and wins over it: it must set no cores,
    threads or resources. (Its `cores: all` was passed on to every SLURM job as `--cores <the login
    node's cores>`, capping e.g. analysis's 16 threads at 2.)"""
    import yaml

    default = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    shaping = {"cores", "jobs", "max-threads", "set-threads", "resources", "default-resources"}
    shaping.add("set-resources")
    assert not shaping & set(default), default


@pytest.mark.integration
def test_a_run_without_an_account_submits_nothing(workflow_copy: Workflow, tiny_model_src):
    """The profile as shipped names no account: a real run stops in one line before any job (a dry
    run needs none). Before, the plugin printed "Unable to guess SLURM account" and submitted."""
    wf = workflow_copy
    write_prompts(wf.path("config/prompts.jsonl"), 16)
    wf.write_config(tiny_config(tiny_model_src))
    env = fake_slurm(wf.root)
    proc = wf.run("--profile", "profiles/slurm", check=False, extra_env=env)
    assert proc.returncode == 1
    assert "shardwise: error: the SLURM profile: default-resources.slurm_account is not set" in proc.stderr
    assert Path(env["FAKE_SLURM_DIR"], "sbatch.log").read_text() == ""
    assert not wf.path("resources/models/tiny").exists()  # not even a local job ran
