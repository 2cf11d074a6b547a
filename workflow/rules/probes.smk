rule activations:
    """One job of a model's activations: shards_per_job shards of pooled hidden states."""
    input:
        data=PROBES.data,
        model=probe_model_dir,
    output:
        "results/activations/{name}/jobs/job-{job}.json",
    log:
        "logs/activations/{name}/job-{job}.log",
    conda:
        ENV
    threads: PROBES.shards.shards_per_job
    resources:
        gpu=PROBES.shards.gpus_per_job,
    params:
        code=activations_code(),
        settings=str(PROBES),
    script:
        "../../scripts/activations.py"


rule merge_activations:
    """Verify every shard of a model's activations and copy them into results/activations/<model>.h5."""
    input:
        manifests=activations_manifests,
        data=PROBES.data,
        model=probe_model_dir,
    output:
        "results/activations/{name}.h5",
    log:
        "logs/merge_activations/{name}.log",
    conda:
        ENV
    params:
        code=activations_code(),
    script:
        "../../scripts/merge_activations.py"


rule train_probes:
    """All probes (layers x labels x L2 values, + control tasks) of one model at once."""
    input:
        activations="results/activations/{name}.h5",
        data=PROBES.data,
    output:
        metrics="results/probes/{name}/metrics.csv",
        probes="results/probes/{name}/probes.safetensors",
        summary="results/probes/{name}/aggregate_metrics.json",
        heatmap="results/probes/{name}/auroc_heatmap.png",
    log:
        "logs/train_probes/{name}.log",
    conda:
        ENV
    resources:
        gpu=1 if PROBES.shards.gpus_per_shard else 0,
    params:
        code=probes_code(),
        settings=str(PROBES),
    script:
        "../../scripts/train_probes.py"


rule probes_run_info:
    """The resolved config and versions next to the probes."""
    output:
        "results/probes/run_info.json",
    log:
        "logs/run_info/probes.log",
    localrule: True
    conda:
        ENV
    params:
        info=run_info(CFG, "probes", probes_code()),
    script:
        "../../scripts/run_info.py"
