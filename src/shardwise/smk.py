"""Glue between Snakemake and the package: rule-script entry, parse-time setup, run info."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shardwise import __version__
from shardwise.config import Config, load_config
from shardwise.environment import redirect_output
from shardwise.errors import ShardwiseError, recurs
from shardwise.fingerprint import library_versions

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


def fail(message: str) -> None:
    """One line on stderr, exit status 1: how every bad input ends."""
    print(f"shardwise: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def no_retry_path(log_file: str | Path) -> Path:
    """Where a job that failed for good says so: next to its log (the head reads it, retries.py)."""
    return Path(f"{log_file}.no-retry.json")


def rule_main(smk: Any, fn: Callable[[Any], None]) -> None:
    """Run a rule's package function with stdout/stderr (fd level) and logging in the rule's log.

    A failure that a rerun meets again (errors.recurs: bad config or input, a model that cannot
    load, data of the wrong type, CUDA out of memory at the same batch size) leaves
    <log>.no-retry.json with its one-line cause: the Snakemake head then does not retry the job."""
    # appended, one header per attempt: a retry keeps the failed attempt's log above its own
    log_file = Path(smk.log[0])
    redirect_output(log_file, append=True)
    no_retry_path(log_file).unlink(missing_ok=True)  # a former run's verdict
    slurm = os.environ.get("SLURM_JOB_ID")
    where = f"host {socket.gethostname()}, pid {os.getpid()}" + (f", SLURM job {slurm}" if slurm else "")
    log.info(
        "==== rule %s, %s, %s ====", getattr(smk, "rule", "?"), where, time.strftime("%Y-%m-%d %H:%M:%S")
    )
    try:
        fn(smk)
        if hasattr(smk.output, "run_info"):
            write_run_info(smk)
    except BaseException as exc:
        if recurs(exc):
            cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
            no_retry_path(log_file).write_text(json.dumps({"cause": cause, "slurm_job_id": slurm}) + "\n")
        if isinstance(exc, ShardwiseError):
            log.error("%s", exc)
            fail(str(exc))
        raise


def workflow_config(config: dict[str, Any], configfiles: Iterable[str | Path]) -> Config:
    """Validate the Snakemake config at parse time; on error print one line and exit 1."""
    source = ", ".join(str(f) for f in configfiles) or "config"
    try:
        return load_config(config, source=source)
    except ShardwiseError as exc:
        fail(str(exc))
        raise  # unreachable; for type checkers


def as_param(obj: Any) -> str:
    """A rule param from a settings dict or list: canonical JSON (sorted keys, no spaces), so that
    equal settings give equal params and a change shows in Snakemake's reason in one short line."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_info(cfg: Config, stage: str, code: str, settings: Any = None) -> dict[str, Any]:
    """What a run_info.json records besides the time: the settings the output depends on
    (shardwise.settings), the code version, package versions, and the whole resolved config of the
    run that wrote it (keys outside `settings` may have changed since without rerunning it)."""
    versions = library_versions(PACKAGES)
    return {
        "stage": stage,
        "shardwise": __version__,
        "code_version": code,
        "settings": settings,
        "python": platform.python_version(),
        "versions": versions,
        "config": cfg.resolved,
    }


def write_run_info(smk: Any) -> None:
    """The rule's `run_info` output, written after its other outputs."""
    from shardwise.atomic import atomic_write_json

    settings = json.loads(smk.params.settings) if hasattr(smk.params, "settings") else None
    info = run_info(load_config(smk.config), smk.rule, smk.params.code, settings)
    info.update(
        written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        host=socket.gethostname(),
        argv=sys.argv[:1],
        cwd=os.getcwd(),
    )
    atomic_write_json(Path(smk.output.run_info), info)
