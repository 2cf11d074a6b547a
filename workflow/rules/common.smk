# Validation, input functions and wildcard constraints shared by every stage.
import sys
from pathlib import Path

# The workflow uses the shardwise package next to it (src/), in this process and, through
# PYTHONPATH, in every job: an installed copy of another version cannot shadow it.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from shardwise.environment import export_package_path, jobs_offline

export_package_path()
jobs_offline()


# Passed on to every job, also on other nodes: jobs load prepared models, they never download.
envvars:
    "HF_HUB_OFFLINE",


from shardwise import settings
from shardwise.checks import check_inputs
from shardwise.cluster import Cluster, account_problem, table_from
from shardwise.config import TOXICITY_PROBE_DATA
from shardwise.errors import ShardwiseError
from shardwise.fingerprint import code_version
from shardwise.shards.store import heal_manifests
from shardwise.smk import as_param, fail, workflow_config

CFG = workflow_config(config, workflow.configfiles)
GEN = CFG.generate
TL = CFG.teacher_logits
PROBES = CFG.probes
PROBE_SETS = CFG.probe_sets()
AN = CFG.analysis
ENV = "../../envs/shardwise.yaml"


def _raw_resources(resources):
    """{name: the value as written} of a Snakemake resource map (profile values are unevaluated)."""
    return {name: getattr(res, "raw", res) for name, res in (resources or {}).items()}


# A SLURM profile of ours names its partition table (default resource shardwise_partitions): then
# every job is placed on a partition from its own resources, and checked against it below.
_DEFAULTS = _raw_resources(workflow.resource_settings.default_resources)
try:
    CLUSTER = Cluster(
        CFG,
        table_from(_DEFAULTS),
        _DEFAULTS,
        {
            name: _raw_resources(res)
            for name, res in workflow.resource_settings.overwrite_resources.items()
        },
    )
except ShardwiseError as exc:
    if workflow.is_main_process:
        fail(str(exc))
    # inside a job its resources are settled; the srun line falls back to the job's threads
    CLUSTER = Cluster(CFG, None)


if workflow.is_main_process:
    # A job whose failure recurs (bad input, config or model, wrong data types) is not retried.
    from shardwise.retries import install as no_blind_retries

    # a minute early: the clocks of other nodes
    no_blind_retries(since=workflow.start_time.timestamp() - 60)
    # What no partition can run fails here, one line per rule, before anything is submitted (also
    # in a dry run): sbatch would refuse it, and the profile would retry the refusal.
    _impossible = CLUSTER.problems()
    for _line in _impossible:
        print(f"shardwise: error: {_line}", file=sys.stderr)
    if _impossible:
        raise SystemExit(1)
    # The input checks run once, before any job (also in a dry run), and fail in one line; the
    # re-parse inside each job does not repeat them.
    try:
        check_inputs(CFG)
    except ShardwiseError as exc:
        fail(str(exc))
    # The shard store decides what is missing: a job manifest whose shard files are gone or
    # truncated is removed, so this run (a dry run shows it) recomputes just those shards.
    for _line in heal_manifests("results"):
        print(f"shardwise: {_line}", file=sys.stderr)


# {run}: a generation run (a key of generate.models); {model}: a model (a key of models, or a
# probes.random_baseline `<model>-random`); {teacher}, {probe_set}; {job}: a job's number.
wildcard_constraints:
    job=r"\d{4}",
    run="|".join(GEN.runs) or "no-generation-runs",
    model="|".join([*CFG.models, *PROBES.probed()]) or "no-models",
    teacher="|".join(TL.teachers) or "no-teachers",
    probe_set="|".join(PROBE_SETS) or "no-probe-sets",


def code(stage):
    """The `code` param of a stage's rules: its code identity (shardwise.fingerprint.stage_identity)."""
    return code_version(stage)


def model_dir(name):
    return f"resources/models/{name}"


def job_shards(spec):
    """The `shards` param of a sharded job - which shards it runs (shards_per_job regroups
    them; the shards' content depends on n_shards and chunk_size, in the stage's settings).
    """
    return lambda wc: as_param(spec.job_shards(int(wc.job)))


def manifests(pattern, spec, *names):
    """The job manifests of one sharded output (`pattern` is the job rule's output, `names` the
    wildcards they share), e.g. every results/generations/<run>/jobs/job-*.json of a run.
    """
    jobs = [f"{j:04d}" for j in range(spec.n_jobs)]
    return lambda wc: expand(pattern, job=jobs, **{name: wc[name] for name in names})


def generation_model_dir(wildcards):
    return model_dir(GEN.runs[wildcards.run].model)


def generation_outputs():
    return expand(
        "results/generations/{run}.{ext}",
        run=GEN.runs,
        ext=["parquet", "run_info.json"],
    )


def teacher_corpus():
    """The teacher's corpus table: teacher_logits.corpus, or the generation run's merged table."""
    if TL.corpus is not None:
        return str(TL.corpus)
    return expand(rules.merge_generate.output.table, run=TL.generations)[0]


def teacher_model_dir(wildcards):
    return model_dir(TL.teachers[wildcards.teacher])


def teacher_logits_outputs():
    return expand(
        "results/teacher_logits/{teacher}.{ext}",
        teacher=TL.teachers,
        ext=["h5", "run_info.json"],
    )


def probe_model_dir(wildcards):
    return model_dir(PROBES.weights_of(wildcards.model)[0])


def probe_data(wildcards):
    return str(PROBE_SETS[wildcards.probe_set].data)


def probes_outputs():
    return expand(
        "results/probes/{probe_set}/{model}/{file}",
        probe_set=PROBE_SETS,
        model=PROBES.probed(),
        file=[
            "metrics.csv",
            "probes.safetensors",
            "aggregate_metrics.json",
            "auroc_heatmap.png",
            "selectivity_by_layer.png",
            "run_info.json",
        ],
    )


def toxicity_inputs(wildcards):
    inputs = {"generations": f"results/generations/{wildcards.run}.parquet"}
    if AN.toxicity.scorer == "hf":
        inputs["model"] = model_dir(AN.toxicity.model)
    return inputs


def analysis_outputs():
    if not AN.runs:
        return []
    return [
        "results/analysis/scores.parquet",
        "results/analysis/summary.csv",
        "results/analysis/correlations.csv",
        "results/analysis/differences.csv",
        "results/analysis/report.html",
        "results/analysis/run_info.json",
    ]


onstart:
    # a real run on SLURM bills an account: the profile names it (a dry run needs none)
    if CLUSTER.table is not None and (
        _problem := account_problem(_DEFAULTS, "the SLURM profile")
    ):
        fail(_problem)
