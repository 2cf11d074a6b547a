"""The workflow's own cost at DAG time: a dry run of ~9,000 jobs through this Snakefile against a
plain Snakefile with the same rules, wildcards, files, logs, benchmarks and job counts, each running a
script (as ours do), and nothing else (no config schema, no params, no shardwise), in one run.

    python bench/dag.py [--shards 1024] [--runs 4] [--repeat 2]

Prints both dry runs' wall times (best of --repeat), the job count and the ratio. Builds everything
in a temporary directory (a copy of the workflow, a fake local model, prompts); runs offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

PLAIN = r"""
RUNS = config["runs"]
N = config["shards"]
JOBS = [f"{j:04d}" for j in range(N)]

wildcard_constraints:
    job=r"\d{4}",
    run="|".join(RUNS),
    model="tiny",
    teacher="tiny",

rule all:
    input:
        expand("results/generations/{run}.parquet", run=RUNS),
        "results/teacher_logits/tiny.h5",
        "results/analysis/report.html",

rule prepare_model:
    log: "logs/prepare_model/{model}.log"
    output: directory("resources/models/{model}")
    script: "noop.py"

rule generate:
    log: "logs/generate/{run}/{job}.log"
    benchmark: "benchmarks/generate/{run}/{job}.tsv"
    input: prompts="config/prompts.jsonl", model="resources/models/tiny"
    output: "results/generations/{run}/jobs/job-{job}.json"
    script: "noop.py"

rule merge_generate:
    log: "logs/merge_generate/{run}.log"
    input: lambda wc: expand("results/generations/{run}/jobs/job-{job}.json", run=wc.run, job=JOBS)
    output: "results/generations/{run}.parquet"
    script: "noop.py"

rule teacher_logits:
    log: "logs/teacher_logits/{teacher}/{job}.log"
    benchmark: "benchmarks/teacher_logits/{teacher}/{job}.tsv"
    input: "results/generations/%s.parquet" % RUNS[0], "resources/models/tiny"
    output: "results/teacher_logits/{teacher}/jobs/job-{job}.json"
    script: "noop.py"

rule merge_teacher_logits:
    log: "logs/merge_teacher_logits/{teacher}.log"
    input:
        lambda wc: expand("results/teacher_logits/{t}/jobs/job-{job}.json", t=wc.teacher, job=JOBS)
    output: "results/teacher_logits/{teacher}.h5"
    script: "noop.py"

rule score_fluency:
    log: "logs/score_fluency/{run}/{job}.log"
    benchmark: "benchmarks/score_fluency/{run}/{job}.tsv"
    input: "results/generations/{run}.parquet", "resources/models/tiny"
    output: "results/analysis/fluency/{run}/jobs/job-{job}.json"
    script: "noop.py"

rule merge_fluency:
    log: "logs/merge_fluency/{run}.log"
    input: lambda wc: expand("results/analysis/fluency/{run}/jobs/job-{job}.json", run=wc.run, job=JOBS)
    output: "results/analysis/fluency/{run}.parquet"
    script: "noop.py"

rule score_toxicity:
    log: "logs/score_toxicity/{run}.log"
    benchmark: "benchmarks/score_toxicity/{run}.tsv"
    input: "results/generations/{run}.parquet"
    output: "results/analysis/toxicity/{run}.parquet"
    script: "noop.py"

rule analysis:
    log: "logs/analysis/analysis.log"
    benchmark: "benchmarks/analysis/analysis.tsv"
    input:
        expand("results/analysis/fluency/{run}.parquet", run=RUNS),
        expand("results/analysis/toxicity/{run}.parquet", run=RUNS),
    output: "results/analysis/summary.csv"
    script: "noop.py"

rule report:
    log: "logs/report/report.log"
    input: "results/analysis/summary.csv"
    output: "results/analysis/report.html"
    script: "noop.py"
"""


def setup(root: Path, shards: int, runs: int) -> list[str]:
    for name in ("Snakefile", "workflow", "scripts", "src", "profiles", "envs", "config"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    model = root / "fake-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (model / "model.safetensors").write_bytes(b"0")
    with open(root / "config/prompts.jsonl", "w") as fh:
        for i in range(shards):
            fh.write(json.dumps({"prompt": f"prompt {i}"}) + "\n")
    names = [f"run{r}" for r in range(runs)]
    shard = {"n_shards": shards, "shards_per_job": 1, "gpus_per_shard": 0, "chunk_size": 1}
    cfg = {
        "models": {"tiny": {"source": "local", "path": str(model)}},
        "generate": {
            "prompts": "config/prompts.jsonl",
            "models": {n: {"model": "tiny"} for n in names},
            "shards": shard,
        },
        "teacher_logits": {"generations": names[0], "teachers": {"tiny": {}}, "shards": shard},
        "analysis": {"fluency": {"model": "tiny", "shards": shard}},
    }
    (root / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    plain = root / "plain"
    plain.mkdir()
    (plain / "Snakefile").write_text(PLAIN)
    (plain / "noop.py").write_text("pass\n")
    (plain / "config.yaml").write_text(yaml.safe_dump({"runs": names, "shards": shards}))
    (plain / "config").mkdir()
    shutil.copy(root / "config/prompts.jsonl", plain / "config/prompts.jsonl")
    return names


def dry_run(cwd: Path, *extra: str) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "1", *extra]
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
    seconds = time.perf_counter() - started
    total = next(int(line.split()[-1]) for line in out.splitlines() if line.startswith("total"))
    return seconds, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, a.shards, a.runs)
        ours = [dry_run(root) for _ in range(a.repeat)]
        plain = [dry_run(root / "plain", "--configfile", "config.yaml") for _ in range(a.repeat)]
    (t_ours, n_ours), (t_plain, n_plain) = min(ours), min(plain)
    print(
        f"dry run, {a.runs} generation runs, teacher and fluency at {a.shards} shards (best of {a.repeat}):"
    )
    print(f"  shardwise Snakefile: {n_ours} jobs in {t_ours:.1f} s")
    print(f"  plain Snakefile:     {n_plain} jobs in {t_plain:.1f} s")
    print(f"  ratio: {t_ours / t_plain:.2f}")


if __name__ == "__main__":
    main()
