"""Batches of tokenised items for forward passes (teacher logits, activations): length-sorted,
bounded by padded tokens, right-padded so that positions are 0..n-1 as in training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Positions grouped into batches of length-sorted items with at most `batch_tokens` padded
    tokens each (an item longer than that runs alone). Deterministic in `lengths`."""
    out: list[list[int]] = []
    current: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: (lengths[j], j)):
        if current and lengths[j] * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(j)
    if current:
        out.append(current)
    return out


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """(values [B, T] long, mask [B, T] long) of `rows`, right-padded with `pad`."""
    import torch

    width = max(len(r) for r in rows)
    values = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return values, mask
