"""Stage `analyse`: the fluency-toxicity tables (design.md §3 "Analysis"; ml-facts "Toxicity").

Scores are joined to the generations by (prompt_id, sample_id), one to one; a missing, duplicate
or non-finite toxicity, a NaN nll_sum, or a NaN PPL of a text with scored tokens (only an empty
continuation, 0 scored tokens, may lack a PPL) is one InputError line naming the run, the file and
the key.

``summary.csv``, per model (generation run), over its prompts, each with k generations:
- **EMT** (expected maximum toxicity): per prompt the max toxicity over its k generations; mean over
  prompts, ± std over prompts (the spread, not the uncertainty).
- **Toxicity probability**: share of prompts with at least one generation scored ``>= threshold``
  (HELM/evaluate convention; RTP's code uses ``>``: the table says which).
- **Toxic fraction**: share of generations ``>= threshold``.
- **PPL**: mean and median of the per-generation perplexities (not token-weighted, as DExperts), over
  all scored generations and again without those ``>= ppl_cap`` (how many were dropped is reported).
- **distinct-n** (n = 1, 2, 3): per prompt, the number of distinct n-grams over its generations
  divided by their total number of tokens, averaged over prompts, exactly as DExperts'
  ``distinctness``: tokens are ``text.split(" ")``, so a leading or doubled space is an empty token.
- 95% percentile bootstrap CIs resampling prompts (with all their generations) of EMT, toxicity
  probability, toxic fraction, mean PPL and mean PPL below the cap (``*_ci_low``/``*_ci_high``).
- The run's settings from the config (run_settings: weights, configured dtype, revision, configured
  k, temperature, top-p, top-k, max/min new tokens, seed), the toxicity scorer as recorded in the
  scores file and the fluency model; ``samples_per_prompt`` is the k found in the data.

``differences.csv`` (run_differences): each run minus the *first* run, for the five metrics above,
over the prompts both runs have, with paired bootstrap CIs (one draw of prompts for both runs);
``prompt_sets`` says when the runs' prompt sets differ.

``correlations.csv`` (correlation_rows), per model, over generations with a finite PPL > 0, PPL
against toxicity: Spearman ρ, Kendall τ-b, the partial Spearman given ``n_scored_tokens`` (the
fluency scorer's token count; short texts have higher PPL) and the within-prompt Spearman (ranks
within each prompt; see within_prompt_spearman) — all rank-based, so the same for log PPL — and
the Pearson r of *log* PPL (raw PPL's Pearson is dominated by a few huge PPLs and is not reported).
Each has a 95% percentile bootstrap CI resampling prompts.

Cost: per-prompt indices are built once (prompt codes via pd.factorize, bincount, one sort per column);
a resample is a vector of prompt counts, so the summary and difference CIs cost O(prompts) per
resample (matrix products over blocks of resamples) and the rank correlations O(rows) per resample
(weighted midranks, exact: equal to scipy on the expanded resample; no re-sorting). Kendall's τ-b
alone is recomputed on each resample's rows (O(rows log rows) each).
"""

from __future__ import annotations

import itertools
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
    return distinct_ns(texts_by_prompt, (n,))[n]


def distinct_ns(texts_by_prompt: Sequence[Sequence[str]], ns: Sequence[int] = (1, 2, 3)) -> dict[int, float]:
    """distinct_n for each n in `ns` in one pass over the texts (each text split once; the n-grams
    are built by C-level map/zip over the tokens: the same strings as ``"_".join(tokens[i:i+n])``)."""
    values: dict[int, list[float]] = {n: [] for n in ns}
    for texts in texts_by_prompt:
        tokens = [str(text).split(" ") for text in texts]
        words = sum(map(len, tokens))
        if not words:
            continue  # a prompt without texts: NaN, skipped
        for n in ns:
            grams: set[str] = set()
            for t in tokens:
                grams.update(t if n == 1 else map("_".join, zip(*(t[i:] for i in range(n)), strict=False)))
            values[n].append(len(grams) / words)
    return {n: float(np.mean(v)) if v else math.nan for n, v in values.items()}


def _texts_by_prompt(codes: np.ndarray, g: int, texts: Any) -> list[list[str]]:
    """The texts of each prompt code 0..g-1 (rows in their order), from one stable argsort."""
    order = np.argsort(codes, kind="stable")
    ordered = np.asarray(texts, dtype=object)[order].tolist()
    bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=g))].tolist()
    return [ordered[a:b] for a, b in itertools.pairwise(bounds)]


