"""The process environment every job inherits (a leaf module: it imports nothing of shardwise)."""

from __future__ import annotations

import os
from pathlib import Path


def export_package_path() -> None:
    """Put the directory this shardwise was imported from first on PYTHONPATH (for jobs)."""
    here = str(Path(__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *rest])


def jobs_offline() -> None:
    """Jobs never download: HF_HUB_OFFLINE=1 for every job (prepare_model alone lifts it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
