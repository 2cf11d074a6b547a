rule score_fluency:
    """One job of a run's perplexity scoring: shards_per_job shards, one worker each."""
    input:
        generations=rules.merge_generate.output.table,
        model=model_dir(AN.fluency.model or "none"),
    output:
        "results/analysis/fluency/{run}/jobs/job-{job}.json",
    log:
        "logs/score_fluency/{run}/job-{job}.log",
    benchmark:
        "benchmarks/score_fluency/{run}/job-{job}.tsv"
    conda:
        ENV
    threads: CLUSTER.threads("score_fluency")
    resources:
        **CLUSTER.resources("score_fluency"),
    params:
        settings=as_param(settings.score_fluency(CFG)),
        shards=job_shards(AN.fluency.shards),
        code=code("fluency"),
    script:
        "../../scripts/score_fluency.py"


rule merge_fluency:
    """Verify every shard of a run's perplexities: results/analysis/fluency/<run>.parquet."""
    input:
        manifests=manifests(rules.score_fluency.output[0], AN.fluency.shards, "run"),
        generations=rules.merge_generate.output.table,
        model=model_dir(AN.fluency.model or "none"),
    output:
        "results/analysis/fluency/{run}.parquet",
    log:
        "logs/merge_fluency/{run}.log",
    benchmark:
        "benchmarks/merge_fluency/{run}.tsv"
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    resources:
        **CLUSTER.resources("merge_fluency"),
    params:
        settings=as_param(settings.score_fluency(CFG)),
        code=code("fluency"),
    script:
        "../../scripts/merge_fluency.py"


rule score_toxicity:
    """A toxicity probability per generation of a run, with the configured scorer."""
    input:
        unpack(toxicity_inputs),
    output:
        "results/analysis/toxicity/{run}.parquet",
    log:
        "logs/score_toxicity/{run}.log",
    benchmark:
        "benchmarks/score_toxicity/{run}.tsv"
    conda:
        ENV
    resources:
        **CLUSTER.resources("score_toxicity"),
    params:
        settings=as_param(settings.score_toxicity(CFG)),
        code=code("toxicity"),
    script:
        "../../scripts/score_toxicity.py"


rule analysis:
    """scores.parquet, summary.csv (EMT, toxicity probability, PPL, distinct-n, CIs, run settings),
    correlations.csv, differences.csv (each run minus the first, paired CIs) and
    summary_by_prompt_toxicity.csv (the summary for toxic and non-toxic prompts, when the prompts
    have analysis.toxicity.prompt_toxicity_column; else its header only)."""
    input:
        generations=expand(rules.merge_generate.output.table, run=AN.runs),
        fluency=expand(rules.merge_fluency.output[0], run=AN.runs),
        toxicity=expand(rules.score_toxicity.output[0], run=AN.runs),
    output:
        scores="results/analysis/scores.parquet",
        summary="results/analysis/summary.csv",
        correlations="results/analysis/correlations.csv",
        differences="results/analysis/differences.csv",
        summary_by_prompt_toxicity="results/analysis/summary_by_prompt_toxicity.csv",
    log:
        "logs/analysis/analysis.log",
    benchmark:
        "benchmarks/analysis/analysis.tsv"
    conda:
        ENV
    # 16: the bootstrap's resamples run in threads (the results do not depend on how many); on
    # Snellius the rome 1/8 node it is billed for (16 cores, 28 GiB); locally capped at --cores
    threads: CLUSTER.threads("analysis")
    resources:
        **CLUSTER.resources("analysis"),
    params:
        runs=list(AN.runs),
        settings=as_param(settings.analysis(CFG)),
        code=code("analysis"),
    script:
        "../../scripts/analysis.py"


rule report:
    """Figures and one self-contained report.html (the figures also go into `snakemake --report`),
    and the analysis' run info."""
    input:
        scores=rules.analysis.output.scores,
        summary=rules.analysis.output.summary,
        correlations=rules.analysis.output.correlations,
        differences=rules.analysis.output.differences,
        summary_by_prompt_toxicity=rules.analysis.output.summary_by_prompt_toxicity,
        toxicity=expand(rules.score_toxicity.output[0], run=AN.runs),
    output:
        scatter=report(
            expand("results/analysis/figures/ppl_vs_toxicity_{run}.png", run=AN.runs),
            caption="../report/ppl_vs_toxicity.rst",
            category="Fluency and toxicity",
        ),
        bars=report(
            "results/analysis/figures/models.png",
            caption="../report/models.rst",
            category="Fluency and toxicity",
        ),
        forest_differences=report(
            "results/analysis/figures/differences.png",
            caption="../report/differences.rst",
            category="Fluency and toxicity",
        ),
        forest_correlations=report(
            "results/analysis/figures/correlations.png",
            caption="../report/correlations.rst",
            category="Fluency and toxicity",
        ),
        # the report's tables as pasted: formatted cells (3 significant digits, CIs in brackets)
        tables=expand(
            "results/analysis/tables/{table}.{ext}",
            table=[
                "settings",
                "summary",
                "differences",
                "correlations",
                "summary_by_prompt_toxicity",
            ],
            ext=["csv", "tex"],
        ),
        html="results/analysis/report.html",
        run_info="results/analysis/run_info.json",
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        ENV
    resources:
        **CLUSTER.resources("report"),
    params:
        runs=list(AN.runs),
        settings=as_param(settings.report(CFG)),
        code=code("report"),
    script:
        "../../scripts/report.py"
