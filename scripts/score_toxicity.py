from shardwise.smk import rule_main
from shardwise.toxicity import job

rule_main(snakemake, job)
