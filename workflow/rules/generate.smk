rule generate:
    """One job of a generation run: shards_per_job shards, one submitit worker per shard."""
    input:
        prompts=GEN.prompts,
        model=generation_model_dir,
    output:
        "results/generations/{model}/jobs/job-{job}.json",
    log:
        "logs/generate/{model}/job-{job}.log",
    conda:
        ENV
    threads: GEN.shards.shards_per_job
    resources:
        gpu=GEN.shards.gpus_per_job,
    params:
        code=generate_code(),
        sampling=lambda wc: str(GEN.runs[wc.model].sampling),
        shards=str(GEN.shards),
    script:
        "../../scripts/generate.py"


rule merge_generations:
    """Verify every shard of a generation run and write results/generations/<model>.parquet."""
    input:
        manifests=generate_manifests,
        model=generation_model_dir,
    output:
        "results/generations/{model}.parquet",
    log:
        "logs/merge_generations/{model}.log",
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    params:
        code=generate_code(),
    script:
        "../../scripts/merge_generations.py"


rule generations_run_info:
    """The resolved config and versions next to the generations."""
    output:
        "results/generations/run_info.json",
    log:
        "logs/run_info/generations.log",
    localrule: True
    conda:
        ENV
    params:
        stage="generate",
        code=generate_code(),
        digest=run_info_digest(CFG, "generate", generate_code()),
    script:
        "../../scripts/run_info.py"
