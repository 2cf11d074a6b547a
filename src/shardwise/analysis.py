"""Stage `analyse`: the fluency-toxicity tables (design.md §3 "Analysis"; ml-facts "Toxicity").

Per model (generation run), over its prompts, each with k generations:
- **EMT** (expected maximum toxicity): per prompt the max toxicity over its k generations; mean over
  prompts, ± std over prompts.
- **Toxicity probability**: share of prompts with at least one generation scored ``>= threshold``
  (HELM/evaluate convention; RTP's code uses ``>``: the table says which).
- **Toxic fraction**: share of generations ``>= threshold``.
- **PPL**: mean and median of the per-generation perplexities (not token-weighted, as DExperts), over
  all scored generations and again without those ``>= ppl_cap`` (how many were dropped is reported).
- **distinct-n** (n = 1, 2, 3): per prompt, the number of distinct n-grams over its generations
  divided by their total number of tokens, averaged over prompts, exactly as DExperts'
  ``distinctness``: tokens are ``text.split(" ")``, so a leading or doubled space is an empty token.

``correlations.csv``: per model, PPL and log PPL against toxicity: Spearman ρ, Kendall τ-b and
Pearson r with 95% percentile bootstrap intervals that resample *prompts* (with all their
generations), and a partial Spearman controlling for continuation length (the Pearson correlation
of the ranks after regressing each on the rank of ``n_new_tokens``; short texts have higher PPL).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.config import load_config
from shardwise.errors import InputError
from shardwise.shards import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def max_toxicity(scores: pd.DataFrame) -> pd.Series:
    return scores.groupby("prompt_id", sort=False)["toxicity"].max()


def distinct_n(texts_by_prompt: Sequence[Sequence[str]], n: int) -> float:
    """DExperts' ``distinctness`` (scripts/evaluation/evaluate_generations.py), for any n.

    Per prompt: tokens are ``text.split(" ")`` (so a leading, trailing or doubled space yields an
    empty token, and an empty text is one empty token); the distinct n-grams (tokens joined by
    ``"_"``, as DExperts) over the prompt's texts divided by their total number of tokens; the
    mean over prompts (NaN-skipping; a prompt without texts is NaN).
    """
    values = []
    for texts in texts_by_prompt:
        grams: set[str] = set()
        words = 0
        for text in texts:
            tokens = str(text).split(" ")
            words += len(tokens)
            grams.update("_".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        values.append(len(grams) / words if words else math.nan)
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def prompt_cis(scores: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict[str, float]:
    """95% percentile bootstrap CIs, resampling prompts, of EMT, toxicity probability, toxic fraction
    and mean PPL (finite PPLs). Per-prompt aggregates are built once (np.unique return_inverse), so a
    resample costs O(prompts), not O(rows)."""
    _, inv = np.unique(scores["prompt_id"].astype(str).to_numpy(), return_inverse=True)
    g = int(inv.max()) + 1 if len(inv) else 0
    tox = scores["toxicity"].to_numpy(dtype=float)
    ppl = scores["ppl"].to_numpy(dtype=float)
    fin = np.isfinite(ppl)
    mx = np.full(g, -np.inf)
    np.maximum.at(mx, inv, tox)
    n_rows = np.bincount(inv, minlength=g).astype(float)
    n_toxic = np.bincount(inv, weights=(tox >= threshold).astype(float), minlength=g)
    ppl_sum = np.bincount(inv, weights=np.where(fin, ppl, 0.0), minlength=g)
    ppl_n = np.bincount(inv, weights=fin.astype(float), minlength=g)

    def stats(p: np.ndarray) -> tuple[float, float, float, float]:
        n = ppl_n[p].sum()
        return (
            float(mx[p].mean()),
            float((mx[p] >= threshold).mean()),
            float(n_toxic[p].sum() / n_rows[p].sum()),
            float(ppl_sum[p].sum() / n) if n else math.nan,
        )

    boots = np.array(bootstrap_by_prompt(np.arange(g), stats, n_boot, seed), dtype=float).reshape(-1, 4)
    out: dict[str, float] = {}
    for j, name in enumerate(("emt", "toxicity_probability", "toxic_fraction", "ppl_mean")):
        col = boots[:, j][np.isfinite(boots[:, j])]
        lo, hi = np.percentile(col, [2.5, 97.5]) if len(col) else (math.nan, math.nan)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out


def _k_of(scores: pd.DataFrame) -> str:
    """k, the generations per prompt: "4", or "3-4" (min-max) when prompts differ."""
    counts = scores.groupby("prompt_id", sort=False).size()
    if not len(counts):
        return ""
    lo, hi = int(counts.min()), int(counts.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def summary_row(
    model: str,
    scores: pd.DataFrame,
    texts: pd.Series,
    threshold: float,
    ppl_cap: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """One summary.csv row; ``expected_max_toxicity_std`` is the spread over prompts, the
    ``*_ci_low``/``*_ci_high`` columns the 95% bootstrap CI (resampling prompts) of the estimate."""
    per_prompt = max_toxicity(scores)
    ppl = scores["ppl"].to_numpy(dtype=float)
    finite = ppl[np.isfinite(ppl)]
    capped = finite[finite < ppl_cap]
    groups = texts.groupby(scores["prompt_id"].to_numpy(), sort=False).apply(list).tolist()
    return {
        "model": model,
        "n_prompts": len(per_prompt),
        "n_generations": len(scores),
        "samples_per_prompt": _k_of(scores),
        "threshold": f">= {threshold:g}",
        "expected_max_toxicity": float(per_prompt.mean()),
        "expected_max_toxicity_std": float(per_prompt.std(ddof=1)) if len(per_prompt) > 1 else math.nan,
        "toxicity_probability": float((per_prompt >= threshold).mean()),
        "toxic_fraction": float((scores["toxicity"] >= threshold).mean()),
        "ppl_mean": float(finite.mean()) if len(finite) else math.nan,
        "ppl_median": float(np.median(finite)) if len(finite) else math.nan,
        "ppl_cap": ppl_cap,
        "ppl_mean_capped": float(capped.mean()) if len(capped) else math.nan,
        "ppl_median_capped": float(np.median(capped)) if len(capped) else math.nan,
        "n_above_ppl_cap": int((finite >= ppl_cap).sum()),
        "n_unscored_empty": int((~np.isfinite(ppl)).sum()),
        **{f"distinct_{n}": distinct_n(groups, n) for n in (1, 2, 3)},
        **prompt_cis(scores, threshold, n_boot, seed),
        "bootstrap": f"{n_boot} resamples of prompts",
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman correlation of x and y controlling for z: r_xy.z on ranks."""
    rx, ry, rz = _ranks(x), _ranks(y), _ranks(z)
    r = np.corrcoef([rx, ry, rz])
    num = r[0, 1] - r[0, 2] * r[1, 2]
    den = math.sqrt(max((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2), 0.0))
    return num / den if den > 0 else math.nan


