from shardwise.probes import train
from shardwise.smk import rule_main

rule_main(snakemake, train)
