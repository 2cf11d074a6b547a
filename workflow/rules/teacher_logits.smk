rule compute_teacher_logits:
    """One job of a teacher: shards_per_job shards of top-k log-probs, one submitit worker each."""
    input:
        corpus=teacher_corpus(),
        model=teacher_model_dir,
    output:
        "results/teacher_logits/{teacher}/jobs/job-{job}.json",
    log:
        "logs/teacher_logits/{teacher}/job-{job}.log",
    conda:
        ENV
    threads: TL.shards.shards_per_job
    resources:
        gpu=TL.shards.gpus_per_job,
    params:
        code=teacher_logits_code(),
        settings=str(TL),
    script:
        "../../scripts/teacher_logits.py"


rule merge_teacher_logits:
    """Verify every shard of a teacher and copy them into results/teacher_logits/<teacher>.h5."""
    input:
        manifests=teacher_logits_manifests,
        model=teacher_model_dir,
        corpus=teacher_corpus(),
    output:
        "results/teacher_logits/{teacher}.h5",
    log:
        "logs/merge_teacher_logits/{teacher}.log",
    # a failed verification already removed what it could not verify: retrying it is hopeless
    retries: 0
    conda:
        ENV
    params:
        code=teacher_logits_code(),
    script:
        "../../scripts/merge_teacher_logits.py"


rule teacher_logits_run_info:
    """The resolved config and versions next to the teacher logits."""
    output:
        "results/teacher_logits/run_info.json",
    log:
        "logs/run_info/teacher_logits.log",
    localrule: True
    conda:
        ENV
    params:
        stage="teacher_logits",
        code=teacher_logits_code(),
        digest=run_info_digest(CFG, "teacher_logits", teacher_logits_code()),
    script:
        "../../scripts/run_info.py"
