from shardwise.smk import rule_main
from shardwise.teacher_logits import job

rule_main(snakemake, job)
