"""Snellius' partition table, placement from a job's own resources, and the check of every job's
request against its partition (shardwise.cluster; the dry runs are in tests/test_profile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config, write_prompts

from shardwise.cli import main
from shardwise.cluster import Cluster, load_table, place, profile_value
from shardwise.config import load_config
from shardwise.errors import ConfigError

pytestmark = pytest.mark.unit

TABLE = REPO / "profiles/slurm/partitions.yaml"


@pytest.fixture(scope="module")
def table():
    return load_table(TABLE)


def test_the_table_is_snellius_and_the_plugin_reads_it(table):
    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    assert "2026-12" in table.source
    rome, a100 = table.partitions["rome"], table.partitions["gpu_a100"]
    assert (rome.cores, rome.mem_mb, rome.alloc_cores, rome.alloc_mem_mb) == (128, 224 * 1024, 16, 28 * 1024)
    assert (a100.cores, a100.gpus, a100.mem_mb, a100.sbu_per_hour) == (72, 4, 480 * 1024, 128)
    assert table.cpu[0] == "rome" and table.gpu[0] == "gpu_a100"
    plugin = {p.name: p.limits for p in read_partition_file(TABLE)}
    assert plugin["gpu_a100"].max_gpu == 4 and plugin["rome"].max_runtime == 120 * 60


def test_placement_follows_the_jobs_own_resources(table):
    # a GPU per 18 cores and 120 GiB of an A100 node; with gpu_model h100 an H100 node's share
    assert place(table, 4, 4, {}) == {
        "slurm_partition": "gpu_a100",
        "cpus_per_gpu": 18,
        "mem_mb_per_cpu": 491520 // 72,
        "nodes": 1,
    }
    h100 = place(table, 1, 1, {"gpu_model": "h100"})
    assert h100["slurm_partition"] == "gpu_h100" and h100["cpus_per_gpu"] == 16
    # CPU jobs: whole 1/8 rome nodes (16 cores + 28 GiB), enough for their threads
    assert place(table, 0, 1, {}) == {"slurm_partition": "rome", "cpus_per_task": 16, "mem_mb_per_cpu": 1792}
    assert place(table, 0, 20, {})["cpus_per_task"] == 32
    assert place(table, 0, 150, {})["slurm_partition"] == "genoa"  # more threads than a rome node
    # a `gpu: 0` override of the profile makes a GPU rule a CPU job
    assert place(table, 4, 4, {"gpu": 0})["slurm_partition"] == "rome"
    # what the profile asks for wins over the placement
    assert place(table, 0, 1, {"mem_mb_per_cpu": 4000})["mem_mb_per_cpu"] == 4000


def test_profile_values_are_read_as_snakemake_reads_them():
    assert profile_value("30 * 2 ** (attempt - 1)", attempt=3) == 120
    assert profile_value("rome") == "rome" and profile_value("None") is None
    assert profile_value("profiles/slurm/partitions.yaml") == "profiles/slurm/partitions.yaml"
    assert profile_value(7) == 7


def demo_config(**shards):
    raw = yaml.safe_load((REPO / "config/config.yaml").read_text())
    raw["generate"]["shards"].update(shards)
    return load_config(raw, base_dir=REPO)


def test_impossible_requests_are_one_line_each(table):
    cfg = demo_config(gpus_per_shard=8, shards_per_job=2)
    assert Cluster(cfg, table).problems() == [
        "rule generate (2 jobs): asks for 16 GPUs in one job (gpu=16); a gpu_a100 node has 4"
    ]

    cfg = demo_config()
    assert Cluster(cfg, table).problems() == []
    lines = Cluster(cfg, table, {"mem_mb_per_cpu": 10_000_000}).problems()
    assert len(lines) == len([r for r in Cluster(cfg, table).requests()])  # every job of the demo
    assert "rule analysis (1 job): asks for 156,250 GiB (mem_mb_per_cpu=10000000 x 16 cores); " in lines[-2]
    assert lines[-2].endswith("a rome node has 224 GiB usable")
    # a set-resources entry for one rule: that rule only; a partition the table lacks is named
    wrong = {"report": {"runtime": "200 * 60", "slurm_partition": "x"}}
    lines = Cluster(cfg, table, overrides=wrong).problems()
    names = "rome, genoa, fat_rome, gpu_a100, gpu_h100"
    assert lines == [f"rule report (1 job): partition 'x' is not in {TABLE} ({names})"]
    (line,) = Cluster(cfg, table, overrides={"report": {"runtime": "200 * 60"}}).problems()
    assert line == "rule report (1 job): asks for 12000 min (runtime); rome allows 7200 min"


def test_only_rules_the_config_runs_are_checked(table):
    cfg = demo_config()
    raw = yaml.safe_load((REPO / "config/config.yaml").read_text())
    raw["teacher_logits"]["teachers"] = {}
    raw["teacher_logits"]["shards"].update(gpus_per_shard=8)
    cfg = load_config(raw, base_dir=REPO)
    rules = {r.rule for r in Cluster(cfg, table).requests()}
    assert "teacher_logits" not in rules and "generate" in rules
    assert Cluster(cfg, table).problems() == []


def test_a_bad_table_fails_in_one_line(tmp_path):
    bad = tmp_path / "partitions.yaml"
    bad.write_text("partitions:\n  rome: {max_threads: 128}\n")
    with pytest.raises(ConfigError, match=r"partitions.rome.max_mem_mb: expected a number >= 0, got None"):
        load_table(bad)
    with pytest.raises(ConfigError, match=r"partition table .*missing\.yaml"):
        load_table(tmp_path / "missing.yaml")


def write_profile(dest: Path, **default_resources) -> Path:
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"].update(shardwise_partitions=str(TABLE), **default_resources)
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile))
    return dest


def test_check_with_a_profile(tmp_path, tiny_model_src, monkeypatch, capsys):
    model = tiny_model_src
    monkeypatch.chdir(tmp_path)
    write_prompts(tmp_path / "prompts.jsonl", 24)
    shards = {"n_shards": 2, "shards_per_job": 2, "gpus_per_shard": 8, "chunk_size": 4}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(model, "prompts.jsonl", shards=shards)))
    profile = write_profile(tmp_path / "p", mem_mb_per_cpu=10_000_000)
    assert main(["check", "--profile", str(profile), "c.yaml"]) == 1
    err = capsys.readouterr().err.splitlines()
    gpus = "asks for 16 GPUs in one job (gpu=16); a gpu_a100 node has 4"
    # the profile's memory per core holds for every job (and 4 GPUs' cores are 72 already)
    mem = "asks for 703,125 GiB (mem_mb_per_cpu=10000000 x 72 cores); a gpu_a100 node has 480 GiB usable"
    assert err[0] == f"shardwise: error: rule generate (1 job): {gpus}; {mem}"
    assert err[1].startswith("shardwise: error: rule merge_generate (1 job): asks for 156,250 GiB")
    assert err[2] == (
        f"shardwise: error: {profile}/config.yaml: default-resources.slurm_account is not set: put the "
        "SLURM account to bill there (`accinfo` on Snellius lists yours)"
    )
    assert len(err) == 3

    shards["gpus_per_shard"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(model, "prompts.jsonl", shards=shards)))
    ok = write_profile(tmp_path / "ok", slurm_account="proj123")
    assert main(["check", "--profile", str(ok), "c.yaml"]) == 0
    assert "every job fits" in capsys.readouterr().out