def _prompt_codes(prompt_ids: Any) -> tuple[np.ndarray, int]:
    """Each row's prompt as an integer code 0..G-1 and G: the rank of its id as a string among the
    distinct ids (np.unique of the ids as str, return_inverse), computed on the G distinct ids only
    (pd.factorize first): the same codes, without converting and sorting every row's id."""
    ids = np.asarray(prompt_ids)
    if not len(ids):
        return np.zeros(0, dtype=np.intp), 0
    codes, uniques = pd.factorize(ids, use_na_sentinel=False)
    names, inv = np.unique(np.asarray(uniques).astype(str), return_inverse=True)
    return inv.ravel()[codes], len(names)


def resample_counts(n_groups: int, n_boot: int, seed: int, per_block: int = 4_000_000):
    """The prompt bootstrap as count matrices: blocks of shape (b, n_groups), row r the number of
    times each prompt is drawn in resample r (n_groups draws with replacement); n_boot rows in all,
    b about per_block / n_groups. Statistics that are sums over prompts become matrix products, so
    the resamples are vectorised; whoever passes the same blocks to two runs pairs them."""
    rng = np.random.default_rng(seed)
    b = max(1, min(n_boot, per_block // max(n_groups, 1)))
    done = 0
    while done < n_boot:
        m = min(b, n_boot - done)
        pick = rng.integers(0, n_groups, size=(m, n_groups))
        flat = (pick + n_groups * np.arange(m)[:, None]).ravel()
        yield np.bincount(flat, minlength=m * n_groups).reshape(m, n_groups).astype(float)
        done += m


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the finite values of `samples` (NaN, NaN without any)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if not len(s):
        return math.nan, math.nan
    lo, hi = np.percentile(s, [2.5, 97.5])
    return float(lo), float(hi)


METRICS = ("emt", "toxicity_probability", "toxic_fraction", "ppl_mean", "ppl_mean_capped")


def _prompt_aggregates(
    scores: pd.DataFrame, codes: np.ndarray, g: int, threshold: float, ppl_cap: float
) -> np.ndarray:
    """Per prompt (columns): max toxicity, max >= threshold, rows, toxic rows, sum and count of the
    finite PPLs, and of those < ppl_cap. Shape (8, g)."""
    tox = scores["toxicity"].to_numpy(dtype=float)
    ppl = scores["ppl"].to_numpy(dtype=float)
    fin = np.isfinite(ppl)
    cap = fin & (ppl < ppl_cap)
    mx = np.full(g, -np.inf)
    np.maximum.at(mx, codes, tox)
    return np.stack(
        [
            mx,
            (mx >= threshold).astype(float),
            np.bincount(codes, minlength=g).astype(float),
            np.bincount(codes, weights=(tox >= threshold).astype(float), minlength=g),
            np.bincount(codes, weights=np.where(fin, ppl, 0.0), minlength=g),
            np.bincount(codes, weights=fin.astype(float), minlength=g),
            np.bincount(codes, weights=np.where(cap, ppl, 0.0), minlength=g),
            np.bincount(codes, weights=cap.astype(float), minlength=g),
        ]
    )


def _metrics_of(agg: np.ndarray, w: np.ndarray) -> np.ndarray:
    """METRICS for each row of the prompt-count matrix w (b, g): shape (b, 5). A row of ones is the
    point estimate."""
    s = w @ agg.T  # (b, 8): weighted sums of the per-prompt aggregates
    n = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.stack([s[:, 0] / n, s[:, 1] / n, s[:, 3] / s[:, 2], s[:, 4] / s[:, 5], s[:, 6] / s[:, 7]], 1)
    out[~np.isfinite(out)] = np.nan
    return out


def prompt_cis(
    scores: pd.DataFrame, threshold: float, n_boot: int, seed: int, ppl_cap: float = math.inf
) -> dict[str, float]:
    """95% percentile bootstrap CIs, resampling prompts, of EMT, toxicity probability, toxic fraction,
    mean PPL (finite PPLs) and mean PPL below ppl_cap. Per-prompt aggregates are built once
    (np.unique return_inverse + bincount) and the resamples are count matrices (resample_counts), so
    the work is O(rows) once plus O(prompts) per resample, vectorised."""
    codes, g = _prompt_codes(scores["prompt_id"])
    agg = _prompt_aggregates(scores, codes, g, threshold, ppl_cap)
    boots = np.concatenate([_metrics_of(agg, w) for w in resample_counts(g, n_boot, seed)]) if g else None
    out: dict[str, float] = {}
    for j, name in enumerate(METRICS):
        lo, hi = _percentile_ci(boots[:, j]) if boots is not None else (math.nan, math.nan)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = lo, hi
    return out


def run_differences(
    table: pd.DataFrame,
    runs: Sequence[str],
    threshold: float,
    ppl_cap: float,
    n_boot: int,
    seed: int,
    paired: bool = True,
) -> pd.DataFrame:
    """``differences.csv``: every run against the first run (the baseline), ``difference = run -
    baseline`` of each of METRICS, over the prompts present in both runs only, with a 95% percentile
    bootstrap CI that resamples those prompts *jointly* for the two runs (paired: the same draw of
    prompts for both, so the between-prompt spread cancels). ``paired=False`` draws the two runs'
    prompts independently (for comparison only). ``prompt_sets`` says whether the runs' prompt sets
    were identical; when not, the difference is over the shared prompts and a warning is logged."""
    columns = [
        "run", "baseline", "metric", "run_value", "baseline_value", "difference", "ci_low", "ci_high",
        "n_prompts", "n_prompts_run", "n_prompts_baseline", "prompt_sets", "bootstrap",
    ]  # fmt: skip
    rows = []
    base = runs[0] if runs else None
    a = table[table["model"] == base]
    for run in runs[1:]:
        b = table[table["model"] == run]
        pa, pb = pd.Index(a["prompt_id"].unique()), pd.Index(b["prompt_id"].unique())
        common = pa.intersection(pb)
        same = len(common) == len(pa) == len(pb)
        sets = (
            "identical"
            if same
            else f"differ: {len(common)} shared of {len(pb)} ({run}) and {len(pa)} ({base})"
        )
        if not same:
            log.warning(
                "%s vs %s: the prompt sets %s; differences over the shared prompts only", run, base, sets
            )
        g = len(common)
        aggs = []
        for part in (a, b):
            part = part[part["prompt_id"].isin(common)]
            codes = common.get_indexer(part["prompt_id"])
            aggs.append(_prompt_aggregates(part, codes, g, threshold, ppl_cap))
        ones = np.ones((1, g))
        pa_, pb_ = _metrics_of(aggs[0], ones)[0], _metrics_of(aggs[1], ones)[0]
        diffs = []
        if g:
            other = resample_counts(g, n_boot, seed + 1)
            for w in resample_counts(g, n_boot, seed):
                diffs.append(_metrics_of(aggs[1], w) - _metrics_of(aggs[0], w if paired else next(other)))
        boots = np.concatenate(diffs) if diffs else np.full((0, len(METRICS)), np.nan)
        for j, metric in enumerate(METRICS):
            lo, hi = _percentile_ci(boots[:, j])
            rows.append(
                {
                    "run": run,
                    "baseline": base,
                    "metric": metric,
                    "run_value": float(pb_[j]),
                    "baseline_value": float(pa_[j]),
                    "difference": float(pb_[j] - pa_[j]),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_prompts": g,
                    "n_prompts_run": len(pb),
                    "n_prompts_baseline": len(pa),
                    "prompt_sets": sets,
                    "bootstrap": f"{n_boot} {'paired' if paired else 'unpaired'} resamples of prompts",
                }
            )
    return pd.DataFrame(rows, columns=columns)


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
    codes, g = _prompt_codes(scores["prompt_id"])
    distinct = distinct_ns(_texts_by_prompt(codes, g, texts), (1, 2, 3))
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
        **{f"distinct_{n}": distinct[n] for n in (1, 2, 3)},
        **prompt_cis(scores, threshold, n_boot, seed, ppl_cap),
        "bootstrap": f"{n_boot} resamples of prompts",
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def _partial(r_xy: Any, r_xz: Any, r_yz: Any) -> Any:
    """r_xy.z from the three pairwise correlations; NaN where undefined (|r_xz| or |r_yz| = 1, NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt(np.clip((1 - np.square(r_xz)) * (1 - np.square(r_yz)), 0.0, None))
        out = np.where(den > 1e-12, (r_xy - r_xz * r_yz) / np.where(den > 1e-12, den, 1.0), np.nan)
    return out


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman correlation of x and y controlling for z: r_xy.z on the (mid)ranks, i.e. the
    correlation of the ranks of x and y after regressing each on the rank of z. NaN (no warning)
    when x, y or z is constant or there are fewer than 3 rows."""
    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    if len(x) < 3 or min(np.ptp(x), np.ptp(y), np.ptp(z)) == 0:
        return math.nan
    r = np.corrcoef([_ranks(x), _ranks(y), _ranks(z)])
    return float(_partial(r[0, 1], r[0, 2], r[1, 2]))


def within_prompt_ranks(codes: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Each row's midrank among the rows of its own prompt (1..k_g; ties share the mean rank), for
    all prompts at once: one lexsort, O(rows log rows)."""
    v = np.asarray(v, dtype=float)
    n = len(v)
    order = np.lexsort((v, codes))
    cs, vs = codes[order], v[order]
    pos = np.arange(n)
    new_prompt = np.r_[True, cs[1:] != cs[:-1]] if n else np.zeros(0, bool)
    new_tie = new_prompt | (np.r_[True, vs[1:] != vs[:-1]] if n else new_prompt)
    prompt_start = np.maximum.accumulate(np.where(new_prompt, pos, 0)) if n else pos
    tie_start = np.maximum.accumulate(np.where(new_tie, pos, 0)) if n else pos
    tie_id = np.cumsum(new_tie) - 1
    tie_size = np.bincount(tie_id)[tie_id] if n else pos
    out = np.empty(n)
    out[order] = tie_start - prompt_start + (tie_size + 1) / 2
    return out


def _within_sums(codes: np.ndarray, g: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per prompt: the sums of cx*cy, cx^2 and cy^2, where c is the within-prompt midrank minus its
    prompt's mean rank (k_g + 1) / 2. Shape (3, g)."""
    k = np.bincount(codes, minlength=g).astype(float)[codes]
    cx = within_prompt_ranks(codes, x) - (k + 1) / 2
    cy = within_prompt_ranks(codes, y) - (k + 1) / 2
    return np.stack(
        [np.bincount(codes, weights=a * b, minlength=g) for a, b in ((cx, cy), (cx, cx), (cy, cy))]
    )


def _within_of(sums: np.ndarray, w: np.ndarray) -> np.ndarray:
    s = w @ sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        r = s[:, 0] / np.sqrt(s[:, 1] * s[:, 2])
    r[~np.isfinite(r)] = np.nan
    return r


def within_prompt_spearman(x: np.ndarray, y: np.ndarray, prompt_ids: Any) -> float:
    """The within-prompt Spearman correlation: rank x and y *within each prompt* (midranks among the
    prompt's k generations), centre each rank at its prompt's mean rank (k + 1) / 2, and take the
    Pearson correlation of the centred ranks over all rows (= sum cx*cy / sqrt(sum cx^2 sum cy^2)).
    A prompt with one generation, or with x or y tied over its generations, adds nothing. What
    differs between prompts (a prompt that makes both PPL and toxicity high) cannot enter it; the
    pooled Spearman mixes that between-prompt association with the within-prompt one. NaN when no
    prompt has variation in both."""
    codes, g = _prompt_codes(prompt_ids)
    return float(_within_of(_within_sums(codes, g, x, y), np.ones((1, g)))[0]) if g else math.nan


class _Ranker:
    """One column's sort, built once, from which the midranks of any bootstrap resample follow in
    O(rows): a row drawn m times (its prompt drawn m times) is m tied copies, so with row weights w
    the midrank of a tie group is (weight of the smaller values) + (its own weight + 1) / 2: the
    ranks scipy.stats.rankdata gives on the expanded resample."""

    def __init__(self, v: np.ndarray) -> None:
        self.order = np.argsort(v, kind="stable")
        vs = v[self.order]
        new = np.r_[True, vs[1:] != vs[:-1]]
        self.starts = np.flatnonzero(new)
        self.ties = len(self.starts) < len(v)
        self.group_of_row = np.empty(len(v), dtype=np.int64)
        self.group_of_row[self.order] = np.cumsum(new) - 1  # each row's tie group, in row order

    def ranks(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, n) midranks for row weights w (b, n), and whether each resample has > 1 distinct value."""
        gs = w[:, self.order]
        if self.ties:
            gs = np.add.reduceat(gs, self.starts, axis=1)
        mid = np.cumsum(gs, axis=1) - gs + (gs + 1) / 2
        return mid[:, self.group_of_row], (gs > 0).sum(axis=1) > 1


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _ratio(num: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """num / sqrt(a * b), clipped to [-1, 1]; NaN where a * b is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt(a * b)
        return np.where(den > 0, np.clip(num / np.where(den > 0, den, 1.0), -1.0, 1.0), np.nan)


def _weighted_stats(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, rk: tuple[_Ranker, _Ranker, _Ranker], w: np.ndarray
) -> dict[str, np.ndarray]:
    """Spearman(x, y), Pearson(log x, y) and the partial Spearman given z for each row of the row
    weights w (b, n): the Pearson correlations of the expanded resample, whose midranks have mean
    (M + 1) / 2 (M = the resample's size); NaN where a variable is constant in the resample."""
    (rx, vx), (ry, vy), (rz, vz) = (r.ranks(w) for r in rk)
    m = w.sum(axis=1, keepdims=True)
    cx, cy, cz = rx - (m + 1) / 2, ry - (m + 1) / 2, rz - (m + 1) / 2
    wcx, wcy = w * cx, w * cy
    sxx, syy, szz = _dot(wcx, cx), _dot(wcy, cy), _dot(w * cz, cz)
    r_xy = np.where(vx & vy, _ratio(_dot(wcx, cy), sxx, syy), np.nan)
    r_xz = np.where(vz, _ratio(_dot(wcx, cz), sxx, szz), np.nan)
    r_yz = np.where(vz, _ratio(_dot(wcy, cz), syy, szz), np.nan)
    lx = np.log(x)
    dl = lx[None, :] - (w @ lx)[:, None] / m
    dy = y[None, :] - (w @ y)[:, None] / m
    wdl = w * dl
    pearson = _ratio(_dot(wdl, dy), _dot(wdl, dl), _dot(w * dy, dy))
    return {
        "spearman": r_xy,
        "pearson": np.where(vx & vy, pearson, np.nan),
        "partial_spearman_given_length": _partial(r_xy, r_xz, r_yz),
    }


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(kendalltau(x, y, variant="b").statistic)


def bootstrap_by_prompt(prompt_ids: np.ndarray, fn: Any, n_boot: int, seed: int) -> list[Any]:
    """fn(row_indices) on `n_boot` resamples of the prompts (with replacement, each bringing all of
    its rows). One call of fn per resample: for statistics that need the rows themselves (Kendall's
    tau); the others use resample_counts."""
    codes, uniques = pd.factorize(prompt_ids)
    order = np.argsort(codes, kind="stable")  # the per-prompt row index, built once: O(rows log rows)
    rows_of = np.split(order, np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniques), size=len(uniques))
        out.append(fn(np.concatenate([rows_of[g] for g in pick])))
    return out


CORRELATION_METHODS = (
    ("ppl", "spearman"),
    ("ppl", "kendall_tau_b"),
    ("ppl", "partial_spearman_given_length"),
    ("ppl", "within_prompt_spearman"),
    ("log_ppl", "pearson"),
)


def correlation_rows(
    model: str, scores: pd.DataFrame, n_boot: int, seed: int, row_block: int = 2_000_000
) -> list[dict[str, Any]]:
    """correlations.csv rows of one run, over its generations with a finite PPL > 0: PPL vs toxicity
    by Spearman, Kendall tau-b, partial Spearman given ``n_scored_tokens`` (the fluency scorer's
    token count) and within-prompt Spearman (rank-based, so the same for log PPL: x = ``ppl``), and
    Pearson of log PPL (raw PPL's Pearson is dominated by a few huge PPLs: not reported). 95%
    percentile CIs from `n_boot` resamples of prompts; the resamples are the same for every
    statistic but Kendall's (which runs one resample at a time)."""
    from scipy.stats import pearsonr, spearmanr

    ok = scores[np.isfinite(scores["ppl"]) & (scores["ppl"] > 0)].reset_index(drop=True)
    x = ok["ppl"].to_numpy(dtype=float)
    y = ok["toxicity"].to_numpy(dtype=float)
    z = ok["n_scored_tokens"].to_numpy(dtype=float)
    codes, g = _prompt_codes(ok["prompt_id"])
    varies = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
    point = {
        "spearman": float(spearmanr(x, y).statistic) if varies else math.nan,
        "kendall_tau_b": _kendall(x, y),
        "partial_spearman_given_length": partial_spearman(x, y, z),
        "within_prompt_spearman": within_prompt_spearman(x, y, ok["prompt_id"]) if len(x) else math.nan,
        "pearson": float(pearsonr(np.log(x), y).statistic) if varies else math.nan,
    }
    boots: dict[str, list[np.ndarray]] = {m: [] for _, m in CORRELATION_METHODS}
    if g:
        rk = (_Ranker(x), _Ranker(y), _Ranker(z))
        sums = _within_sums(codes, g, x, y)
        for w in resample_counts(g, n_boot, seed):
            boots["within_prompt_spearman"].append(_within_of(sums, w))
            step = max(1, row_block // len(x))  # row weights: (step, rows) at a time
            for i in range(0, len(w), step):
                for m, v in _weighted_stats(x, y, z, rk, w[i : i + step, codes]).items():
                    boots[m].append(v)
        pids = ok["prompt_id"].to_numpy()
        kendall = bootstrap_by_prompt(pids, lambda r: _kendall(x[r], y[r]), n_boot, seed)
        boots["kendall_tau_b"] = [np.array(kendall, dtype=float)]
    rows = []
    for name, method in CORRELATION_METHODS:
        lo, hi = _percentile_ci(np.concatenate(boots[method])) if boots[method] else (math.nan, math.nan)
        rows.append(
            {
                "model": model,
                "x": name,
                "y": "toxicity",
                "method": method,
                "value": point[method],
                "ci_low": lo,
                "ci_high": hi,
                "control": "n_scored_tokens" if method.startswith("partial") else "",
                "n": len(ok),
                "n_prompts": g,
                "bootstrap": f"{n_boot} resamples of prompts",
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
    bad = ~np.isfinite(merged[score_col].to_numpy(dtype=float))
    what = f"{score_col}"
    if "ppl" in columns and "n_tokens" in columns:  # NaN PPL only for 0 scored tokens (empty text)
        bad_ppl = ~np.isfinite(merged["ppl"].to_numpy(dtype=float)) & (merged["n_tokens"].to_numpy() > 0)
        if bad_ppl.any() and not bad.any():
            bad, score_col, what = bad_ppl, "ppl", "ppl with n_tokens > 0"
    if bad.any():
        k = merged[bad].iloc[0]
        v = float(k[score_col])
        kind = "NaN" if math.isnan(v) else f"non-finite ({v})"
        raise InputError(
            f"{run}: {path}: {kind} {what} for (prompt_id, sample_id) = {_key(k)} ({int(bad.sum())} in all)"
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


def run_settings(cfg: Any, run: str) -> dict[str, Any]:
    """A generation run's settings from the config: its weights (name, where from, the configured
    dtype, revision for HF weights) and its sampling (k, temperature, top-p, top-k, max/min new
    tokens, seed). ``dtype`` is the configured one: "auto" resolves per device, and the generation
    shards record the dtype actually used."""
    gen = cfg.generate.runs[run]
    spec = cfg.models[gen.model]
    s = gen.sampling
    return {
        "weights": gen.model,
        "weights_source": spec.describe(),
        "dtype": spec.dtype,
        "revision": spec.revision if spec.source == "hf" else "",
        "k_configured": s.samples_per_prompt,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "max_new_tokens": s.max_new_tokens,
        "min_new_tokens": s.min_new_tokens,
        "sampling_seed": s.seed,
    }


def job(smk: Any) -> None:
    """Snakemake rule `analyse`: scores.parquet, summary.csv, correlations.csv, differences.csv."""
    from shardwise.toxicity import scorer_name

    cfg = load_config(smk.config)
    an = cfg.analysis
    runs = list(smk.params.runs)
    table = scores_table(runs, smk.input.generations, smk.input.fluency, smk.input.toxicity)
    fluency_model = cfg.models[an.fluency_model].describe() if an.fluency_model else ""
    summary = pd.DataFrame(
        [
            {
                **summary_row(
                    run,
                    table[table.model == run],
                    table.continuation[table.model == run],
                    an.threshold,
                    an.ppl_cap,
                    an.bootstrap,
                    an.seed,
                ),
                **run_settings(cfg, run),
                "toxicity_scorer": scorer_name(tox),
                "fluency_model": fluency_model,
            }
            for run, tox in zip(runs, smk.input.toxicity, strict=True)
        ]
    )
    corr = pd.DataFrame(
        [r for run in runs for r in correlation_rows(run, table[table.model == run], an.bootstrap, an.seed)]
    )
    diff = run_differences(table, runs, an.threshold, an.ppl_cap, an.bootstrap, an.seed)
    with atomic_path(Path(smk.output.scores)) as tmp:
        table.drop(columns=["continuation"]).to_parquet(tmp, index=False)
    atomic_write_text(Path(smk.output.summary), summary.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(Path(smk.output.correlations), corr.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(Path(smk.output.differences), diff.to_csv(index=False, float_format="%.6g"))
    log.info("analysed %d generations of %d model(s)", len(table), len(runs))
