from shardwise.smk import rule_main
from shardwise.toxicity_probe_data import build

rule_main(snakemake, build)
