# shardwise: one DAG from prompts to generations (and, as stages land, teacher logits, probes and
# the fluency/toxicity analysis). See README.md; the config reference is
# workflow/schemas/config.schema.yaml.
from snakemake.utils import min_version

min_version("9.0")


# The embedded demo, unless `--configfile` names another config: that one then replaces the demo
# (Snakemake would otherwise merge it into the demo's models and runs).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


rule all:
    """Everything the config asks for."""
    default_target: True
    input:
        generation_outputs(),


rule generations:
    """Stop after the generation stage."""
    input:
        generation_outputs(),


include: "workflow/rules/models.smk"
include: "workflow/rules/generate.smk"
