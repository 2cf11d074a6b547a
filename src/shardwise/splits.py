"""Train/validation/test splits by group, shared by the probes and the toxicity probe set's checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shardwise.errors import InputError

SPLITS = ("train", "val", "test")


def group_split(
    groups: Sequence[Any], y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """0/1/2 (train/val/test) per row. Whole groups are assigned, larger first then in a seeded
    random order, each to the split where it brings the rows and every label's positives and
    negatives closest to the target fractions (greedy iterative stratification)."""
    _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = inverse.max() + 1
    rows = np.bincount(inverse, minlength=n_groups).astype(float)
    pos = np.stack([np.bincount(inverse, weights=y[:, k], minlength=n_groups) for k in range(y.shape[1])], 1)
    neg = rows[:, None] - pos
    target = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    totals = [rows.sum(), pos.sum(0).clip(min=1), neg.sum(0).clip(min=1)]
    have = [np.zeros(3), np.zeros((3, y.shape[1])), np.zeros((3, y.shape[1]))]
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(n_groups), key=lambda g: -rows[g])
    assign = np.zeros(n_groups, dtype=np.int64)
    for g in order:
        cost = np.zeros(3)
        for s in range(3):
            r = have[0].copy()
            r[s] += rows[g]
            p, q = have[1].copy(), have[2].copy()
            p[s] += pos[g]
            q[s] += neg[g]
            cost[s] = (
                ((r / totals[0] - target) ** 2).sum()
                + ((p / totals[1] - target[:, None]) ** 2).mean(1).sum()
                + ((q / totals[2] - target[:, None]) ** 2).mean(1).sum()
            )
        s = int(np.argmin(cost))
        assign[g] = s
        have[0][s] += rows[g]
        have[1][s] += pos[g]
        have[2][s] += neg[g]
    return assign[inverse]


def check_split(
    split: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    where: str,
    hint: str = "add rows, or groups, or change val/test_fraction",
) -> None:
    for s, name in enumerate(SPLITS):
        for k, label in enumerate(labels):
            classes = set(np.unique(y[split == s, k]).tolist())
            if classes != {0, 1}:
                raise InputError(
                    f"{where}: {len(y)} rows are fewer than the splits need: the {name} split has "
                    f"{'no' if not classes else 'only class ' + str(classes.pop()) + ' and no other'} rows "
                    f"of label {label!r} ({hint})"
                )
