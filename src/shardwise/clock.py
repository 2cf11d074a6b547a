"""Time spent inside a model's forward passes, for the rehearsal's per-item cost of the pipeline
outside the model (bench/rehearsal.py). Opt-in: SHARDWISE_TIME_FORWARD=1 (a leaf module)."""

from __future__ import annotations

import os
import time
from typing import Any

_FORWARD = {"seconds": 0.0, "calls": 0}


def enabled() -> bool:
    return os.environ.get("SHARDWISE_TIME_FORWARD") == "1"


def time_forward(model: Any) -> None:
    """Count the wall time of every forward pass of `model` (on CUDA, synchronised at both ends,
    which costs a little: hence opt-in). No-op unless enabled."""
    if not enabled():
        return
    import torch

    cuda = any(p.is_cuda for p in model.parameters())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    starts: list[float] = []

    def before(module: Any, args: Any) -> None:
        sync()
        starts.append(time.perf_counter())

    def after(module: Any, args: Any, output: Any) -> None:
        sync()
        _FORWARD["seconds"] += time.perf_counter() - starts.pop()
        _FORWARD["calls"] += 1

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)


def forward_seconds() -> float | None:
    """Seconds inside timed forward passes so far in this process; None when not enabled."""
    return _FORWARD["seconds"] if enabled() else None
