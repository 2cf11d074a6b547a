from shardwise.fluency import STAGE
from shardwise.smk import rule_main

rule_main(snakemake, STAGE.merge)
