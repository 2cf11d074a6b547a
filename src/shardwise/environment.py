"""The process environment every job inherits (a leaf module: it imports nothing of shardwise)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def export_package_path() -> None:
    """Put the directory this shardwise was imported from first on PYTHONPATH (for jobs)."""
    here = str(Path(__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *rest])


def jobs_offline() -> None:
    """Jobs never download: HF_HUB_OFFLINE=1 for every job (prepare_model alone lifts it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def redirect_output(path: Path, append: bool) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so also what C code and
    child processes write) and the logging module to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = os.O_APPEND if append else os.O_TRUNC
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
