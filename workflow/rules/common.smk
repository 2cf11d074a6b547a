# Validation, input functions and wildcard constraints shared by every stage.
import sys
from pathlib import Path

# The workflow uses the shardwise package next to it (src/), in this process and, through
# PYTHONPATH, in every job: an installed copy of another version cannot shadow it.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from shardwise.smk import export_package_path, jobs_offline

export_package_path()
jobs_offline()


# Passed on to every job, also on other nodes: jobs load prepared models, they never download.
envvars:
    "HF_HUB_OFFLINE",


from shardwise import activations as _activations
from shardwise import generate as _generate
from shardwise import probes as _probes
from shardwise import teacher_logits as _teacher_logits
from shardwise.errors import ShardwiseError
from shardwise.fingerprint import code_version
from shardwise.config import TOXICITY_PROBE_DATA
from shardwise.shards import heal_manifests
from shardwise.smk import check_inputs, fail, run_info_digest, workflow_config

CFG = workflow_config(config, workflow.configfiles)
GEN = CFG.generate
TL = CFG.teacher_logits
PROBES = CFG.probes
PROBE_SETS = CFG.probe_sets()
AN = CFG.analysis
ENV = "../../envs/shardwise.yaml"


try:  # fail at parse time (also in a dry run), in one line, before any job can start
    check_inputs(CFG)
except ShardwiseError as exc:
    fail(str(exc))

if workflow.is_main_process:
    # The shard store decides what is missing: a job manifest whose shard files are gone or
    # truncated is removed, so this run (a dry run shows it) recomputes just those shards.
    for _line in heal_manifests("results"):
        print(f"shardwise: {_line}", file=sys.stderr)


wildcard_constraints:
    job=r"\d{4}",
    model="|".join(GEN.runs) or "no-generation-runs",
    name="|".join([*CFG.models, *PROBES.probed()]) or "no-models",
    teacher="|".join(TL.teachers) or "no-teachers",
    probe_set="|".join(PROBE_SETS) or "no-probe-sets",


def model_dir(name):
    return f"resources/models/{name}"


def generation_model_dir(wildcards):
    return model_dir(GEN.runs[wildcards.model].model)


def generate_manifests(wildcards):
    return expand(
        "results/generations/{model}/jobs/job-{job:04d}.json",
        model=wildcards.model,
        job=range(GEN.shards.n_jobs),
    )


def generate_code():
    return code_version(*_generate.CODE)


def generation_outputs():
    return expand("results/generations/{model}.parquet", model=GEN.runs) + [
        "results/generations/run_info.json"
    ]


def teacher_corpus():
    return str(TL.corpus_path())


def teacher_model_dir(wildcards):
    return model_dir(TL.teachers[wildcards.teacher])


def teacher_logits_manifests(wildcards):
    return expand(
        "results/teacher_logits/{teacher}/jobs/job-{job:04d}.json",
        teacher=wildcards.teacher,
        job=range(TL.shards.n_jobs),
    )


def teacher_logits_code():
    return code_version(*_teacher_logits.CODE)


def teacher_logits_outputs():
    if not TL.teachers:
        return []
    return expand("results/teacher_logits/{teacher}.h5", teacher=TL.teachers) + [
        "results/teacher_logits/run_info.json"
    ]


def probe_model_dir(wildcards):
    return model_dir(PROBES.weights_of(wildcards.name)[0])


def probe_data(wildcards):
    return str(PROBE_SETS[wildcards.probe_set].data)


def activations_manifests(wildcards):
    return expand(
        "results/activations/{probe_set}/{name}/jobs/job-{job:04d}.json",
        probe_set=wildcards.probe_set,
        name=wildcards.name,
        job=range(PROBES.shards.n_jobs),
    )


def activations_settings():
    """What the activations depend on in the probes section: a change of l2_grid, splits or
    stopping retrains the probes without touching the activations."""
    keys = ("layers", "pooling", "max_length", "batch_tokens", "shards")
    return str({key: getattr(PROBES, key) for key in keys})


def toxicity_probe_data_settings():
    split = ("val_fraction", "test_fraction", "seed")
    return str((AN.runs, AN.threshold, *(getattr(PROBES, key) for key in split)))


def activations_code():
    return code_version(*_activations.CODE)


def probes_code():
    return code_version(*_activations.CODE, "shardwise.probes")


def probes_outputs():
    if not PROBE_SETS:
        return []
    return expand(
        "results/probes/{probe_set}/{name}/{file}",
        probe_set=PROBE_SETS,
        name=PROBES.probed(),
        file=[
            "metrics.csv",
            "probes.safetensors",
            "aggregate_metrics.json",
            "auroc_heatmap.png",
            "selectivity_by_layer.png",
        ],
    ) + ["results/probes/run_info.json"]


def fluency_manifests(wildcards):
    return expand(
        "results/analysis/fluency/{model}/jobs/job-{job:04d}.json",
        model=wildcards.model,
        job=range(AN.fluency_shards.n_jobs),
    )


def toxicity_inputs(wildcards):
    inputs = {"generations": f"results/generations/{wildcards.model}.parquet"}
    if AN.toxicity_scorer == "hf":
        inputs["model"] = model_dir(AN.toxicity_model)
    return inputs


def toxicity_gpus():
    """Neural scorers get a GPU where the config has GPUs (the fluency shards use them)."""
    neural = AN.toxicity_scorer != "profanity-check"
    return 1 if neural and AN.fluency_shards.gpus_per_shard else 0


def analysis_code(module):
    return code_version(
        f"shardwise.{module}", "shardwise.fluency", "shardwise.batching"
    )


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
