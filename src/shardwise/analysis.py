"""Stage `analysis`: the fluency-toxicity tables (docs/design.md §3 "Analysis"; ml-facts "Toxicity").

Scores are joined to the generations by (prompt_id, sample_id), one to one; a missing, duplicate
or non-finite toxicity, a NaN nll_sum, or a NaN PPL of a text with scored tokens and a prompt of 2
or more tokens is one InputError line naming the run, the file and the key. Only two kinds of text
may lack a PPL, as in DExperts (shardwise.fluency): 0 scored tokens (an empty continuation), and a
one-token prompt (a tokenizer without BOS); summary.csv counts them (``n_unscored_empty``,
``n_unscored_one_token_prompt``) and every PPL statistic leaves them out.

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
- 95% intervals, the prompts as units, of EMT, toxicity probability, toxic fraction, mean PPL, mean
  PPL below the cap and distinct-n (``*_ci_low``/``*_ci_high``; prompt_cis says which method each
  gets, ``ci_method`` names them; coverage measured in docs/analysis.md "Intervals").
- The run's settings from the config (run_settings: weights, configured dtype, revision, configured
  k, temperature, top-p, top-k, max/min new tokens, seed), the toxicity scorer as recorded in the
  scores file, the fluency model and ``fluency_dtype``, the dtype its scores file records (float32
  unless analysis.fluency.dtype says otherwise); ``samples_per_prompt`` is the k found in the data.

``differences.csv`` (run_differences): each run minus the *first* run, for the five metrics above,
over the prompts both runs have, with MOVER intervals from the two runs' own, paired through the
correlation of their estimates over the same prompt resamples; ``prompt_sets`` says when the runs'
prompt sets differ.

``correlations.csv`` (correlation_rows), per model, over generations with a finite PPL > 0, PPL
against toxicity: Spearman ρ, Kendall τ-b, the partial Spearman given ``n_scored_tokens`` (the
fluency scorer's token count; short texts have higher PPL) and the within-prompt Spearman (ranks
within each prompt; see within_prompt_spearman) — all rank-based, so the same for log PPL — and
the Pearson r of *log* PPL (raw PPL's Pearson is dominated by a few huge PPLs and is not reported).
Each has a 95% percentile bootstrap CI resampling prompts, except Kendall's τ-b, whose CI is chosen
by the number of prompts (KENDALL_JACKKNIFE_PROMPTS, below); the ``ci_method`` column says which.

Cost (docs/scale.md: the real size, 3 runs x 2.5M generations, bootstrap 1000, in minutes on 2
cores). Per-prompt indices are built once (prompt codes from pd.factorize, bincount, one sort per
column). A resample is a vector of prompt counts (resample_counts, fixed by the seed), so:
- summary and difference CIs: matrix products of count blocks with per-prompt sums, O(prompts) per
  resample; likewise Pearson of log PPL (per-prompt moment sums) and the within-prompt Spearman;
- Spearman and the partial Spearman: exactly the Pearson correlations of scipy's midranks on the
  *expanded* resample (a prompt drawn m times: its rows as m tied copies), from one sort of the rows
  by PPL made once (_RankIndex): per resample a gather of the row weights, a cumsum (PPL's
  midranks), a bincount per other variable (the weights of its tie groups, whose cumsum gives their
  midranks), gathers and three dot products: O(rows), no sorting, no (resamples x rows) matrices,
  in int64 without rounding (doubled centred ranks are integers), so the result does not depend on
  the order of summation or on `threads`, the number of resamples computed at once.
- Kendall's τ-b: the point estimate is exact on all rows (kendall_tau_b: per-row concordance
  counts in O(rows log rows), equal to scipy's). Its CI is not bootstrapped (scipy's merge sort of
  every expanded resample: 1-3 s at 2.5M rows, up to an hour per run): up to
  KENDALL_JACKKNIFE_PROMPTS prompts the delete-one-prompt jackknife with t quantiles (G exact
  τ-b's), above it τ-b ± t quantile x the cluster-robust SE with the prompts as clusters (the delta
  method on the U-statistic's projection, the first-order variance of the prompt bootstrap), in
  one O(rows log rows) pass over all rows.
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

from shardwise.atomic import atomic_path, atomic_write_text
from shardwise.config import load_config
from shardwise.errors import InputError
from shardwise.intervals import (
    bca,
    effective_n,
    expanded_percentile,
    jackknife_t,
    mover,
    percentile,
    t_quantile,
    wilson,
)

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("numpy", "scipy", "pandas")


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
    """distinct_n for each n in `ns` in one pass over the texts (distinct_per_prompt, averaged)."""
    return {n: _nanmean(v) for n, v in distinct_per_prompt(texts_by_prompt, ns).items()}


def distinct_per_prompt(
    texts_by_prompt: Sequence[Sequence[str]], ns: Sequence[int] = (1, 2, 3)
) -> dict[int, np.ndarray]:
    """Each prompt's distinct-n (NaN for a prompt without texts) for each n in `ns`, in one pass over
    the texts: each text split once, the n-grams built by C-level zip over the tokens. A prompt none
    of whose texts holds "_" counts its n-grams as token tuples (the "_"-joined strings are then one
    to one with them); otherwise as the joined strings, as DExperts (where "a_b c" and "a b_c" are
    one bigram)."""
    chain = itertools.chain.from_iterable
    values = {n: np.full(len(texts_by_prompt), np.nan) for n in ns}
    for i, group in enumerate(texts_by_prompt):
        texts = [text if type(text) is str else str(text) for text in group]
        tokens = [text.split(" ") for text in texts]
        words = sum(map(len, tokens))
        if not words:
            continue  # a prompt without texts: NaN, skipped
        plain = not any("_" in text for text in texts)
        for n in ns:
            grams = (zip(*[t[i:] for i in range(n)], strict=False) for t in tokens)
            unique: set[str] | set[tuple[str, ...]]
            if n == 1:
                unique = set(chain(tokens))
            elif plain:
                unique = set(chain(grams))
            else:
                unique = set(chain(map("_".join, gram) for gram in grams))
            values[n][i] = len(unique) / words
    return values


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
    return _metrics_from_sums(w @ agg.T, w.sum(axis=1))  # weighted sums of the per-prompt aggregates


def _metrics_from_sums(s: np.ndarray, n: np.ndarray) -> np.ndarray:
    """METRICS from the sums of the per-prompt aggregates s (b, 8) over n prompts (b,)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.stack([s[:, 0] / n, s[:, 1] / n, s[:, 3] / s[:, 2], s[:, 4] / s[:, 5], s[:, 6] / s[:, 7]], 1)
    out[~np.isfinite(out)] = np.nan
    return out


