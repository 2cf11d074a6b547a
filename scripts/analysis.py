from shardwise.analysis import job
from shardwise.smk import rule_main

rule_main(snakemake, job)
