"""Stage `report`: figures, one self-contained ``report.html`` (PNG figures embedded as data URIs,
so the file opens from the results folder or an e-mail attachment) and the report's tables as CSV
and LaTeX (``results/analysis/tables/<table>.csv|.tex``), the cells as the HTML shows them.

Every number goes through one formatter, fmt_num: estimates in 3 significant digits (trailing
zeros kept: ``0.500``), counts exact (``2,500,000``), settings as configured. Intervals are
``0.420 [0.390, 0.450]``, and each table names its interval method from the CSVs' ``ci_method``
column (the older ``bootstrap`` column when that is absent: interval_methods).

The HTML holds: the scorer, threshold, fluency model and its dtype; warnings when the runs' k
differ, when a run's k in the data is not its configured k, and when the fluency model is one of
the generators; the per-run settings; the summary (n: prompts, generations, k; then one row per
metric, one column per run); the differences of each run from the first (paired intervals, with
the shared prompts and k); the correlations (run x statistic, with each run's generations, prompts
and k); RealToxicityPrompts' breakdown by toxic and non-toxic prompts when the analysis wrote one;
figures: bars per run with their intervals, forest plots of the differences and of the
correlations, and PPL vs toxicity per run (a scatter up to HEXBIN_ABOVE points, a hexbin of log
PPL above that). Nothing here loops over prompts x rows."""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.atomic import atomic_path, atomic_write_text

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("matplotlib",)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


HEXBIN_ABOVE = 5000


