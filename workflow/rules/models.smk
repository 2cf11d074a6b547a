rule prepare_model:
    """Materialise one configured model under resources/models/<model>/ (runs where Snakemake
    runs, e.g. a login node with internet; jobs then load it offline)."""
    output:
        directory("resources/models/{model}"),
    log:
        "logs/prepare_model/{model}.log",
    localrule: True
    conda:
        ENV
    params:
        settings=lambda wc: as_param(settings.prepare_model(CFG, wc.model)),
        code=code("prepare_model"),
    script:
        "../../scripts/prepare_model.py"
