# shardwise: one DAG from prompts to generations, teacher logits, probes and the fluency/toxicity
# analysis with its report. See README.md; the config reference is
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
        teacher_logits_outputs(),
        probes_outputs(),
        analysis_outputs(),


rule all_generate:
    """Stop after the generation stage."""
    input:
        generation_outputs(),


rule all_teacher_logits:
    """Stop after the teacher-logits stage (and what it needs)."""
    input:
        teacher_logits_outputs(),


rule all_probes:
    """Stop after the probes (activations and probe training)."""
    input:
        probes_outputs(),


rule all_analysis:
    """Stop after the fluency/toxicity analysis and its report."""
    input:
        analysis_outputs(),


include: "workflow/rules/models.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/teacher_logits.smk"
include: "workflow/rules/probes.smk"
include: "workflow/rules/analysis.smk"