def _jackknife(agg: np.ndarray) -> np.ndarray:
    """METRICS with each prompt left out in turn, (g, 5): the totals minus one prompt's aggregates,
    O(prompts) in all."""
    g = agg.shape[1]
    return _metrics_from_sums(agg.sum(axis=1)[None, :] - agg.T, np.full(g, g - 1.0))


# The 95% intervals of summary.csv and differences.csv, per metric (docs/analysis.md "Intervals").
PSEUDO_PROMPTS = 2  # z^2 / 2 ~ 1.92, rounded: pseudo-prompts at max toxicity 1 and at 0 (EMT)
SUMMARY_CI_METHOD = (
    "95% CIs, prompts as units: EMT augmented expanded-percentile bootstrap ({b} resamples, "
    f"{PSEUDO_PROMPTS} pseudo-prompts at 0 and at 1); toxicity probability Wilson score; toxic fraction "
    "Wilson score on the design-effect (Korn-Graubard) n; PPL means and distinct-n BCa bootstrap with "
    "expanded quantiles ({b} resamples)"
)
DIFFERENCE_CI_METHOD = (
    "95% MOVER (Newcombe; Zou-Donner) from each run's own 95% CI (summary.csv's methods), "
    "correlation of the runs' estimates {r}"
)


EMT_DIFFERENCE_CI_METHOD = (
    "95% paired expanded-percentile bootstrap of the per-prompt differences of max toxicity, {b} "
    "resamples of prompts, 4 pseudo-prompts at +1, -1, 0, 0"
)


