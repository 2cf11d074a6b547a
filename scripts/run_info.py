from shardwise.smk import rule_main, write_run_info

rule_main(snakemake, write_run_info)
