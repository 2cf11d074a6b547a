rule prepare_model:
    """Materialise one configured model under resources/models/<name>/ (runs where Snakemake
    runs, e.g. a login node with internet; jobs then load it offline)."""
    output:
        directory("resources/models/{name}"),
    log:
        "logs/prepare_model/{name}.log",
    localrule: True
    conda:
        ENV
    params:
        spec=lambda wc: CFG.models[wc.name].describe(),
        dtype=lambda wc: CFG.models[wc.name].dtype,
    script:
        "../../scripts/prepare_model.py"
