from shardwise.smk import rule_main
from shardwise.teacher_logits import merge

rule_main(snakemake, merge)