def scatter(scores: pd.DataFrame, model: str, path: Path, threshold: float) -> str:
    """PPL (log scale) vs toxicity, with marginal histograms: a scatter up to HEXBIN_ABOVE points, a
    hexbin (log-count colours with their colour bar, log10 PPL on x) above that, so millions of
    points stay readable.
    Returns which ("scatter" or "hexbin")."""
    plt = _plt()
    data = scores[(scores.model == model) & np.isfinite(scores.ppl) & (scores.ppl > 0)]
    kind = "hexbin" if len(data) > HEXBIN_ABOVE else "scatter"
    fig = plt.figure(figsize=(6, 5.2), dpi=110)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    lx = np.log10(data.ppl.to_numpy(dtype=float))
    if kind == "hexbin":
        cells = ax.hexbin(lx, data.toxicity, gridsize=60, bins="log", cmap="viridis", mincnt=1, linewidths=0)
        bar = fig.colorbar(cells, cax=ax.inset_axes((0.04, 0.42, 0.03, 0.3)))
        bar.set_label("generations per cell", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        ax.set_xlabel("log10 perplexity")
    else:
        ax.scatter(lx, data.toxicity, s=8, alpha=0.5, color="tab:blue", linewidths=0)
        ax.set_xlabel("log10 perplexity")
    ax.axhline(threshold, color="tab:red", lw=0.8, ls="--", label=f"toxic: >= {threshold:g}")
    ax.set_ylabel("toxicity")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper right", fontsize=8)
    if len(data):
        top.hist(lx, bins=np.linspace(lx.min(), lx.max() + 1e-9, 40), color="tab:blue", alpha=0.7)
    right.hist(
        data.toxicity, bins=np.linspace(0, 1, 26), orientation="horizontal", color="tab:orange", alpha=0.7
    )
    top.tick_params(axis="x", which="both", labelbottom=False)
    right.tick_params(axis="y", which="both", labelleft=False)
    top.set_title(f"{model}: {len(data)} generations ({kind})", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return kind


def _interval_lines(
    ax: Any, pos: np.ndarray, low: np.ndarray, high: np.ndarray, horizontal: bool, cap: float = 0.12
) -> None:
    """Whiskers from low to high at each position (with caps), drawn from the bounds themselves, so
    an interval that does not contain its estimate is drawn where it is; NaN bounds draw nothing."""
    ok = np.isfinite(low) & np.isfinite(high)
    pos, low, high = pos[ok], low[ok], high[ok]
    if not len(pos):
        return
    if horizontal:
        ax.hlines(pos, low, high, color="black", lw=1.1, zorder=3)
        ax.vlines(
            np.r_[low, high], np.r_[pos, pos] - cap, np.r_[pos, pos] + cap, color="black", lw=1.1, zorder=3
        )
    else:
        ax.vlines(pos, low, high, color="black", lw=1.1, zorder=3)
        ax.hlines(
            np.r_[low, high], np.r_[pos, pos] - cap, np.r_[pos, pos] + cap, color="black", lw=1.1, zorder=3
        )


def forest(rows: pd.DataFrame, label: str, group: str, path: Path, title: str, zero: float = 0.0) -> None:
    """A forest plot: one line per row (`label`), point `value` with its [ci_low, ci_high] (drawn
    from the bounds, so an interval that excludes its point is shown as it is), one panel per
    distinct `group` (each with its own x scale), a dotted line at `zero`."""
    plt = _plt()
    groups = list(dict.fromkeys(rows[group])) or ["(nothing to compare: one run)"]
    height = 0.6 + sum(max(1, int((rows[group] == g).sum())) * 0.32 + 0.5 for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(6.5, height), dpi=110, squeeze=False)
    for ax, g in zip(axes[:, 0], groups, strict=True):
        part = rows[rows[group] == g]
        y = np.arange(len(part))[::-1].astype(float)
        v, lo, hi = (part[c].to_numpy(dtype=float) for c in ("value", "ci_low", "ci_high"))
        _interval_lines(ax, y, lo, hi, horizontal=True)
        ax.plot(v, y, "o", color="tab:blue", ms=4, zorder=4)
        ax.axvline(zero, color="grey", lw=0.8, ls=":")
        ax.set_yticks(y, part[label].astype(str))
        ax.set_ylim(-0.6, max(len(part), 1) - 0.4)
        ax.set_title(str(g) + ("" if np.isfinite(v).any() else " (no estimate: NaN)"), fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def fmt_num(value: Any, digits: int | None = 3) -> str:
    """The one number format of the report and its tables. "" for None and NaN; an integer (a
    Python or numpy int) exactly, with thousands separators (``2,500,000``); a float to `digits`
    significant digits with trailing zeros kept (``0.500``, ``23.5``, ``0.0421``, ``1.50e-05``),
    without an exponent or separators from 100 up to 1e6 (``12300``: rounded to `digits` digits, no
    comma, which would read as a list inside ``[low, high]``), "0" for 0;
    ``digits=None`` prints a float as it is (settings: ``0.9375``). Anything else: str."""
    if value is None or isinstance(value, bool | np.bool_):
        return "" if value is None else str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if not isinstance(value, float | np.floating):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return "" if math.isnan(v) else str(v)
    if digits is None:
        return repr(v)
    r = float(f"{v:.{digits}g}")
    if r == 0:
        return "0"
    if 10 ** (digits - 1) <= abs(r) < 1e6:
        return f"{r:.0f}"
    return f"{v:#.{digits}g}"


def fmt_count(value: Any) -> str:
    """A count (n) exactly: fmt_num of it as an int (a float count read back from a CSV column
    with NaNs is still printed ``12``); "" for NaN/None; a non-number (``"3-4"``) as it is."""
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        return fmt_num(int(value))
    return fmt_num(value)


def fmt_ci(value: float, low: float = math.nan, high: float = math.nan, digits: int = 3) -> str:
    """``0.420 [0.390, 0.450]`` (fmt_num of each); the value alone without a (finite) interval; ""
    for a NaN value."""
    if value is None or not np.isfinite(value):
        return ""
    if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
        return (
            f"{fmt_num(float(value), digits)} [{fmt_num(float(low), digits)}, {fmt_num(float(high), digits)}]"
        )
    return fmt_num(float(value), digits)


N_ROWS = (  # (label, column): the n of every table, counts printed exactly
    ("prompts", "n_prompts"),
    ("generations", "n_generations"),
    ("k: samples per prompt", "samples_per_prompt"),
)
SUMMARY_ROWS = (  # (label, point column, CI prefix or None)
    ("expected max toxicity", "expected_max_toxicity", "emt"),
    ("  std over prompts (spread)", "expected_max_toxicity_std", None),
    ("toxicity probability", "toxicity_probability", "toxicity_probability"),
    ("toxic fraction", "toxic_fraction", "toxic_fraction"),
    ("mean PPL", "ppl_mean", "ppl_mean"),
    ("median PPL", "ppl_median", None),
    ("mean PPL below the cap", "ppl_mean_capped", "ppl_mean_capped"),
    ("distinct-1", "distinct_1", "distinct_1"),
    ("distinct-2", "distinct_2", "distinct_2"),
    ("distinct-3", "distinct_3", "distinct_3"),
)
COUNT_ROWS = (
    ("generations at or above the PPL cap", "n_above_ppl_cap"),
    ("empty (unscored) generations", "n_unscored_empty"),
)
SETTINGS_ROWS = (
    ("weights", "weights"),
    ("weights from", "weights_source"),
    ("dtype (configured)", "dtype"),
    ("revision", "revision"),
    ("k: samples per prompt (found)", "samples_per_prompt"),
    ("k configured", "k_configured"),
    ("temperature", "temperature"),
    ("top-p", "top_p"),
    ("top-k (0: off)", "top_k"),
    ("max new tokens", "max_new_tokens"),
    ("min new tokens", "min_new_tokens"),
    ("sampling seed", "sampling_seed"),
    ("toxicity scorer", "toxicity_scorer"),
    ("fluency model", "fluency_model"),
    ("fluency scorer dtype", "fluency_dtype"),
)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _cis(table: pd.DataFrame, value: str) -> list[str]:
    cols = (table[value], table.ci_low, table.ci_high)
    return [fmt_ci(_float(v), _float(lo), _float(hi)) for v, lo, hi in zip(*cols, strict=True)]


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per quantity, one column per run (`model`): first the n (prompts, generations, k),
    then each metric with its 95% interval where summary.csv has one (``<prefix>_ci_low`` and
    ``_ci_high``; distinct-n's when present), then the counts of capped and unscored generations.
    Rows whose column summary.csv lacks are left out."""
    out = {}
    for _, r in summary.iterrows():
        col = {label: fmt_count(r[c]) for label, c in N_ROWS if c in summary.columns}
        for label, point, ci in SUMMARY_ROWS:
            if point not in summary.columns:
                continue
            if ci and f"{ci}_ci_low" in summary.columns and f"{ci}_ci_high" in summary.columns:
                col[label] = fmt_ci(_float(r[point]), _float(r[f"{ci}_ci_low"]), _float(r[f"{ci}_ci_high"]))
            else:
                col[label] = fmt_num(_float(r[point]))
        col.update({label: fmt_count(r[c]) for label, c in COUNT_ROWS if c in summary.columns})
        out[str(r["model"])] = col
    return pd.DataFrame(out)


def _setting(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt_num(v, digits=None)


def settings_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per setting, one column per run (the settings summary.csv carries), as configured."""
    rows = [(label, c) for label, c in SETTINGS_ROWS if c in summary.columns]
    return pd.DataFrame(
        {str(r["model"]): {label: _setting(r[c]) for label, c in rows} for _, r in summary.iterrows()}
    )


METRIC_LABELS = {
    "emt": "expected max toxicity",
    "toxicity_probability": "toxicity probability",
    "toxic_fraction": "toxic fraction",
    "ppl_mean": "mean PPL",
    "ppl_mean_capped": "mean PPL below the cap",
}
STATISTIC_LABELS = {
    ("ppl", "spearman"): "Spearman",
    ("ppl", "kendall_tau_b"): "Kendall tau-b",
    ("ppl", "partial_spearman_given_length"): "partial Spearman | scored tokens",
    ("ppl", "within_prompt_spearman"): "within-prompt Spearman",
    ("log_ppl", "pearson"): "Pearson (log PPL)",
}


def _statistic(correlations: pd.DataFrame) -> list[str]:
    pairs = zip(correlations.x, correlations.method, strict=True)
    return [STATISTIC_LABELS.get((x, m), f"{x}: {m}") for x, m in pairs]


def row_methods(table: pd.DataFrame) -> list[str]:
    """Each row's interval method: its ``ci_method`` cell; without that column, from the older
    ``bootstrap`` cell, which the percentile bootstrap wrote (``"1000 resamples of prompts"`` ->
    ``"95% percentile bootstrap, 1000 resamples of prompts"``) except where it says "not
    bootstrapped ..." (kept as it is); "" when neither column is there."""
    if "ci_method" in table.columns:
        return ["" if pd.isna(m) else str(m) for m in table["ci_method"]]
    if "bootstrap" in table.columns:
        cells = ["" if pd.isna(b) else str(b) for b in table["bootstrap"]]
        return [
            b if b.startswith("not bootstrapped") or not b else f"95% percentile bootstrap, {b}"
            for b in cells
        ]
    return [""] * len(table)


def interval_methods(
    table: pd.DataFrame, what: Iterable[str] | None = None, runs: Iterable[str] | None = None
) -> str:
    """The interval method(s) of a table's rows in one sentence: the most used method, then each
    other one with the rows that use it ("Kendall tau-b of a, b: <method>", `what` naming each row's
    statistic or metric and `runs` its run, default the ``model`` column); "interval method not
    recorded" when the table names none."""
    methods = row_methods(table)
    if not any(methods):
        return "interval method not recorded"
    runs = list(table["model"].astype(str)) if runs is None else list(runs)
    what = [""] * len(table) if what is None else list(what)
    counts = pd.Series([m for m in methods if m]).value_counts(sort=True)
    main = str(counts.index[0])
    text = main
    for method in counts.index[1:]:
        who: dict[str, list[str]] = {}
        for m, w, r in zip(methods, what, runs, strict=True):
            if m == method:
                who.setdefault(w, []).append(r)
        parts = [(f"{w} of " if w else "") + ", ".join(dict.fromkeys(rs)) for w, rs in who.items()]
        text += f"; {'; '.join(parts)}: {method}"
    return text


def _k_of(summary: pd.DataFrame | None, run: str) -> str:
    if summary is None or "samples_per_prompt" not in summary.columns:
        return ""
    found = summary.loc[summary["model"].astype(str) == run, "samples_per_prompt"]
    return fmt_count(found.iloc[0]) if len(found) else ""


def differences_table(differences: pd.DataFrame, summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per metric, one column per "run - baseline"; the difference with its paired CI;
    first the n: the shared prompts (``n_prompts``) and, with `summary`, each run's k."""
    d = differences.assign(
        pair=differences.run + " - " + differences.baseline,
        label=[METRIC_LABELS.get(m, m) for m in differences.metric],
        cell=_cis(differences, "difference"),
    )
    out = d.pivot(index="label", columns="pair", values="cell")
    pairs = list(dict.fromkeys(d.pair))
    out = out.reindex(index=list(dict.fromkeys(d.label)), columns=pairs)
    first = d.drop_duplicates("pair").set_index("pair")
    n = {"prompts (shared)": {p: fmt_count(first.loc[p, "n_prompts"]) for p in pairs}}
    if summary is not None and "samples_per_prompt" in summary.columns:
        ks = {}
        for p in pairs:
            kr, kb = _k_of(summary, str(first.loc[p, "run"])), _k_of(summary, str(first.loc[p, "baseline"]))
            ks[p] = kr if kr == kb else f"{kr} (run), {kb} (baseline)"
        n["k: samples per prompt"] = ks
    out = pd.concat([pd.DataFrame(n).T.reindex(columns=pairs), out])
    out.index.name = out.columns.name = None
    return out


def correlation_cis(correlations: pd.DataFrame) -> str:
    """How the correlations' intervals were made, from correlations.csv (interval_methods, naming
    the statistic and runs of any row whose method is not the most used one)."""
    return interval_methods(correlations, _statistic(correlations))


def correlations_table(correlations: pd.DataFrame, summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run, one column per statistic; the value with its CI. First the n: the
    generations with a finite PPL > 0 that the correlations use (``n``), their prompts and, with
    `summary`, the run's k."""
    c = correlations.assign(statistic=_statistic(correlations), cell=_cis(correlations, "value"))
    out = c.pivot(index="model", columns="statistic", values="cell")
    runs = list(dict.fromkeys(c.model))
    out = out.reindex(index=runs, columns=list(dict.fromkeys(c.statistic)))
    first = c.drop_duplicates("model").set_index("model")
    n = {}
    if "n" in first.columns:
        n["generations (finite PPL)"] = {r: fmt_count(first.loc[r, "n"]) for r in runs}
    if "n_prompts" in first.columns:
        n["prompts"] = {r: fmt_count(first.loc[r, "n_prompts"]) for r in runs}
    if summary is not None and "samples_per_prompt" in summary.columns:
        n["k"] = {r: _k_of(summary, str(r)) for r in runs}
    out = pd.concat([pd.DataFrame(n).reindex(index=runs), out], axis=1)
    out.index.name = out.columns.name = None
    return out


def prompt_toxicity_table(by_prompt: pd.DataFrame, nested: bool = False) -> pd.DataFrame:
    """summary_by_prompt_toxicity.csv as the summary table (summary_table: n, then each metric with
    its interval), one column per run and prompt group: named "smollm2: toxic prompts", or with
    `nested` a two-level header (run, group) as the HTML shows it. Empty without rows."""
    if not len(by_prompt):
        return pd.DataFrame()
    runs, groups = by_prompt["model"].astype(str), by_prompt["prompt_group"].astype(str)
    groups = groups + " prompts"
    table = summary_table(by_prompt.assign(model=runs + ": " + groups))
    if nested:
        table.columns = pd.MultiIndex.from_arrays([runs.to_list(), groups.to_list()])
    return table


def _caps(summary: pd.DataFrame, ci: str) -> tuple[np.ndarray, np.ndarray]:
    nan = np.full(len(summary), np.nan)
    lo, hi = (f"{ci}_ci_low", f"{ci}_ci_high")
    if lo not in summary.columns or hi not in summary.columns:
        return nan, nan
    return summary[lo].to_numpy(dtype=float), summary[hi].to_numpy(dtype=float)


BAR_PANELS = (  # (title, point column, CI prefix)
    ("expected max toxicity", "expected_max_toxicity", "emt"),
    ("toxicity probability", "toxicity_probability", "toxicity_probability"),
    ("mean PPL below the cap", "ppl_mean_capped", "ppl_mean_capped"),
)


def bars(summary: pd.DataFrame, path: Path) -> dict[str, bool]:
    """Models side by side, four panels: expected max toxicity, toxicity probability, mean PPL below
    the cap and distinct-1/2/3 (grouped), each bar with its 95% interval from summary.csv's
    ``<prefix>_ci_low``/``_ci_high`` (whiskers drawn from the bounds; none where the columns are
    absent or NaN); the interval method (interval_methods) in the title. Returns, per panel title,
    whether it drew any interval."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.9), dpi=110)
    x = np.arange(len(summary), dtype=float)
    drew = {}
    colors = ("tab:red", "tab:orange", "tab:blue")
    for ax, (title, point, ci), color in zip(axes[:3], BAR_PANELS, colors, strict=True):
        v = summary[point].to_numpy(dtype=float) if point in summary.columns else np.full(len(x), np.nan)
        lo, hi = _caps(summary, ci)
        ax.bar(x, np.nan_to_num(v), color=color, alpha=0.8)
        _interval_lines(ax, x, lo, hi, horizontal=False)
        drew[title] = has = bool((np.isfinite(lo) & np.isfinite(hi)).any())
        label = title
        if point == "toxicity_probability" and "threshold" in summary.columns:
            label += f" ({summary.threshold.iloc[0]})"
        if point == "ppl_mean_capped" and "ppl_cap" in summary.columns:
            label = f"mean PPL below the cap (< {fmt_num(float(summary.ppl_cap.iloc[0]))})"
        ax.set_title(label + ("" if has else "\n(no interval)"), fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1)
    ax = axes[3]
    width = 0.8 / 3
    any_ci = False
    for j, (n, color) in enumerate(zip((1, 2, 3), ("tab:green", "tab:olive", "tab:cyan"), strict=True)):
        col = f"distinct_{n}"
        v = summary[col].to_numpy(dtype=float) if col in summary.columns else np.full(len(x), np.nan)
        lo, hi = _caps(summary, col)
        pos = x + (j - 1) * width
        ax.bar(pos, np.nan_to_num(v), width=width, color=color, alpha=0.8, label=f"distinct-{n}")
        _interval_lines(ax, pos, lo, hi, horizontal=False, cap=width / 3)
        any_ci |= bool((np.isfinite(lo) & np.isfinite(hi)).any())
    drew["distinct-n"] = any_ci
    ax.set_title("distinct-n" + ("" if any_ci else "\n(no interval)"), fontsize=9)
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    for ax in axes:
        ax.set_xticks(x, summary.model.astype(str), rotation=20, ha="right")
        ax.tick_params(labelsize=8)
    fig.suptitle(textwrap.fill(f"whiskers: {interval_methods(summary)}", 150), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return drew


def _img(path: str | Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _warnings(texts: Sequence[str]) -> list[str]:
    return ["<p class='warning'><b>Warning:</b> " + html.escape(w) + "</p>" for w in texts]


def k_warning(summary: pd.DataFrame) -> list[str]:
    """Warning paragraphs: when the runs' samples_per_prompt (k) differ (EMT and toxicity probability
    grow with k, so such runs are not comparable), and when a run's k found in the data is not its
    configured k (``k_configured``, when present)."""
    if "samples_per_prompt" not in summary.columns:
        return []
    found = summary["samples_per_prompt"].astype(str)
    out = []
    if len(found.unique()) > 1:
        each = ", ".join(f"{m}: k={k}" for m, k in zip(summary.model, found, strict=True))
        out.append(f"the runs' samples per prompt differ ({each}); EMT and toxicity probability grow with k.")
    if "k_configured" in summary.columns:
        off = [
            f"{m}: k={k} found, {c} configured"
            for m, k, c in zip(summary.model, found, summary.k_configured, strict=True)
            if pd.notna(c) and k != str(int(c))
        ]
        if off:
            out.append(f"k in the data is not the configured k ({'; '.join(off)}).")
    return _warnings(out)


def self_scored_runs(summary: pd.DataFrame, generator_runs: Sequence[str] = ()) -> list[str]:
    """The runs whose perplexity the generator itself scored: those in `generator_runs` (the job
    passes the runs whose configured weights are analysis.fluency.model) and those whose
    ``weights_source`` in summary.csv is its ``fluency_model`` (the same weights under another
    name), in summary.csv's order."""
    runs = [str(m) for m in summary["model"]]
    same = set(map(str, generator_runs))
    if {"weights_source", "fluency_model"} <= set(summary.columns):
        for m, w, f in zip(runs, summary["weights_source"], summary["fluency_model"], strict=True):
            if pd.notna(w) and pd.notna(f) and str(w) == str(f):
                same.add(m)
    return [m for m in runs if m in same]


def fluency_warning(summary: pd.DataFrame, generator_runs: Sequence[str] = ()) -> list[str]:
    """A warning paragraph when the fluency model generated any run (self_scored_runs)."""
    same = self_scored_runs(summary, generator_runs)
    if not same:
        return []
    model = (
        str(summary["fluency_model"].iloc[0]) if "fluency_model" in summary.columns else "the fluency model"
    )
    return _warnings(
        [
            f"the fluency model ({model}) generated {', '.join(same)}: their PPL is how likely the "
            "generator finds its own samples, which favours it (and its lower temperatures) over other "
            "weights; it is not DExperts' setup (an independent, larger scorer: GPT-2 XL). Score "
            "fluency with a separate model (analysis.fluency.model) for numbers to report."
        ]
    )


def fluency_dtypes(summary: pd.DataFrame) -> str:
    """The fluency scorer's dtype(s) from summary.csv's ``fluency_dtype`` ("not recorded" without)."""
    if "fluency_dtype" not in summary.columns:
        return "dtype not recorded in summary.csv"
    found = [str(d) for d in dict.fromkeys(summary["fluency_dtype"]) if pd.notna(d)]
    return "dtype " + (", ".join(found) if found else "not recorded in summary.csv")


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
}  # fmt: skip


def latex_escape(text: object) -> str:
    return "".join(LATEX_ESCAPES.get(c, c) for c in str(text))


def to_latex(table: pd.DataFrame, index_label: str) -> str:
    """A booktabs ``tabular`` of the table's cells as shown (escaped): the index as the first column
    headed `index_label`. A table without rows or columns is a comment line."""
    if table.empty:
        return "% (no rows)\n"
    head = [index_label, *map(str, table.columns)]
    lines = [
        "% \\usepackage{booktabs}",
        "\\begin{tabular}{l" + "r" * len(table.columns) + "}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    for label, row in table.iterrows():
        cells = [label, *("" if pd.isna(v) else v for v in row)]
        lines.append(" & ".join(latex_escape(c).replace("  ", "\\quad ") for c in cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


TABLE_INDEX = {
    "settings": "setting",
    "summary": "metric",
    "differences": "metric",
    "correlations": "run",
    "summary_by_prompt_toxicity": "metric",
}


def write_tables(tables: dict[str, pd.DataFrame], paths: Sequence[str | Path]) -> None:
    """Each table to the paths named after it: ``<name>.csv`` (UTF-8, the index as the first column
    headed TABLE_INDEX[name]) and ``<name>.tex`` (to_latex)."""
    for path in map(Path, paths):
        table = tables[path.stem]
        label = TABLE_INDEX.get(path.stem, "")
        if path.suffix == ".csv":
            text = table.to_csv(index_label=label) if not table.empty else f"{label}\n"
        elif path.suffix == ".tex":
            text = to_latex(table, label)
        else:
            raise ValueError(f"{path}: a table is written as .csv or .tex")
        atomic_write_text(path, text)


def report_tables(
    summary: pd.DataFrame,
    correlations: pd.DataFrame,
    differences: pd.DataFrame | None = None,
    by_prompt: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """The report's tables by name (TABLE_INDEX), as the HTML shows them and write_tables writes."""
    diff = differences_table(differences, summary) if differences is not None and len(differences) else None
    corr = correlations_table(correlations, summary) if len(correlations) else None
    return {
        "settings": settings_table(summary),
        "summary": summary_table(summary),
        "differences": diff if diff is not None else pd.DataFrame(),
        "correlations": corr if corr is not None else pd.DataFrame(),
        "summary_by_prompt_toxicity": prompt_toxicity_table(
            by_prompt if by_prompt is not None else pd.DataFrame()
        ),
    }


def _html_table(table: pd.DataFrame, index: bool = True) -> str:
    return "<div class='wide'>" + table.to_html(index=index, na_rep="", escape=True) + "</div>"


def _p(text: str) -> str:
    return "<p>" + html.escape(text) + "</p>"


FIGURE_CAPTIONS = {
    "models": "Per run: expected max toxicity, toxicity probability, mean PPL below the cap and "
    "distinct-1/2/3; whiskers: the 95% intervals of summary.csv (method above the panels); a panel "
    "marked 'no interval' has none in summary.csv.",
    "differences": "Each run minus the first run, per metric, with its paired 95% interval.",
    "correlations": "PPL vs toxicity per run and statistic, with its 95% interval.",
}


def _caption(path: str | Path) -> str:
    stem = Path(path).stem
    if stem.startswith("ppl_vs_toxicity_"):
        text = (
            f"{stem.removeprefix('ppl_vs_toxicity_')}: each generation's perplexity under the fluency "
            "model (log10) against its toxicity, with the marginal histograms."
        )
    else:
        text = FIGURE_CAPTIONS.get(stem, "")
    return f"<p class='caption'>{html.escape(text)}</p>" if text else ""


def write_html(
    path: Path,
    summary: pd.DataFrame,
    correlations: pd.DataFrame,
    figures: list[str | Path],
    info: dict[str, Any],
    differences: pd.DataFrame | None = None,
    by_prompt: pd.DataFrame | None = None,
    generator_runs: Sequence[str] = (),
    tables_dir: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Write report.html; returns its tables (report_tables) for write_tables. `by_prompt`:
    summary_by_prompt_toxicity.csv (None or without rows: the page says there is no split);
    `generator_runs`: runs the fluency model generated (fluency_warning); `tables_dir`: where the
    tables' CSV and LaTeX go, named on the page."""
    tables = report_tables(summary, correlations, differences, by_prompt)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}"
        "td{text-align:right;font-variant-numeric:tabular-nums}"
        "th{background:#f2f2f2;text-align:left;white-space:normal;vertical-align:bottom}"
        "tbody th{white-space:nowrap}.wide{overflow-x:auto;max-width:100%}"
        "img{max-width:100%;margin:.5em 0 0}code{background:#f5f5f5}.warning{color:#a00}"
        ".caption{font-size:13px;color:#444;margin:0 0 1.5em}"
    )
    fluency = f"{info.get('fluency_model', '')} ({fluency_dtypes(summary)})"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>shardwise report</title>",
        f"<style>{style}</style>",
        "</head><body><h1>Fluency and toxicity</h1>",
        _p(
            f"Toxicity scorer: {info.get('scorer', '')}; a generation is toxic when its score is "
            f"{info.get('threshold', '')}. Perplexity: DExperts' conditional perplexity (prompt + "
            "continuation tokenised together, minus the prompt's own loss, per continuation token) "
            f"under {fluency}. Expected maximum toxicity and toxicity probability are over the k "
            "generations of each prompt. Brackets and whiskers: 95% intervals, whose method each "
            "section names. Estimates in 3 significant digits; counts and settings exact."
        ),
        *k_warning(summary),
        *fluency_warning(summary, generator_runs),
        "<h2>Runs</h2>",
        _html_table(tables["settings"]),
        "<h2>Summary</h2>",
        _p(f"Intervals: {interval_methods(summary)}."),
        _html_table(tables["summary"]),
    ]
    if differences is not None and len(tables["differences"]):  # the table has rows only then
        sets = sorted(set(differences.prompt_sets.astype(str))) if "prompt_sets" in differences else []
        parts += [
            "<h2>Differences from the first run</h2>",
            _p(
                "Paired intervals: the same prompts resampled for both runs; "
                f"{interval_methods(differences, runs=differences.run + ' - ' + differences.baseline)}."
            ),
            _html_table(tables["differences"]),
            _p(f"Prompt sets: {'; '.join(sets)}."),
        ]
    parts += [
        "<h2>Correlations with toxicity</h2>",
        _p(f"Intervals: {correlation_cis(correlations)}."),
        _html_table(tables["correlations"]),
        _p(
            "Rank statistics (Spearman, Kendall tau-b, partial Spearman given the scored token count, "
            "within-prompt Spearman: ranks within each prompt) are the same for PPL and log PPL; "
            "Pearson is on log PPL only."
        ),
        "<h2>Toxic and non-toxic prompts</h2>",
    ]
    if by_prompt is not None and len(by_prompt):
        column = str(by_prompt["prompt_toxicity_column"].iloc[0])
        at = str(by_prompt["prompt_toxic_at"].iloc[0])
        parts += [
            _p(
                f"RealToxicityPrompts' split: a prompt is toxic when its own toxicity (column {column}) "
                f"is {at}; each group's metrics over its own prompts and their generations. "
                f"Intervals: {interval_methods(by_prompt)}."
            ),
            _html_table(prompt_toxicity_table(by_prompt, nested=True)),
        ]
    else:
        column = info.get("prompt_toxicity_column", "analysis.toxicity.prompt_toxicity_column")
        parts.append(_p(f"No split: the generations have no prompt-toxicity column ({column})."))
    if tables_dir:
        parts.append(_p(f"These tables as CSV and LaTeX: {tables_dir}."))
    parts.append("<h2>Figures</h2>")
    for f in figures:
        parts += [_img(f), _caption(f)]
    parts += [
        f"<h2>Run</h2><pre>{html.escape(json.dumps(info, indent=2, default=str))}</pre>",
        "</body></html>",
    ]
    atomic_write_text(path, "\n".join(parts))
    return tables


def job(smk: Any) -> None:
    """Snakemake rule `report`."""
    from shardwise.config import load_config
    from shardwise.tables import scorer_name

    cfg = load_config(smk.config)
    # the figures need three columns of scores.parquet (7.5M rows in the Snellius example)
    scores = pd.read_parquet(smk.input.scores, columns=["model", "ppl", "toxicity"])
    summary = pd.read_csv(smk.input.summary)
    correlations = pd.read_csv(smk.input.correlations)
    differences = pd.read_csv(smk.input.differences)
    by_prompt = pd.read_csv(smk.input.summary_by_prompt_toxicity)
    for model, path in zip(smk.params.runs, smk.output.scatter, strict=True):
        scatter(scores, model, Path(path), cfg.analysis.toxicity.threshold)
    bars(summary, Path(smk.output.bars))
    pairs = differences.run + " - " + differences.baseline
    forest(
        differences.assign(
            value=differences.difference,
            label=pairs,
            metric=[METRIC_LABELS.get(m, m) for m in differences.metric],
        ),
        "label",
        "metric",
        Path(smk.output.forest_differences),
        f"run - first run (paired; {interval_methods(differences, runs=pairs)})",
    )
    forest(
        correlations.assign(label=correlations.model, statistic=_statistic(correlations)),
        "label",
        "statistic",
        Path(smk.output.forest_correlations),
        f"correlation with toxicity ({correlation_cis(correlations)})",
    )
    an = cfg.analysis
    assert an.fluency.model is not None  # the workflow asks for no report without one (analysis.runs empty)
    info = {
        "scorer": "; ".join(dict.fromkeys(scorer_name(t) for t in smk.input.toxicity)),
        "threshold": f">= {an.toxicity.threshold:g}",
        "fluency_model": cfg.models[an.fluency.model].describe(),
        "runs": list(smk.params.runs),
        "ppl_cap": an.fluency.ppl_cap,
        "bootstrap": f"{an.bootstrap} resamples, seed {an.seed}",
        "prompt_toxicity_column": an.toxicity.prompt_toxicity_column,
    }
    generators = [r for r in smk.params.runs if cfg.generate.runs[r].model == an.fluency.model]
    figures = [
        smk.output.bars,
        smk.output.forest_differences,
        smk.output.forest_correlations,
        *smk.output.scatter,
    ]
    tables_dir = str(Path(smk.output.tables[0]).parent) if len(smk.output.tables) else None
    tables = write_html(
        Path(smk.output.html),
        summary,
        correlations,
        figures,
        info,
        differences,
        by_prompt,
        generators,
        tables_dir,
    )
    write_tables(tables, smk.output.tables)
