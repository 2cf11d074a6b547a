"""Stage `toxicity_probe_data`: the probe set ``toxicity`` (docs/design.md §3 "Probes"): the analysed
generations' continuations, labelled toxic or not by their own toxicity score, written to
``results/probes/toxicity/data.parquet`` and checked for a usable split before any activation is
computed (the probes themselves are :mod:`shardwise.probes`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.atomic import atomic_path
from shardwise.config import load_config
from shardwise.errors import InputError
from shardwise.splits import check_split, group_split
from shardwise.tables import load_generations

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("numpy", "pandas")


def toxicity_table(
    runs: Sequence[str], generations: Sequence[str | Path], toxicity: Sequence[str | Path], threshold: float
) -> pd.DataFrame:
    """The analysed generations as a probes table (probe set ``toxicity``): one row per non-blank
    continuation of every run - id, text (the continuation, which is what was scored), group (the
    prompt id: a prompt's generations of every run stay on one side of the split), toxic
    (score >= threshold), run, prompt_id, sample_id, toxicity."""
    keys = ["prompt_id", "sample_id"]
    parts = []
    for run, gen_path, tox_path in zip(runs, generations, toxicity, strict=True):
        gen = load_generations(gen_path, (*keys, "continuation"))[[*keys, "continuation"]]
        scored = gen.merge(pd.read_parquet(tox_path)[[*keys, "toxicity"]], on=keys, validate="one_to_one")
        if len(scored) != len(gen):
            raise InputError(f"toxicity scores {tox_path}: do not cover the generations of {gen_path}")
        parts.append(scored.assign(run=run))
    table = pd.concat(parts, ignore_index=True)
    table = table[table.continuation.str.strip() != ""].reset_index(drop=True)
    return pd.DataFrame(
        {
            "id": np.arange(len(table)),
            "text": table.continuation,
            "group": table.prompt_id.astype(str),
            "toxic": (table.toxicity >= threshold).astype("int64"),
            "run": table.run,
            "prompt_id": table.prompt_id,
            "sample_id": table.sample_id,
            "toxicity": table.toxicity,
        }
    )


def balanced_sample(table: pd.DataFrame, cap: int, seed: int, label: str = "toxic") -> pd.DataFrame:
    """At most `cap` rows of a two-class table: up to half of each class (all of a class that has
    fewer, the rest of the budget from the other), taken prompt by prompt (`group`) in a seeded
    random order of the prompts, so a prompt's rows of a class are kept together. Row order and ids
    are kept. O(rows log rows)."""
    if len(table) <= cap:
        return table
    groups = table["group"].to_numpy()
    uniques, codes = np.unique(groups, return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(uniques))[codes]
    y = table[label].to_numpy()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    q_pos = min(n_pos, max(cap // 2, cap - n_neg))
    quota = {1: q_pos, 0: min(n_neg, cap - q_pos)}
    order = np.lexsort((np.arange(len(y)), rank))  # prompts in the seeded order, rows in table order
    keep = np.zeros(len(y), dtype=bool)
    for cls, q in quota.items():
        rows = order[y[order] == cls]
        keep[rows[:q]] = True
    return table[keep]


def build(smk: Any) -> None:
    """Snakemake rule `toxicity_probe_data`: the probe set ``toxicity``, checked for a usable split
    before any activation is computed."""
    cfg = load_config(smk.config)
    an, pr = cfg.analysis, cfg.probe_sets()["toxicity"]
    table = toxicity_table(an.runs, smk.input.generations, smk.input.toxicity, an.toxicity.threshold)
    n_all = len(table)
    table = balanced_sample(table, pr.toxicity_rows, pr.seed)
    if len(table) < n_all:
        log.info("probes.toxicity_rows: %d of %d generations, class-balanced by prompt", len(table), n_all)
    y = table[["toxic"]].to_numpy()
    where = (
        f"probes.toxicity: {int(y.sum())} of {len(y)} generations are toxic (>= {an.toxicity.threshold:g}, "
        f"{', '.join(an.runs)})"
    )
    hint = "more prompts or samples, or set probes.toxicity: false"
    if not 0 < y.sum() < len(y):
        raise InputError(f"{where}: a probe needs both classes ({hint})")
    split = group_split(table["group"].tolist(), y, pr.val_fraction, pr.test_fraction, pr.seed)
    check_split(split, y, ["toxic"], where, hint)
    with atomic_path(Path(smk.output[0])) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("%s; %d prompts", where, table["group"].nunique())
