rule score_fluency:
    """One job of a run's perplexity scoring: shards_per_job shards, one worker each."""
    input:
        generations="results/generations/{model}.parquet",
        model=model_dir(AN.fluency_model or "none"),
    output:
        "results/analysis/fluency/{model}/jobs/job-{job}.json",
    log:
        "logs/score_fluency/{model}/job-{job}.log",
    conda:
        ENV
    threads: AN.fluency_shards.shards_per_job
    resources:
        gpu=AN.fluency_shards.gpus_per_job,
    params:
        code=analysis_code("fluency"),
        settings=str(AN),
    script:
        "../../scripts/score_fluency.py"


rule merge_fluency:
    """Verify every shard of a run's perplexities: results/analysis/fluency/<model>.parquet."""
    input:
        manifests=fluency_manifests,
        generations="results/generations/{model}.parquet",
        model=model_dir(AN.fluency_model or "none"),
    output:
        "results/analysis/fluency/{model}.parquet",
    log:
        "logs/merge_fluency/{model}.log",
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    params:
        code=analysis_code("fluency"),
    script:
        "../../scripts/merge_fluency.py"


rule score_toxicity:
    """A toxicity probability per generation of a run, with the configured scorer."""
    input:
        unpack(toxicity_inputs),
    output:
        "results/analysis/toxicity/{model}.parquet",
    log:
        "logs/score_toxicity/{model}.log",
    conda:
        ENV
    resources:
        gpu=toxicity_gpus(),
    params:
        code=analysis_code("toxicity"),
        settings=str(AN),
    script:
        "../../scripts/score_toxicity.py"


rule analyse:
    """scores.parquet, summary.csv (EMT, toxicity probability, PPL, distinct-n, CIs, run settings),
    correlations.csv and differences.csv (each run minus the first, paired CIs)."""
    input:
        generations=expand("results/generations/{model}.parquet", model=AN.runs),
        fluency=expand("results/analysis/fluency/{model}.parquet", model=AN.runs),
        toxicity=expand("results/analysis/toxicity/{model}.parquet", model=AN.runs),
    output:
        scores="results/analysis/scores.parquet",
        summary="results/analysis/summary.csv",
        correlations="results/analysis/correlations.csv",
        differences="results/analysis/differences.csv",
    log:
        "logs/analyse/analyse.log",
    conda:
        ENV
    params:
        runs=list(AN.runs),
        code=analysis_code("analysis"),
        settings=str(AN),
    script:
        "../../scripts/analyse.py"


rule report:
    """Figures and one self-contained report.html (the figures also go into `snakemake --report`)."""
    input:
        scores="results/analysis/scores.parquet",
        summary="results/analysis/summary.csv",
        correlations="results/analysis/correlations.csv",
        differences="results/analysis/differences.csv",
        toxicity=expand("results/analysis/toxicity/{model}.parquet", model=AN.runs),
    output:
        scatter=report(
            expand(
                "results/analysis/figures/ppl_vs_toxicity_{model}.png", model=AN.runs
            ),
            category="Fluency and toxicity",
        ),
        bars=report(
            "results/analysis/figures/models.png", category="Fluency and toxicity"
        ),
        forest_differences=report(
            "results/analysis/figures/differences.png", category="Fluency and toxicity"
        ),
        forest_correlations=report(
            "results/analysis/figures/correlations.png",
            category="Fluency and toxicity",
        ),
        html="results/analysis/report.html",
    log:
        "logs/report/report.log",
    conda:
        ENV
    params:
        runs=list(AN.runs),
        code=analysis_code("report"),
    script:
        "../../scripts/report.py"


rule analysis_run_info:
    """The resolved config and versions next to the analysis."""
    output:
        "results/analysis/run_info.json",
    log:
        "logs/run_info/analysis.log",
    localrule: True
    conda:
        ENV
    params:
        stage="analysis",
        code=analysis_code("analysis"),
        digest=run_info_digest(CFG, "analysis", analysis_code("analysis")),
    script:
        "../../scripts/run_info.py"
