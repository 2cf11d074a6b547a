rule toxicity_probe_data:
    """The probe set `toxicity`: the analysed generations' continuations, labelled toxic or not."""
    input:
        generations=expand("results/generations/{model}.parquet", model=AN.runs),
        toxicity=expand("results/analysis/toxicity/{model}.parquet", model=AN.runs),
    output:
        str(TOXICITY_PROBE_DATA),
    log:
        "logs/toxicity_probe_data/toxicity_probe_data.log",
    localrule: True
    conda:
        ENV
    params:
        code=probes_code(),
        settings=toxicity_probe_data_settings(),
    script:
        "../../scripts/toxicity_probe_data.py"


rule activations:
    """One job of a model's activations over a probe set: shards_per_job shards of pooled hidden states."""
    input:
        data=probe_data,
        model=probe_model_dir,
    output:
        "results/activations/{probe_set}/{name}/jobs/job-{job}.json",
    log:
        "logs/activations/{probe_set}/{name}/job-{job}.log",
    conda:
        ENV
    threads: PROBES.shards.shards_per_job
    resources:
        gpu=PROBES.shards.gpus_per_job,
    params:
        code=activations_code(),
        settings=activations_settings(),
    script:
        "../../scripts/activations.py"


rule merge_activations:
    """Verify every shard of a model's activations and copy them into one file per probe set."""
    input:
        manifests=activations_manifests,
        data=probe_data,
        model=probe_model_dir,
    output:
        "results/activations/{probe_set}/{name}.h5",
    log:
        "logs/merge_activations/{probe_set}/{name}.log",
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    params:
        code=activations_code(),
    script:
        "../../scripts/merge_activations.py"


rule train_probes:
    """All probes (layers x labels x L2 values, + control tasks) of one model and probe set at once."""
    input:
        activations="results/activations/{probe_set}/{name}.h5",
        data=probe_data,
    output:
        metrics="results/probes/{probe_set}/{name}/metrics.csv",
        probes="results/probes/{probe_set}/{name}/probes.safetensors",
        summary="results/probes/{probe_set}/{name}/aggregate_metrics.json",
        heatmap=report(
            "results/probes/{probe_set}/{name}/auroc_heatmap.png",
            category="Probes",
            subcategory="{probe_set}",
            labels={"model": "{name}", "figure": "test AUROC per layer and label"},
        ),
        layers=report(
            "results/probes/{probe_set}/{name}/selectivity_by_layer.png",
            category="Probes",
            subcategory="{probe_set}",
            labels={
                "model": "{name}",
                "figure": "AUROC, control task and selectivity by layer",
            },
        ),
    log:
        "logs/train_probes/{probe_set}/{name}.log",
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
        stage="probes",
        code=probes_code(),
        digest=run_info_digest(CFG, "probes", probes_code()),
    script:
        "../../scripts/run_info.py"