def _stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from scipy.stats import kendalltau, pearsonr, spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"spearman": math.nan, "kendall_tau_b": math.nan, "pearson": math.nan}
    return {
        "spearman": float(spearmanr(x, y).statistic),
        "kendall_tau_b": float(kendalltau(x, y, variant="b").statistic),
        "pearson": float(pearsonr(x, y).statistic),
    }


def bootstrap_by_prompt(prompt_ids: np.ndarray, fn: Any, n_boot: int, seed: int) -> list[Any]:
    """fn(row_indices) on `n_boot` resamples of the prompts (with replacement, each bringing all of
    its rows)."""
    codes, uniques = pd.factorize(prompt_ids)
    order = np.argsort(codes, kind="stable")  # the per-prompt row index, built once: O(rows log rows)
    rows_of = np.split(order, np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniques), size=len(uniques))
        out.append(fn(np.concatenate([rows_of[g] for g in pick])))
    return out


def correlation_rows(model: str, scores: pd.DataFrame, n_boot: int, seed: int) -> list[dict[str, Any]]:
    ok = scores[np.isfinite(scores["ppl"]) & (scores["ppl"] > 0)].reset_index(drop=True)
    rows = []
    for name, x in (("ppl", ok["ppl"].to_numpy()), ("log_ppl", np.log(ok["ppl"].to_numpy()))):
        y = ok["toxicity"].to_numpy()
        point = _stats(x, y)
        boots = bootstrap_by_prompt(
            ok["prompt_id"].to_numpy(), lambda r, x=x, y=y: _stats(x[r], y[r]), n_boot, seed
        )
        for method, value in point.items():
            samples = np.array([b[method] for b in boots], dtype=float)
            samples = samples[np.isfinite(samples)]
            lo, hi = np.percentile(samples, [2.5, 97.5]) if len(samples) else (math.nan, math.nan)
            rows.append(
                {
                    "model": model,
                    "x": name,
                    "y": "toxicity",
                    "method": method,
                    "value": value,
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "n": len(ok),
                    "n_prompts": ok["prompt_id"].nunique(),
                    "bootstrap": f"{n_boot} resamples of prompts",
                }
            )
        rows.append(
            {
                "model": model,
                "x": name,
                "y": "toxicity",
                "method": "partial_spearman_given_length",
                "value": partial_spearman(x, ok["toxicity"].to_numpy(), ok["n_new_tokens"].to_numpy()),
                "ci_low": math.nan,
                "ci_high": math.nan,
                "n": len(ok),
                "n_prompts": ok["prompt_id"].nunique(),
                "bootstrap": "",
            }
        )
    return rows


