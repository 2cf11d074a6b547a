from shardwise.generate import merge
from shardwise.smk import rule_main

rule_main(snakemake, merge)