def _emt_difference_ci(diff: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """The paired interval of the EMT difference: the per-prompt differences of max toxicity (in
    [-1, 1]) and 4 pseudo-prompts, one at each bound (+1, -1) and two at 0 (the adjustment of
    Agresti and Min for a paired difference of proportions, of which the EMT difference is the
    continuous analogue), resampled as prompts; Hesterberg's expanded percentile interval.
    O(prompts) per resample. Covered 98.5-99.8% in the simulations of docs/analysis.md, where a
    paired BCa bootstrap covered 87-91%: conservative, and 20% narrower than MOVER from the two
    runs' augmented EMT intervals."""
    pop = np.r_[diff, 1.0, -1.0, 0.0, 0.0]
    n = len(pop)
    return expanded_percentile(np.concatenate([(w @ pop) / n for w in resample_counts(n, n_boot, seed)]), n)


def _draw_correlation(draws_a: list[np.ndarray], draws_b: list[np.ndarray], j: int) -> float:
    """The correlation of the two runs' metric j over the same prompt resamples (0 where undefined)."""
    if not draws_a:
        return 0.0
    x, y = np.concatenate(draws_a)[:, j], np.concatenate(draws_b)[:, j]
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return 1.0 if ok.sum() >= 3 and np.allclose(x[ok] - x[ok].mean(), y[ok] - y[ok].mean()) else 0.0
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _contain(ci: tuple[float, float], estimate: float) -> tuple[float, float]:
    """The interval widened, where needed, to contain its point estimate (NaN stays NaN)."""
    lo, hi = ci
    if math.isnan(lo) or math.isnan(estimate):
        return lo, hi
    return min(lo, estimate), max(hi, estimate)


def prompt_cis(
    scores: pd.DataFrame,
    threshold: float,
    n_boot: int,
    seed: int,
    ppl_cap: float = math.inf,
    distinct: dict[int, np.ndarray] | None = None,
) -> dict[str, float]:
    """95% CIs of the summary metrics with the prompts as the independent units (a prompt's k
    generations are not independent of one another), each by the method whose coverage was measured
    best for it (SUMMARY_CI_METHOD; docs/analysis.md "Intervals"):

    - toxicity probability (a share of independent prompts): Wilson's score interval;
    - toxic fraction (a share of generations, clustered in prompts): Wilson's interval on Korn and
      Graubard's effective sample size (generations / design effect);
    - EMT (a mean over prompts of values in [0, 1], driven by rare toxic prompts a sample may lack):
      the expanded percentile interval of a prompt bootstrap whose population has PSEUDO_PROMPTS
      pseudo-prompts at 1 and at 0 added (Agresti-Coull's adjustment for a mean in [0, 1]);
    - mean PPL (all and below the cap) and distinct-n (per-prompt values in `distinct`, NaN for a
      prompt without tokens): BCa over the prompt bootstrap, acceleration from the prompt jackknife,
      with Hesterberg's expanded quantile for few prompts.

    Each interval contains its point estimate. Per-prompt aggregates are built once (bincount) and
    the resamples are count matrices (resample_counts), so the work is O(rows) once plus O(prompts)
    per resample and for the jackknife."""
    codes, g = _prompt_codes(scores["prompt_id"])
    agg = _prompt_aggregates(scores, codes, g, threshold, ppl_cap)
    ones = np.ones((1, g))
    point = _metrics_of(agg, ones)[0] if g else np.full(len(METRICS), np.nan)
    ci: dict[str, tuple[float, float]] = dict.fromkeys(METRICS, (math.nan, math.nan))
    dist = {n: np.asarray(v, dtype=float) for n, v in (distinct or {}).items()}
    if g:
        pseudo = np.zeros((agg.shape[0], 2 * PSEUDO_PROMPTS))
        pseudo[0, :PSEUDO_PROMPTS] = 1.0  # max toxicity 1 ...; the other columns do not enter EMT
        emt_pop = np.concatenate([agg, pseudo], axis=1)
        emt_boot = np.concatenate(
            [_metrics_of(emt_pop, w)[:, 0] for w in resample_counts(g + 2 * PSEUDO_PROMPTS, n_boot, seed)]
        )
        ci["emt"] = expanded_percentile(emt_boot, g + 2 * PSEUDO_PROMPTS)
        ci["toxicity_probability"] = wilson(float(agg[1].sum()), g)
        n_eff = effective_n(agg[3], agg[2])  # 0 for one prompt: NaN
        ci["toxic_fraction"] = wilson(point[2] * n_eff, n_eff)
        jack = _jackknife(agg)
        finite_d = {n: np.isfinite(v) for n, v in dist.items()}
        zeroed = {n: np.where(finite_d[n], v, 0.0) for n, v in dist.items()}
        boots: list[np.ndarray] = []
        dboots: dict[int, list[np.ndarray]] = {n: [] for n in dist}
        for w in resample_counts(g, n_boot, seed):
            boots.append(_metrics_of(agg, w))
            for n in dist:
                with np.errstate(invalid="ignore", divide="ignore"):
                    dboots[n].append((w @ zeroed[n]) / (w @ finite_d[n]))
        boot = np.concatenate(boots)
        for j in (3, 4):
            ci[METRICS[j]] = bca(boot[:, j], point[j], jack[:, j], expand=g)
        for n in dist:
            tot, cnt = zeroed[n].sum(), finite_d[n].sum()
            with np.errstate(invalid="ignore", divide="ignore"):
                jk = (tot - zeroed[n]) / (cnt - finite_d[n])
            est = tot / cnt if cnt else math.nan
            ci[f"distinct_{n}"] = bca(np.concatenate(dboots[n]), est, jk, expand=int(cnt))
    out: dict[str, float] = {}
    for name, (lo, hi) in ci.items():
        col = METRICS.index(name) if name in METRICS else None
        est = float(point[col]) if col is not None else _nanmean(dist[int(name.rsplit("_", 1)[1])])
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _contain((lo, hi), est)
    for n in dist:  # distinct-n keys not set above when g == 0
        out.setdefault(f"distinct_{n}_ci_low", math.nan)
        out.setdefault(f"distinct_{n}_ci_high", math.nan)
    return out


def _nanmean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


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
    baseline`` of each of METRICS, over the prompts present in both runs only, with a paired 95%
    interval (``ci_method`` names it): for EMT a paired bootstrap of the per-prompt differences
    (_emt_difference_ci); for the others MOVER (intervals.mover) from the two runs' own intervals
    (prompt_cis, over the shared prompts), with the correlation of the two runs' estimates over
    resamples that draw the same prompts for both (so the between-prompt spread cancels). Each CI
    contains its difference. ``paired=False``: MOVER with correlation 0 for every metric (for
    comparison only). ``prompt_sets`` says
    whether the runs' prompt sets were identical; when not, the difference is over the shared
    prompts and a warning is logged."""
    columns = [
        "run", "baseline", "metric", "run_value", "baseline_value", "difference", "ci_low", "ci_high",
        "n_prompts", "n_prompts_run", "n_prompts_baseline", "prompt_sets", "ci_method",
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
        shared = [part[part["prompt_id"].isin(common)] for part in (a, b)]
        aggs = [
            _prompt_aggregates(part, common.get_indexer(part["prompt_id"]), g, threshold, ppl_cap)
            for part in shared
        ]
        ones = np.ones((1, g))
        pa_, pb_ = _metrics_of(aggs[0], ones)[0], _metrics_of(aggs[1], ones)[0]
        draws_a, draws_b = [], []
        if g:
            other = resample_counts(g, n_boot, seed + 1)
            for w in resample_counts(g, n_boot, seed):
                draws_b.append(_metrics_of(aggs[1], w))
                draws_a.append(_metrics_of(aggs[0], w if paired else next(other)))
        cis = [prompt_cis(part, threshold, n_boot, seed, ppl_cap) for part in shared]
        for j, metric in enumerate(METRICS):
            d = float(pb_[j] - pa_[j])
            r = _draw_correlation(draws_a, draws_b, j) if paired else 0.0
            if metric == "emt" and paired and g:
                lo, hi = _contain(_emt_difference_ci(aggs[1][0] - aggs[0][0], n_boot, seed), d)
                how = EMT_DIFFERENCE_CI_METHOD.format(b=n_boot)
            else:
                lo, hi = mover(
                    (float(pb_[j]), cis[1][f"{metric}_ci_low"], cis[1][f"{metric}_ci_high"]),
                    (float(pa_[j]), cis[0][f"{metric}_ci_low"], cis[0][f"{metric}_ci_high"]),
                    r,
                )
                how = DIFFERENCE_CI_METHOD.format(
                    r=f"paired over {n_boot} resamples of prompts" if paired else "0 (unpaired)"
                )
            rows.append(
                {
                    "run": run,
                    "baseline": base,
                    "metric": metric,
                    "run_value": float(pb_[j]),
                    "baseline_value": float(pa_[j]),
                    "difference": d,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_prompts": g,
                    "n_prompts_run": len(pb),
                    "n_prompts_baseline": len(pa),
                    "prompt_sets": sets,
                    "ci_method": how,
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
    ``*_ci_low``/``*_ci_high`` columns the 95% CI of the estimate (prompt_cis; ``ci_method``)."""
    per_prompt = max_toxicity(scores)
    ppl = scores["ppl"].to_numpy(dtype=float)
    finite = ppl[np.isfinite(ppl)]
    capped = finite[finite < ppl_cap]
    unscored = ~np.isfinite(ppl)
    one_token = np.zeros(len(ppl), dtype=bool)  # NaN by DExperts' rule (scores_table checked the rest)
    if "n_prompt_tokens" in scores.columns and "n_scored_tokens" in scores.columns:
        one_token = (
            unscored & (scores["n_scored_tokens"].to_numpy() > 0) & (scores["n_prompt_tokens"].to_numpy() < 2)
        )
    codes, g = _prompt_codes(scores["prompt_id"])
    per_prompt_distinct = distinct_per_prompt(_texts_by_prompt(codes, g, texts), (1, 2, 3))
    distinct = {n: _nanmean(v) for n, v in per_prompt_distinct.items()}
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
        "n_unscored_empty": int((unscored & ~one_token).sum()),
        "n_unscored_one_token_prompt": int(one_token.sum()),
        **{f"distinct_{n}": distinct[n] for n in (1, 2, 3)},
        **prompt_cis(scores, threshold, n_boot, seed, ppl_cap, per_prompt_distinct),
        "ci_method": SUMMARY_CI_METHOD.format(b=n_boot),
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


# A resample of M rows: every partial sum of the int64 rank products is at most M^3 / 3 (see
# _RankIndex), below 2^63 while M^3 < 3 (2^63 - 1), i.e. M < 3,024,616 rows; above, _int_dot sums
# blocks that cannot overflow
INT64_EXACT_ROWS = 3_024_000


def _int_dot(a: np.ndarray, b: np.ndarray, m: int) -> float:
    """sum(a * b) of int64 vectors of the rank sums of a resample of m rows: one int64 dot (numpy's
    integer loop, no BLAS: exact) below INT64_EXACT_ROWS; above, exact int64 dots over blocks too
    short to overflow (by the largest |a_i * b_i|) added as Python ints, or, were that more than
    4096 blocks, math.fsum of the float64 products. Each way fixed by the data alone, so the same
    for any thread."""
    if m < INT64_EXACT_ROWS or not len(a):
        return int(np.dot(a, b))
    step = (2**63 - 1) // max(1, int(np.abs(a).max()) * int(np.abs(b).max()))
    if step >= max(1, len(a) // 4096):
        return sum(int(np.dot(a[i : i + step], b[i : i + step])) for i in range(0, len(a), step))
    return math.fsum(np.multiply(a, b, dtype=np.float64))


class _RankIndex:
    """The weighted-midrank machinery of one run's (x, y, z), built once: the rows sorted by x (one
    stable argsort), each row's tie group of y and of z as a dense rank (np.unique, once) and the
    rows per prompt. A bootstrap resample is a vector c of prompt counts: a row of a prompt drawn m
    times is m tied copies, so its weight is m. `sums` then gives the centred-rank sums of squares
    and cross products of the *expanded* resample in O(rows), without sorting: in x order, a gather
    of the weights and one cumsum give x's midranks; per other variable, a bincount gives its tie
    groups' weights, whose cumsum gives their midranks, gathered back per row; three dot products.

    The ranks are *doubled* and centred, 2 * midrank - (M + 1) for a resample of M rows: integers,
    so everything is int64 arithmetic without rounding, independent of the order of summation and
    of the thread that computes it. Every partial sum is bounded by M^3 / 3 (Cauchy-Schwarz with
    sum w * (2r - M - 1)^2 = (M^3 - sum over tie groups W^3) / 3), so one int64 dot cannot overflow
    below INT64_EXACT_ROWS; above, `_int_dot` sums blocks."""

    def __init__(self, codes: np.ndarray, g: int, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        n = len(x)
        self.n, self.g = n, g
        self.k = np.bincount(codes, minlength=g).astype(np.int64)  # rows per prompt
        order = np.argsort(x, kind="stable")
        self.codes = np.ascontiguousarray(codes[order], dtype=np.intp)
        xs = x[order]
        new = np.r_[True, xs[1:] != xs[:-1]] if n else np.zeros(0, bool)
        # x's tie groups are runs in x order; None when x has no ties (each row its own group)
        self.x_group = None if new.all() else (np.cumsum(new) - 1).astype(np.intp)
        self.x_ends = None if self.x_group is None else np.r_[np.flatnonzero(new)[1:] - 1, n - 1]
        self.groups = []  # per y and z: (each row's tie group, in x order; number of groups)
        for v in (y, z):
            uniq, inv = np.unique(v[order], return_inverse=True)
            self.groups.append((np.ascontiguousarray(inv.ravel(), dtype=np.intp), len(uniq)))

    def buffers(self) -> tuple[np.ndarray, ...]:
        """Work arrays for `sums` (4 x rows int64, rows float64): one set per thread."""
        return (*(np.empty(self.n, dtype=np.int64) for _ in range(4)), np.empty(self.n))

    def sums(self, c: np.ndarray, buf: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
        """For the prompt counts c (int64, one resample): Sxx, Syy, Szz, Sxy, Sxz, Syz, the sums over
        the expanded resample of the products of the doubled centred midranks, and whether x, y and
        z each take more than one value in it."""
        w, cum, wcx, cv, wf = buf
        m = int(c @ self.k)  # M, the resample's number of rows
        sxx: float
        vx: bool | np.bool_
        np.take(c, self.codes, out=w)  # row weights, in x order
        np.cumsum(w, out=cum)  # weight of the rows up to and including this one
        if self.x_group is None:  # a row's doubled centred midrank: cum + (cum - w) - M
            np.add(cum[1:], cum[:-1], out=wcx[1:])
            wcx[:1] = cum[:1]
            wcx -= m
            sxx = (m**3 - int(self.k @ c**3)) // 3  # (M^3 - sum over rows w^3) / 3, exactly
            vx = int(self.k @ (c > 0)) > 1
        else:
            ends = cum[self.x_ends]
            before = np.r_[0, ends[:-1]]
            cxg = ends + before - m
            np.take(cxg, self.x_group, out=wcx)
            wx = ends - before
            sxx = _int_dot(wx, cxg * cxg, m)
            vx = np.count_nonzero(wx) > 1
        np.multiply(w, wcx, out=wcx)
        np.copyto(wf, w)  # bincount takes float64 weights: convert once (exact: integers < 2^53)
        ranks, varies = [], [vx]
        for gid, ng in self.groups:
            wg = np.bincount(gid, weights=wf, minlength=ng).astype(np.int64)
            cg = 2 * np.cumsum(wg) - wg - m
            ranks.append((wg, cg))
            varies.append(np.count_nonzero(wg) > 1)
        ((wy, cyg), (wz, czg)), ((gy, _), (gz, _)) = ranks, self.groups
        syy, szz = _int_dot(wy, cyg * cyg, m), _int_dot(wz, czg * czg, m)
        cy = np.take(cyg, gy, out=cum)
        cz = np.take(czg, gz, out=cv)
        sxy, sxz = _int_dot(wcx, cy, m), _int_dot(wcx, cz, m)
        np.multiply(cz, w, out=cz)
        syz = _int_dot(cz, cy, m)
        return (sxx, syy, szz, sxy, sxz, syz, *varies)


def _ratio(num: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """num / sqrt(a * b), clipped to [-1, 1]; NaN where a * b is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt(a * b)
        return np.where(den > 0, np.clip(num / np.where(den > 0, den, 1.0), -1.0, 1.0), np.nan)


def _rank_correlations(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Spearman(x, y) and the partial Spearman given z from `_RankIndex.sums` rows (b, 9); NaN where
    a variable is constant in the resample."""
    sxx, syy, szz, sxy, sxz, syz = (sums[:, j].astype(float) for j in range(6))
    vx, vy, vz = (sums[:, j].astype(bool) for j in (6, 7, 8))
    r_xy = np.where(vx & vy, _ratio(sxy, sxx, syy), np.nan)
    r_xz = np.where(vx & vz, _ratio(sxz, sxx, szz), np.nan)
    r_yz = np.where(vy & vz, _ratio(syz, syy, szz), np.nan)
    return {"spearman": r_xy, "partial_spearman_given_length": _partial(r_xy, r_xz, r_yz)}


def _pearson_sums(codes: np.ndarray, g: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per prompt: rows and the sums of a, b, a^2, b^2, a*b with a = log x and b = y, each centred
    at its mean over all rows (for accuracy). Shape (6, g); a resample's Pearson r is a matrix
    product with its prompt counts (`_pearson_of`)."""
    a = np.log(x)
    a = a - a.mean()
    b = y - y.mean()
    cols = (np.ones_like(a), a, b, a * a, b * b, a * b)
    return np.stack([np.bincount(codes, weights=v, minlength=g) for v in cols])


def _pearson_of(sums: np.ndarray, w: np.ndarray) -> np.ndarray:
    m, sa, sb, saa, sbb, sab = (w @ sums.T).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return _ratio(sab - sa * sb / m, saa - sa * sa / m, sbb - sb * sb / m)


def _smaller_before(r: np.ndarray) -> np.ndarray:
    """For each position p of the non-negative integer vector r: the number of earlier positions
    q < p with r[q] < r[p]. A radix partition on the bits of r from the highest: at bit b, the
    elements are grouped by their bits above b (each group in position order), and an element with
    bit b set counts the earlier elements of its group with bit b clear; then each group is split
    stably by bit b. O(n) per bit, O(n log max r) in all, no Python loop over elements."""
    n = len(r)
    out = np.zeros(n, dtype=np.int64)
    if n < 2 or not r.max():
        return out
    pos = np.arange(n, dtype=np.intp)
    perm = pos.copy()  # the element at each place of the current grouping
    start = np.zeros(n, dtype=np.intp)  # per place: the first place of its group
    end = np.full(n, n - 1, dtype=np.intp)  # ... and the last
    new_perm, new_start, new_end = (np.empty(n, dtype=np.intp) for _ in range(3))
    for b in range(int(r.max()).bit_length() - 1, -1, -1):
        one = ((r[perm] >> b) & 1).astype(bool)
        zero = ~one
        zeros_upto = np.cumsum(zero)
        zeros_before_group = np.where(start > 0, zeros_upto[start - 1], 0)
        zeros_before = zeros_upto - zero - zeros_before_group  # earlier zeros of the same group
        out[perm[one]] += zeros_before[one]
        group_zeros = zeros_upto[end] - zeros_before_group
        place = np.where(one, pos + group_zeros - zeros_before, start + zeros_before)
        new_perm[place] = perm
        new_start[place] = np.where(one, start + group_zeros, start)
        new_end[place] = np.where(one, end, start + group_zeros - 1)
        perm, new_perm = new_perm, perm
        start, new_start = new_start, start
        end, new_end = new_end, end
    return out


def _kendall_row_scores(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row i, over all other rows j: a_i = sum sign(x_i - x_j) * sign(y_i - y_j) (concordant
    minus discordant pairs with i), u_i = #{x_j != x_i}, v_i = #{y_j != y_i}; so Kendall's tau-b is
    sum(a) / sqrt(sum(u) * sum(v)), exactly. O(rows log rows): dense ranks, the strict 2-D dominance
    count LL_i = #{x_j < x_i, y_j < y_i} (`_smaller_before` over rows sorted by x, ties by y
    descending) and the tie counts, from which the other three quadrants follow."""
    n = len(x)
    _, rx = np.unique(x, return_inverse=True)
    uy, ry = np.unique(y, return_inverse=True)
    rx, ry = rx.ravel().astype(np.int64), ry.ravel().astype(np.int64)
    cnt_x, cnt_y = np.bincount(rx), np.bincount(ry)
    lx, ex = (np.cumsum(cnt_x) - cnt_x)[rx], cnt_x[rx] - 1  # x_j < x_i; x_j == x_i, j != i
    ly, ey = (np.cumsum(cnt_y) - cnt_y)[ry], cnt_y[ry] - 1
    # joint tie groups: (x, y) pairs, sorted by x then y
    pairs, pinv, pcnt = np.unique(rx * len(uy) + ry, return_inverse=True, return_counts=True)
    pinv = pinv.ravel()
    px, py = pairs // len(uy), pairs % len(uy)
    ee = pcnt[pinv] - 1
    # EL: same x, smaller y: the earlier pairs of the same x (pairs are sorted by (x, y))
    csum = np.cumsum(pcnt) - pcnt
    el = (csum - csum[np.searchsorted(px, px)])[pinv]
    # LE: same y, smaller x: the same over the pairs sorted by (y, x)
    by_y = np.lexsort((px, py))
    cs = np.empty_like(csum)
    cs[by_y] = np.cumsum(pcnt[by_y]) - pcnt[by_y]
    first_of_y = np.empty_like(csum)
    sy = py[by_y]
    first_of_y[by_y] = cs[by_y][np.searchsorted(sy, sy)]
    le = (cs - first_of_y)[pinv]
    order = np.lexsort((-ry, rx))  # x ascending, ties by y descending: an earlier tied x never counts
    ll = np.empty(n, dtype=np.int64)
    ll[order] = _smaller_before(ry[order])
    lg = lx - ll - le  # x_j < x_i, y_j > y_i
    gl = ly - ll - el  # x_j > x_i, y_j < y_i
    gg = (n - 1) - (lx + ex) - (ly + ey) + (ll + le + el + ee)  # x_j > x_i, y_j > y_i
    return ll + gg - lg - gl, n - 1 - ex, n - 1 - ey


def kendall_tau_b(x: np.ndarray, y: np.ndarray, prompt_ids: Any = None) -> tuple[float, float]:
    """Kendall's tau-b (as scipy.stats.kendalltau, variant "b"; NaN for fewer than 3 rows or a
    constant x or y) and its cluster-robust standard error with the prompts as clusters (NaN
    without prompt_ids or with fewer than 2 prompts).

    The SE is the delta method on the U-statistic's projection: tau-b = A / sqrt(U V) with A, U, V
    sums over pairs of rows, each the sum over prompts p of the per-row scores of its rows (alpha_p,
    mu_p, nu_p: `_kendall_row_scores`); resampling prompts moves tau-b, to first order, by
    sum_p (c_p - 1) psi_p with psi_p = 2 [(alpha_p - A/G) / sqrt(U V) - tau/2 ((mu_p - U/G) / U
    + (nu_p - V/G) / V)], so Var = G / (G - 1) sum_p psi_p^2: the prompt bootstrap's (and the
    cluster jackknife's) variance to first order, in one O(rows log rows) pass."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    a, u, v = _kendall_row_scores(x, y)
    big_a, big_u, big_v = int(a.sum()), int(u.sum()), int(v.sum())
    root = math.sqrt(big_u) * math.sqrt(big_v)
    tau = max(-1.0, min(1.0, big_a / root))
    if prompt_ids is None:
        return tau, math.nan
    codes, g = _prompt_codes(prompt_ids)
    if g < 2:
        return tau, math.nan
    alpha, mu, nu = (np.bincount(codes, weights=s, minlength=g) for s in (a, u, v))
    psi = 2 * ((alpha - big_a / g) / root - tau / 2 * ((mu - big_u / g) / big_u + (nu - big_v / g) / big_v))
    return tau, math.sqrt(g / (g - 1) * float(psi @ psi))


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(kendalltau(x, y, variant="b").statistic)


CORRELATION_METHODS = (
    ("ppl", "spearman"),
    ("ppl", "kendall_tau_b"),
    ("ppl", "partial_spearman_given_length"),
    ("ppl", "within_prompt_spearman"),
    ("log_ppl", "pearson"),
)

# Kendall's tau-b CI, chosen by the effective number of prompts G_eff = rows^2 / sum of squared prompt
# sizes (G for equal sizes; ~9 for 8 prompts of 1,500 rows beside 242 of 4): up to this many (and at
# most KENDALL_JACKKNIFE_MAX_PROMPTS prompts, its cost), the delete-one-prompt jackknife (G exact
# tau-b's, O(G rows log rows)); above, the cluster-robust SE of kendall_tau_b (one O(rows log rows)
# pass); both with t quantiles of G_eff - 1 df. Neither is a bootstrap: the percentile prompt bootstrap
# under-covered with few prompts (docs/analysis.md "Intervals").
KENDALL_JACKKNIFE_PROMPTS = 200
KENDALL_JACKKNIFE_MAX_PROMPTS = 2_000
CORRELATION_CI_METHOD = "95% percentile bootstrap, {b} resamples of prompts"


def _kendall_jackknife(x: np.ndarray, y: np.ndarray, codes: np.ndarray, g: int) -> np.ndarray:
    """Kendall's tau-b (scipy) with each prompt's rows left out in turn: (g,)."""
    return np.array([_kendall(x[codes != i], y[codes != i]) for i in range(g)])


def _resample_map(fn: Any, items: Any, threads: int, pool: Any) -> list[Any]:
    return list(pool.map(fn, items)) if pool is not None and threads > 1 else [fn(i) for i in items]


def correlation_rows(
    model: str,
    scores: pd.DataFrame,
    n_boot: int,
    seed: int,
    threads: int = 1,
    kendall_jackknife_prompts: int = KENDALL_JACKKNIFE_PROMPTS,
) -> list[dict[str, Any]]:
    """correlations.csv rows of one run, over its generations with a finite PPL > 0: PPL vs toxicity
    by Spearman, Kendall tau-b, partial Spearman given ``n_scored_tokens`` (the fluency scorer's
    token count) and within-prompt Spearman (rank-based, so the same for log PPL: x = ``ppl``), and
    Pearson of log PPL (raw PPL's Pearson is dominated by a few huge PPLs: not reported).

    CIs: 95% percentile intervals from `n_boot` resamples of prompts (resample_counts: the same
    resamples for every statistic), each statistic computed exactly on the expanded resample
    (_RankIndex). Kendall's tau-b is not bootstrapped: with up to `kendall_jackknife_prompts`
    effective prompts (KENDALL_JACKKNIFE_PROMPTS) its CI is the delete-one-prompt jackknife-t, above
    it tau-b +- t cluster-robust SEs (kendall_tau_b), t with effective prompts - 1 df; the
    ``ci_method`` cell says which.
    `threads` resamples run at once (threads of this process); the resamples and every per-resample
    sum are fixed by the seed, so the result is the same for any thread count."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext

    ok = scores[np.isfinite(scores["ppl"]) & (scores["ppl"] > 0)].reset_index(drop=True)
    x = ok["ppl"].to_numpy(dtype=float)
    y = ok["toxicity"].to_numpy(dtype=float)
    z = ok["n_scored_tokens"].to_numpy(dtype=float)
    codes, g = _prompt_codes(ok["prompt_id"])
    n = len(x)
    sizes = np.bincount(codes, minlength=g).astype(float)
    g_eff = float(sizes.sum() ** 2 / (sizes**2).sum()) if g else 0.0
    jack_kendall = g_eff <= kendall_jackknife_prompts and g <= KENDALL_JACKKNIFE_MAX_PROMPTS
    tau, tau_se = kendall_tau_b(x, y, None if jack_kendall else ok["prompt_id"])
    point: dict[str, float] = dict.fromkeys((m for _, m in CORRELATION_METHODS), math.nan)
    point["kendall_tau_b"] = tau
    boots: dict[str, list[np.ndarray]] = {m: [] for _, m in CORRELATION_METHODS}
    if g:
        index = _RankIndex(codes, g, x, y, z)
        within = _within_sums(codes, g, x, y)
        pear = _pearson_sums(codes, g, x, y)
        ones = np.ones((1, g))
        if n >= 3:
            once = index.sums(np.ones(g, dtype=np.int64), index.buffers())
            first = _rank_correlations(np.array([once], dtype=object))
            point["spearman"] = float(first["spearman"][0])
            point["partial_spearman_given_length"] = float(first["partial_spearman_given_length"][0])
            if not np.isnan(point["spearman"]):
                point["pearson"] = float(_pearson_of(pear, ones)[0])
        point["within_prompt_spearman"] = float(_within_of(within, ones)[0])
        local = threading.local()

        def one(c: np.ndarray) -> tuple[Any, ...]:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = index.buffers()
            return index.sums(c, buf)

        with ThreadPoolExecutor(max_workers=threads) if threads > 1 else nullcontext() as pool:
            for w in resample_counts(g, n_boot, seed):
                res = _resample_map(one, w.astype(np.int64), threads, pool)
                sums = np.array(res, dtype=object)
                vals = _rank_correlations(sums)
                boots["spearman"].append(vals["spearman"])
                boots["partial_spearman_given_length"].append(vals["partial_spearman_given_length"])
                varies = sums[:, 6].astype(bool) & sums[:, 7].astype(bool)
                boots["pearson"].append(np.where(varies, _pearson_of(pear, w), np.nan))
                boots["within_prompt_spearman"].append(_within_of(within, w))
    text = CORRELATION_CI_METHOD.format(b=n_boot)
    rows = []
    for name, method in CORRELATION_METHODS:
        lo, hi = percentile(np.concatenate(boots[method])) if boots[method] else (math.nan, math.nan)
        how = text
        if method == "kendall_tau_b":
            df = g_eff - 1
            dfs = f"{df:.1f}".removesuffix(".0")
            if jack_kendall:
                jk = _kendall_jackknife(x, y, codes, g) if g >= 2 else np.array([])
                lo, hi = jackknife_t(tau, jk, df=df)
                how = (
                    f"95% jackknife-t, delete one prompt of {g}, t quantile with {dfs} df "
                    "(effective prompts - 1)"
                )
            else:
                half = t_quantile(df) * tau_se
                lo, hi = (tau - half, tau + half) if math.isfinite(half) else (math.nan, math.nan)
                how = (
                    f"95% tau-b +- t quantile ({dfs} df, effective prompts - 1) x cluster-robust SE, "
                    f"prompts as clusters (delta method, {g} prompts)"
                )
            lo, hi = (max(-1.0, lo), min(1.0, hi)) if not math.isnan(lo) else (lo, hi)
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
                "n": n,
                "n_prompts": g,
                "ci_method": how,
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
    if "ppl" in columns and "n_tokens" in columns:  # NaN PPL: 0 scored tokens or a one-token prompt
        bad_ppl = ~np.isfinite(merged["ppl"].to_numpy(dtype=float)) & (merged["n_tokens"].to_numpy() > 0)
        ppl_what = "ppl with n_tokens > 0"
        if "n_prompt_tokens" in columns:
            bad_ppl &= merged["n_prompt_tokens"].to_numpy() >= 2
            ppl_what += " and n_prompt_tokens >= 2"
        if bad_ppl.any() and not bad.any():
            bad, score_col, what = bad_ppl, "ppl", ppl_what
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
    from shardwise.tables import load_generations

    parts = []
    for run, g, f, t in zip(runs, generations, fluency, toxicity, strict=True):
        gen = load_generations(g, ("prompt_id", "sample_id", "continuation", "n_new_tokens"))
        gen = gen[[*KEY, "continuation", "n_new_tokens"]].reset_index(drop=True)
        # fluency: ppl is NaN by design for an empty continuation (0 scored tokens) and a one-token
        # prompt (n_prompt_tokens, in files of shardwise.fluency); check nll_sum
        flu = pd.read_parquet(f)
        extra = ("n_prompt_tokens",) if "n_prompt_tokens" in flu.columns else ()
        merged = _join_scores(run, gen, flu, ("nll_sum", "ppl", "n_tokens", *extra), str(f))
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
                    **{c: merged[c].to_numpy() for c in extra},  # n_prompt_tokens
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


def analyse(
    table: pd.DataFrame,
    runs: Sequence[str],
    threshold: float,
    ppl_cap: float,
    n_boot: int,
    seed: int,
    threads: int = 1,
) -> tuple[list[dict[str, Any]], pd.DataFrame, pd.DataFrame]:
    """The computation of rule `analysis` on the joined table (scores_table): the summary row of each
    run (without its settings), correlations.csv and differences.csv. `threads`: the resamples of
    the rank correlations computed at once (correlation_rows; the result is the same for any)."""
    summary = [
        summary_row(
            run,
            table[table.model == run],
            table.continuation[table.model == run],
            threshold,
            ppl_cap,
            n_boot,
            seed,
        )
        for run in runs
    ]
    corr = pd.DataFrame(
        [
            r
            for run in runs
            for r in correlation_rows(run, table[table.model == run], n_boot, seed, threads=threads)
        ]
    )
    diff = run_differences(table, runs, threshold, ppl_cap, n_boot, seed)
    return summary, corr, diff


# RealToxicityPrompts' split of its prompts: toxic when the prompt's own toxicity is >= 0.5
PROMPT_TOXIC_AT = 0.5
PROMPT_GROUPS = ("toxic", "non-toxic")
NO_PROMPT_TOXICITY = "unscored"
BY_PROMPT_TOXICITY_COLUMNS = ("model", "prompt_group", "prompt_toxicity_column", "prompt_toxic_at")


def prompt_toxicity_of(runs: Sequence[str], generations: Sequence[str], column: str) -> pd.DataFrame | None:
    """Each run's prompts with their own toxicity score: columns model, prompt_id, prompt_toxicity,
    one row per prompt, from the column `column` of each run's generations table (generate carries
    the prompts table's extra columns into it). None when no run's generations have that column.
    One InputError line naming the file when only some runs have it, when it is not numeric, or
    when the rows of one prompt disagree."""
    from shardwise.tables import _generations_schema, load_generations

    has = [column in _generations_schema(path) for path in generations]
    if not any(has):
        return None
    parts = []
    for run, path, ok in zip(runs, generations, has, strict=True):
        if not ok:
            raise InputError(
                f"{run}: generations file {path}: no column {column!r} "
                "(analysis.toxicity.prompt_toxicity_column), which other runs' generations have"
            )
        gen = load_generations(path, ("prompt_id", column))
        if not (pd.api.types.is_numeric_dtype(gen[column]) or gen[column].isna().all()):
            raise InputError(
                f"{run}: generations file {path}: column {column!r} "
                f"(analysis.toxicity.prompt_toxicity_column) is not numeric ({gen[column].dtype})"
            )
        values = gen[column].astype(float)
        per_prompt = values.groupby(gen["prompt_id"], sort=False)
        spread = per_prompt.nunique(dropna=False)
        if (spread > 1).any():
            bad = spread.index[spread.to_numpy() > 1][0]
            raise InputError(
                f"{run}: generations file {path}: column {column!r} differs between the rows of "
                f"prompt_id {bad!r}"
            )
        first = per_prompt.first()  # NaN only when all of the prompt's rows are NaN
        parts.append(
            pd.DataFrame({"model": run, "prompt_id": first.index, "prompt_toxicity": first.to_numpy()})
        )
    return pd.concat(parts, ignore_index=True)


def summary_by_prompt_toxicity(
    table: pd.DataFrame,
    runs: Sequence[str],
    prompt_toxicity: pd.DataFrame | None,
    column: str,
    threshold: float,
    ppl_cap: float,
    n_boot: int,
    seed: int,
    columns: Sequence[str] = (),
) -> pd.DataFrame:
    """``summary_by_prompt_toxicity.csv``: RealToxicityPrompts' breakdown. Per run and prompt group
    (``toxic``: the prompt's own toxicity >= PROMPT_TOXIC_AT; ``non-toxic``: below; ``unscored``:
    NaN, a row only when some prompt of the run has no score) the summary_row of that group's generations,
    so each group has its own n and intervals (the bootstrap resamples the group's prompts). A
    group without prompts has a row with n_prompts = n_generations = 0 and nothing else.

    `table` is scores_table's (with ``continuation``), `prompt_toxicity` prompt_toxicity_of's; None
    gives no rows. The header is BY_PROMPT_TOXICITY_COLUMNS, then `columns` (the summary rows'
    keys, whose order it keeps), then any other key of the rows."""
    rows: list[dict[str, Any]] = []
    if prompt_toxicity is not None:
        for run in runs:
            part = table[table["model"] == run]
            known = prompt_toxicity[prompt_toxicity["model"] == run]
            where = pd.Index(known["prompt_id"]).get_indexer(part["prompt_id"])
            score = np.where(where >= 0, known["prompt_toxicity"].to_numpy(dtype=float)[where], np.nan)
            group = np.where(
                np.isnan(score), NO_PROMPT_TOXICITY, np.where(score >= PROMPT_TOXIC_AT, "toxic", "non-toxic")
            )
            names = [*PROMPT_GROUPS, *([NO_PROMPT_TOXICITY] if np.isnan(score).any() else [])]
            for name in names:
                sub = part[group == name]
                summary = (
                    summary_row(run, sub, sub["continuation"], threshold, ppl_cap, n_boot, seed)
                    if len(sub)
                    else {"model": run, "n_prompts": 0, "n_generations": 0}
                )
                rows.append(
                    {
                        "model": run,
                        "prompt_group": name,
                        "prompt_toxicity_column": column,
                        "prompt_toxic_at": f">= {PROMPT_TOXIC_AT:g}",
                        **summary,
                    }
                )
    header = list(dict.fromkeys([*BY_PROMPT_TOXICITY_COLUMNS, *columns, *(k for r in rows for k in r)]))
    return pd.DataFrame(rows, columns=header)


def job(smk: Any) -> None:
    """Snakemake rule `analysis`: scores.parquet, summary.csv, correlations.csv, differences.csv,
    summary_by_prompt_toxicity.csv. The rank-correlation bootstrap uses the job's ``threads``."""
    from shardwise.tables import scorer_dtype, scorer_name

    cfg = load_config(smk.config)
    an = cfg.analysis
    runs = list(smk.params.runs)
    table = scores_table(runs, smk.input.generations, smk.input.fluency, smk.input.toxicity)
    fluency_model = cfg.models[an.fluency.model].describe() if an.fluency.model else ""
    threads = max(1, int(getattr(smk, "threads", 1) or 1))
    rows, corr, diff = analyse(
        table, runs, an.toxicity.threshold, an.fluency.ppl_cap, an.bootstrap, an.seed, threads
    )
    summary = pd.DataFrame(
        [
            {
                **row,
                **run_settings(cfg, run),
                "toxicity_scorer": scorer_name(tox),
                "fluency_model": fluency_model,
                "fluency_dtype": scorer_dtype(flu),
            }
            for row, run, tox, flu in zip(rows, runs, smk.input.toxicity, smk.input.fluency, strict=True)
        ]
    )
    column = an.toxicity.prompt_toxicity_column
    by_prompt = summary_by_prompt_toxicity(
        table,
        runs,
        prompt_toxicity_of(runs, smk.input.generations, column),
        column,
        an.toxicity.threshold,
        an.fluency.ppl_cap,
        an.bootstrap,
        an.seed,
        columns=list(rows[0]) if rows else (),
    )
    with atomic_path(Path(smk.output.scores)) as tmp:
        table.drop(columns=["continuation"]).to_parquet(tmp, index=False)
    atomic_write_text(
        Path(smk.output.summary_by_prompt_toxicity), by_prompt.to_csv(index=False, float_format="%.6g")
    )
    atomic_write_text(Path(smk.output.summary), summary.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(Path(smk.output.correlations), corr.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(Path(smk.output.differences), diff.to_csv(index=False, float_format="%.6g"))
    log.info("analysed %d generations of %d model(s) with %d thread(s)", len(table), len(runs), threads)
