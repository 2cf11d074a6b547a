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


def available_memory(device: str = "cpu") -> int:
    """Bytes this process can still allocate on `device`: a CUDA device's free memory, or on the CPU
    the smaller of the machine's MemAvailable and what the job's memory cgroup (SLURM's --mem) leaves."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        cgroup = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().split("::", 1)[
            1
        ].strip().lstrip("/")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, IndexError, ValueError):
        pass
    return free if free is not None else 8 * 2**30
