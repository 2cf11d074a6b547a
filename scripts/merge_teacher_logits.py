from shardwise.smk import rule_main
from shardwise.teacher_logits import STAGE

rule_main(snakemake, STAGE.merge)
