rule teacher_logits:
    """One job of a teacher: shards_per_job shards of top-k log-probs, one submitit worker each."""
    input:
        corpus=teacher_corpus(),
        model=teacher_model_dir,
    output:
        "results/teacher_logits/{teacher}/jobs/job-{job}.json",
    log:
        "logs/teacher_logits/{teacher}/job-{job}.log",
    benchmark:
        "benchmarks/teacher_logits/{teacher}/job-{job}.tsv"
    conda:
        ENV
    threads: CLUSTER.threads("teacher_logits")
    resources:
        **CLUSTER.resources("teacher_logits"),
    params:
        settings=lambda wc: as_param(settings.teacher_logits(CFG, wc.teacher)),
        shards=job_shards(TL.shards),
        code=code("teacher_logits"),
    script:
        "../../scripts/teacher_logits.py"


rule merge_teacher_logits:
    """Verify every shard of a teacher: results/teacher_logits/<teacher>.h5 and its run info."""
    input:
        manifests=manifests(rules.teacher_logits.output[0], TL.shards, "teacher"),
        model=teacher_model_dir,
        corpus=teacher_corpus(),
    output:
        logits="results/teacher_logits/{teacher}.h5",
        run_info="results/teacher_logits/{teacher}.run_info.json",
    log:
        "logs/merge_teacher_logits/{teacher}.log",
    benchmark:
        "benchmarks/merge_teacher_logits/{teacher}.tsv"
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    resources:
        **CLUSTER.resources("merge_teacher_logits"),
    params:
        settings=lambda wc: as_param(settings.teacher_logits(CFG, wc.teacher)),
        code=code("teacher_logits"),
    script:
        "../../scripts/merge_teacher_logits.py"
