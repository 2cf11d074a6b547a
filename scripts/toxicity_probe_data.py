from shardwise.probes import toxicity_probe_data
from shardwise.smk import rule_main

rule_main(snakemake, toxicity_probe_data)