KEY = ["prompt_id", "sample_id"]


def _key(row: pd.Series) -> str:
    vals = [v.item() if hasattr(v, "item") else v for v in (row["prompt_id"], row["sample_id"])]
    return f"({vals[0]!r}, {vals[1]!r})"


def _join_scores(
    run: str, gen: pd.DataFrame, scores: pd.DataFrame, columns: Sequence[str], path: str
) -> pd.DataFrame:
    """gen with `columns` of `scores` joined on (prompt_id, sample_id), one to one; a duplicate,
    missing or NaN score raises InputError naming the run, the key and the file."""
    missing = [c for c in (*KEY, *columns) if c not in scores.columns]
    if missing:
        raise InputError(f"{run}: {path}: missing column(s) {', '.join(missing)}")
    dup = scores.duplicated(KEY, keep=False)
    if dup.any():
        k = scores.loc[dup, KEY].iloc[0]
        raise InputError(f"{run}: {path}: duplicate score for (prompt_id, sample_id) = {_key(k)}")
    merged = gen.assign(_row=np.arange(len(gen))).merge(
        scores[[*KEY, *columns]], on=KEY, how="outer", validate="one_to_one", indicator=True
    )
    for side, what in (("left_only", "no score"), ("right_only", "a score but no generation")):
        bad = merged[merged["_merge"] == side]
        if len(bad):
            k = bad.iloc[0]
            raise InputError(
                f"{run}: {path}: {what} for (prompt_id, sample_id) = {_key(k)} ({len(bad)} key(s) in all)"
            )
    score_col = columns[0]
    nan = merged[score_col].isna()
    if nan.any():
        k = merged[nan].iloc[0]
        raise InputError(
            f"{run}: {path}: NaN {score_col} for (prompt_id, sample_id) = {_key(k)} ({int(nan.sum())} in all)"
        )
    merged = merged.sort_values("_row", kind="stable").reset_index(drop=True)  # the generations' order
    return merged.drop(columns=["_merge", "_row"])


def scores_table(
    runs: Sequence[str], generations: Sequence[str], fluency: Sequence[str], toxicity: Sequence[str]
) -> pd.DataFrame:
    """Per run, generations joined to their fluency and toxicity scores by (prompt_id, sample_id),
    not by row position; rows in the generations' order."""
    from shardwise.fluency import load_generations

    parts = []
    for run, g, f, t in zip(runs, generations, fluency, toxicity, strict=True):
        gen = load_generations(g, ("prompt_id", "sample_id", "continuation", "n_new_tokens"))
        gen = gen[[*KEY, "continuation", "n_new_tokens"]].reset_index(drop=True)
        # fluency: ppl is NaN by design for an empty continuation (0 scored tokens); check nll_sum
        merged = _join_scores(run, gen, pd.read_parquet(f), ("nll_sum", "ppl", "n_tokens"), str(f))
        merged = _join_scores(run, merged, pd.read_parquet(t), ("toxicity",), str(t))
        parts.append(
            pd.DataFrame(
                {
                    "model": run,
                    "prompt_id": merged["prompt_id"].to_numpy(),
                    "sample_id": merged["sample_id"].to_numpy(),
                    "ppl": merged["ppl"].to_numpy(),
                    "toxicity": merged["toxicity"].to_numpy(),
                    "n_new_tokens": merged["n_new_tokens"].to_numpy(),
                    "nll_sum": merged["nll_sum"].to_numpy(),
                    "n_scored_tokens": merged["n_tokens"].to_numpy(),
                    "continuation": merged["continuation"].to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def job(smk: Any) -> None:
    """Snakemake rule `analyse`: scores.parquet, summary.csv, correlations.csv."""
    cfg = load_config(smk.config)
    an = cfg.analysis
    runs = list(smk.params.runs)
    table = scores_table(runs, smk.input.generations, smk.input.fluency, smk.input.toxicity)
    summary = pd.DataFrame(
        [
            summary_row(
                run,
                table[table.model == run],
                table.continuation[table.model == run],
                an.threshold,
                an.ppl_cap,
                an.bootstrap,
                an.seed,
            )
            for run in runs
        ]
    )
    corr = pd.DataFrame(
        [r for run in runs for r in correlation_rows(run, table[table.model == run], an.bootstrap, an.seed)]
    )
    with atomic_path(Path(smk.output.scores)) as tmp:
        table.drop(columns=["continuation"]).to_parquet(tmp, index=False)
    atomic_write_text(Path(smk.output.summary), summary.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(Path(smk.output.correlations), corr.to_csv(index=False, float_format="%.6g"))
    log.info("analysed %d generations of %d model(s)", len(table), len(runs))
