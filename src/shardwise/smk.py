"""Glue between Snakemake and the package: rule-script entry, parse-time setup, run info."""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from shardwise import __version__
from shardwise.config import Config, load_config
from shardwise.errors import InputError, ShardwiseError

log = logging.getLogger("shardwise")

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "snakemake",
    "snakemake-executor-plugin-slurm",
    "submitit",
    "pandas",
    "pyarrow",
    "h5py",
    "numpy",
)


def export_package_path() -> None:
    """Put the directory this shardwise was imported from first on PYTHONPATH (for jobs)."""
    here = str(Path(__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *rest])


def jobs_offline() -> None:
    """Jobs never download: HF_HUB_OFFLINE=1 for every job (prepare_model alone lifts it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def fail(message: str) -> None:
    """One line on stderr, exit status 1: how every bad input ends."""
    print(f"shardwise: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def rule_main(smk: Any, fn: Callable[[Any], None]) -> None:
    """Run a rule's package function with stdout/stderr (fd level) and logging in the rule's log."""
    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        fn(smk)
    except ShardwiseError as exc:
        log.error("%s", exc)
        fail(str(exc))


def workflow_config(config: dict[str, Any], configfiles: Iterable[str | Path]) -> Config:
    """Validate the Snakemake config at parse time; on error print one line and exit 1."""
    source = ", ".join(str(f) for f in configfiles) or "config"
    try:
        return load_config(config, source=source)
    except ShardwiseError as exc:
        fail(str(exc))
        raise  # unreachable; for type checkers


def _check_shards(section: str, spec: Any, n: int, what: str, where: str, align: int = 1) -> None:
    blocks = -(-n // align)
    if spec.n_shards > blocks:
        unit = what if align == 1 else f"chunks of {align} {what} (chunk_size)"
        raise InputError(
            f"{section}.shards.n_shards ({spec.n_shards}) exceeds the number of {unit} ({blocks}) {where}"
        )


PLACEHOLDER = re.compile(r"<[A-Za-z][\w-]*>")


def check_placeholders(node: Any, key: str = "") -> None:
    """Refuse a template's placeholder left in a config value (`<commit-sha>`, `<project>`)."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_placeholders(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_placeholders(v, f"{key}[{i}]")
    elif isinstance(node, str) and PLACEHOLDER.search(node):
        raise InputError(
            f"{key}: {node!r} holds the placeholder {PLACEHOLDER.search(node).group()}; replace it "
            "(the config's comments say with what)"
        )


def _check_layers(cfg: Config, name: str) -> None:
    """probes.layers against the model's depth, as soon as its config.json is here (a local model,
    or one already prepared): read as JSON, without importing transformers."""
    import json

    from shardwise.activations import resolve_layers

    spec = cfg.models[name]
    candidates = [Path("resources/models") / name / "config.json"]
    if spec.source == "local" and spec.path:
        candidates.insert(0, Path(spec.path) / "config.json")
    for path in candidates:
        try:
            conf = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        depth = conf.get("num_hidden_layers") or (conf.get("text_config") or {}).get("num_hidden_layers")
        if isinstance(depth, int):
            resolve_layers(cfg.probes.layers, depth, source=f"probes.layers (model {name!r}, {path})")
        return


def check_inputs(cfg: Config) -> dict[str, int]:
    """What the workflow checks before any job runs (also `shardwise check`): no placeholder left,
    each used model's source, and each input table; returns the number of items per input."""
    from shardwise.models import check_source
    from shardwise.tables import load_prompts, load_texts

    check_placeholders(cfg.resolved)

    counts = {}
    gen, tl = cfg.generate, cfg.teacher_logits
    for weights in [run.model for run in gen.runs.values()] + list(tl.teachers.values()):
        check_source(cfg.models[weights])
    if gen.runs:
        counts["prompts"] = n = len(load_prompts(gen.prompts))
        _check_shards("generate", gen.shards, n, "prompts", f"in {gen.prompts}", align=gen.shards.chunk_size)
    if tl.teachers:
        if tl.corpus is not None:
            n, where = len(load_texts(tl.corpus)), f"in {tl.corpus}"
        else:
            n = counts["prompts"] * gen.runs[tl.generations].sampling.samples_per_prompt
            where = f"in generation run {tl.generations}"
        counts["corpus items"] = n
        _check_shards("teacher_logits", tl.shards, n, "items", where, align=tl.shards.chunk_size)
    an = cfg.analysis
    for name in (an.fluency_model, an.toxicity_model if an.toxicity_scorer == "hf" else None):
        if an.runs and name:
            check_source(cfg.models[name])
    pr = cfg.probes
    if pr.models:
        from shardwise.probes import check_split, group_split
        from shardwise.tables import load_labelled

        for name in pr.models:
            check_source(cfg.models[name])
            _check_layers(cfg, name)
        table = load_labelled(pr.data, list(pr.labels))
        counts["labelled rows"] = n = len(table)
        _check_shards("probes", pr.shards, n, "rows", f"in {pr.data}", align=pr.shards.chunk_size)
        y = table[list(pr.labels)].to_numpy()
        split = group_split(table["group"].tolist(), y, pr.val_fraction, pr.test_fraction, pr.seed)
        check_split(split, y, list(pr.labels), f"probes data file {pr.data}")
    return counts


def run_info(cfg: Config, stage: str, code: str) -> dict[str, Any]:
    """What run_info.json records besides the time: the resolved config, versions, code hash."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "stage": stage,
        "shardwise": __version__,
        "code_version": code,
        "python": platform.python_version(),
        "versions": versions,
        "config": cfg.resolved,
    }


def run_info_digest(cfg: Config, stage: str, code: str) -> str:
    """The rule param of a `*_run_info` rule: a short hash of what it writes, so that a changed
    config reruns it with a one-line reason instead of the whole config in the log."""
    from shardwise.fingerprint import stable_hash

    return stable_hash(run_info(cfg, stage, code))[:16]


def write_run_info(smk: Any) -> None:
    from shardwise.shards import atomic_write_json

    info = run_info(load_config(smk.config), smk.params.stage, smk.params.code)
    info.update(
        written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=socket.gethostname(),
        argv=sys.argv[:1],
        cwd=os.getcwd(),
    )
    atomic_write_json(Path(smk.output[0]), info)
