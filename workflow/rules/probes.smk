rule toxicity_probe_data:
    """The probe set `toxicity`: the analysed generations' continuations, labelled toxic or not."""
    input:
        generations=expand(rules.merge_generate.output.table, run=AN.runs),
        toxicity=expand("results/analysis/toxicity/{run}.parquet", run=AN.runs),
    output:
        str(TOXICITY_PROBE_DATA),
    log:
        "logs/toxicity_probe_data/toxicity_probe_data.log",
    benchmark:
        "benchmarks/toxicity_probe_data/toxicity_probe_data.tsv"
    # it fails only on its input (e.g. one class only), which a retry does not change
    retries: 0
    conda:
        ENV
    # a cluster job, not one on the login node: it holds every analysed generation in memory
    # (docs/scale.md: ~3.4 GB at the example's size)
    resources:
        **CLUSTER.resources("toxicity_probe_data"),
    params:
        settings=as_param(settings.toxicity_probe_data(CFG)),
        code=code("toxicity_probe_data"),
    script:
        "../../scripts/toxicity_probe_data.py"


rule activations:
    """One job of a model's activations over a probe set: shards_per_job shards of pooled hidden states."""
    input:
        data=probe_data,
        model=probe_model_dir,
    output:
        "results/activations/{probe_set}/{model}/jobs/job-{job}.json",
    log:
        "logs/activations/{probe_set}/{model}/job-{job}.log",
    benchmark:
        "benchmarks/activations/{probe_set}/{model}/job-{job}.tsv"
    conda:
        ENV
    threads: CLUSTER.threads("activations")
    resources:
        **CLUSTER.resources("activations"),
    params:
        settings=lambda wc: as_param(settings.activations(CFG, wc.probe_set, wc.model)),
        shards=job_shards(PROBES.shards),
        code=code("activations"),
    script:
        "../../scripts/activations.py"


rule merge_activations:
    """Verify every shard of a model's activations and copy them into one file per probe set."""
    input:
        manifests=manifests(
            rules.activations.output[0], PROBES.shards, "probe_set", "model"
        ),
        data=probe_data,
        model=probe_model_dir,
    output:
        "results/activations/{probe_set}/{model}.h5",
    log:
        "logs/merge_activations/{probe_set}/{model}.log",
    benchmark:
        "benchmarks/merge_activations/{probe_set}/{model}.tsv"
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    resources:
        **CLUSTER.resources("merge_activations"),
    params:
        settings=lambda wc: as_param(settings.activations(CFG, wc.probe_set, wc.model)),
        code=code("activations"),
    script:
        "../../scripts/merge_activations.py"


rule train_probes:
    """All probes (layers x labels x L2 values, + control tasks) of one model and probe set at once."""
    input:
        activations=rules.merge_activations.output[0],
        data=probe_data,
    output:
        metrics="results/probes/{probe_set}/{model}/metrics.csv",
        probes="results/probes/{probe_set}/{model}/probes.safetensors",
        summary="results/probes/{probe_set}/{model}/aggregate_metrics.json",
        heatmap=report(
            "results/probes/{probe_set}/{model}/auroc_heatmap.png",
            caption="../report/auroc_heatmap.rst",
            category="Probes",
            subcategory="{probe_set}",
            labels={"model": "{model}", "figure": "test AUROC per layer and label"},
        ),
        layers=report(
            "results/probes/{probe_set}/{model}/selectivity_by_layer.png",
            caption="../report/selectivity_by_layer.rst",
            category="Probes",
            subcategory="{probe_set}",
            labels={
                "model": "{model}",
                "figure": "AUROC, control task and selectivity by layer",
            },
        ),
        run_info="results/probes/{probe_set}/{model}/run_info.json",
    log:
        "logs/train_probes/{probe_set}/{model}.log",
    benchmark:
        "benchmarks/train_probes/{probe_set}/{model}.tsv"
    conda:
        ENV
    resources:
        **CLUSTER.resources("train_probes"),
    params:
        settings=lambda wc: as_param(settings.train_probes(CFG, wc.probe_set)),
        code=code("probes"),
    script:
        "../../scripts/train_probes.py"
