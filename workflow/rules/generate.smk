rule generate:
    """One job of a generation run: shards_per_job shards, one submitit worker per shard."""
    input:
        prompts=GEN.prompts,
        model=generation_model_dir,
    output:
        "results/generations/{run}/jobs/job-{job}.json",
    log:
        "logs/generate/{run}/job-{job}.log",
    benchmark:
        "benchmarks/generate/{run}/job-{job}.tsv"
    conda:
        ENV
    threads: CLUSTER.threads("generate")
    resources:
        **CLUSTER.resources("generate"),
    params:
        settings=lambda wc: as_param(settings.generate(CFG, wc.run)),
        shards=job_shards(GEN.shards),
        code=code("generate"),
    script:
        "../../scripts/generate.py"


rule merge_generate:
    """Verify every shard of a generation run: results/generations/<run>.parquet and its run info."""
    input:
        manifests=manifests(rules.generate.output[0], GEN.shards, "run"),
        prompts=GEN.prompts,
        model=generation_model_dir,
    output:
        table="results/generations/{run}.parquet",
        run_info="results/generations/{run}.run_info.json",
    log:
        "logs/merge_generate/{run}.log",
    benchmark:
        "benchmarks/merge_generate/{run}.tsv"
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    resources:
        **CLUSTER.resources("merge_generate"),
    params:
        settings=lambda wc: as_param(settings.generate(CFG, wc.run)),
        code=code("generate"),
    script:
        "../../scripts/merge_generate.py"
