"""Time spent inside a model's forward passes, for the rehearsal's per-item cost of the pipeline
outside the model (bench/rehearsal.py). Opt-in: SHARDWISE_TIME_FORWARD=1 (a leaf module)."""

from __future__ import annotations

import os
import time
from typing import Any

_FORWARD = {"seconds": 0.0, "calls": 0, "depth": 0}


def enabled() -> bool:
    return os.environ.get("SHARDWISE_TIME_FORWARD") == "1"


def time_forward(model: Any) -> None:
    """Count the wall time of every forward pass of `model`: of the model itself and of the parts
    stages call on their own (the base model: teacher logits and activations; the LM head: teacher
    logits), a pass inside a timed pass counted once. On CUDA, synchronised at both ends, which
    costs a little: hence opt-in. No-op unless enabled."""
    if not enabled():
        return
    import torch

    cuda = any(p.is_cuda for p in model.parameters())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = [model, getattr(model, "base_model", None), head]
    for module in dict.fromkeys(m for m in modules if m is not None):  # distinct, in order
        _time(module, sync)


def _time(module: Any, sync: Any) -> None:
    forward = module.forward

    def timed(*args: Any, **kwargs: Any) -> Any:  # try/finally: a pass a hook ends early counts too
        if _FORWARD["depth"]:  # inside a timed pass: counted there
            return forward(*args, **kwargs)
        sync()
        started = time.perf_counter()
        _FORWARD["depth"] += 1
        try:
            return forward(*args, **kwargs)
        finally:
            _FORWARD["depth"] -= 1
            sync()
            _FORWARD["seconds"] += time.perf_counter() - started
            _FORWARD["calls"] += 1

    module.forward = timed


def forward_seconds() -> float | None:
    """Seconds inside timed forward passes so far in this process; None when not enabled."""
    return _FORWARD["seconds"] if enabled() else None
