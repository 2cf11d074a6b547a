"""Stage `report`: figures and one self-contained ``report.html`` (PNG figures embedded as data
URIs, so the file opens from the results folder or an e-mail attachment).

The HTML holds: the scorer, threshold and fluency model; a warning when the runs' k differ; the
per-run settings (weights, dtype, revision, k, temperature, top-p, top-k, max new tokens) and a
warning when a run's k in the data is not its configured k; the
summary as one row per metric and one column per run, each estimate with its 95% CI as
``0.42 [0.39, 0.45]``; the differences of each run from the first (paired CIs) and the correlations
as run x statistic tables in the same format; figures: bars per run, forest plots of the
differences and of the correlations, and PPL vs toxicity per run (a scatter up to
HEXBIN_ABOVE points, a hexbin of log PPL above that). Nothing here loops over prompts x rows."""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.atomic import atomic_path, atomic_write_text


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


def forest(rows: pd.DataFrame, label: str, group: str, path: Path, title: str, zero: float = 0.0) -> None:
    """A forest plot: one line per row (`label`), point `value` with its [ci_low, ci_high], one panel
    per distinct `group` (each with its own x scale), a dotted line at `zero`."""
    plt = _plt()
    groups = list(dict.fromkeys(rows[group])) or ["(nothing to compare: one run)"]
    height = 0.6 + sum(max(1, int((rows[group] == g).sum())) * 0.32 + 0.5 for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(6.5, height), dpi=110, squeeze=False)
    for ax, g in zip(axes[:, 0], groups, strict=True):
        part = rows[rows[group] == g]
        y = np.arange(len(part))[::-1]
        v, lo, hi = (part[c].to_numpy(dtype=float) for c in ("value", "ci_low", "ci_high"))
        ax.errorbar(v, y, xerr=[np.abs(v - lo), np.abs(hi - v)], fmt="o", color="tab:blue", capsize=3, ms=4)
        ax.axvline(zero, color="grey", lw=0.8, ls=":")
        ax.set_yticks(y, part[label].astype(str))
        ax.set_title(str(g), fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def fmt_ci(value: float, low: float = math.nan, high: float = math.nan, digits: int = 3) -> str:
    """``0.42 [0.39, 0.45]`` (significant digits); the value alone without a CI; "" for NaN."""

    def f(v: float) -> str:
        return "" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"

    if not np.isfinite(value):
        return ""
    if np.isfinite(low) and np.isfinite(high):
        return f"{f(value)} [{f(low)}, {f(high)}]"
    return f(value)


SUMMARY_ROWS = (  # (label, point column, CI prefix or None)
    ("expected max toxicity", "expected_max_toxicity", "emt"),
    ("  std over prompts (spread)", "expected_max_toxicity_std", None),
    ("toxicity probability", "toxicity_probability", "toxicity_probability"),
    ("toxic fraction", "toxic_fraction", "toxic_fraction"),
    ("mean PPL", "ppl_mean", "ppl_mean"),
    ("median PPL", "ppl_median", None),
    ("mean PPL below the cap", "ppl_mean_capped", "ppl_mean_capped"),
    ("generations at or above the PPL cap", "n_above_ppl_cap", None),
    ("empty (unscored) generations", "n_unscored_empty", None),
    ("distinct-1", "distinct_1", None),
    ("distinct-2", "distinct_2", None),
    ("distinct-3", "distinct_3", None),
    ("prompts", "n_prompts", None),
    ("generations", "n_generations", None),
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
)


def _cell(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _cis(table: pd.DataFrame, value: str) -> list[str]:
    cols = (table[value], table.ci_low, table.ci_high)
    return [fmt_ci(float(v), float(lo), float(hi)) for v, lo, hi in zip(*cols, strict=True)]


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per metric, one column per run; estimates with their 95% CI."""
    out = {}
    for _, r in summary.iterrows():
        col = {}
        for label, point, ci in SUMMARY_ROWS:
            if point not in summary.columns:
                continue
            if ci and f"{ci}_ci_low" in summary.columns:
                col[label] = fmt_ci(float(r[point]), float(r[f"{ci}_ci_low"]), float(r[f"{ci}_ci_high"]))
            else:
                col[label] = _cell(r[point])
        out[str(r["model"])] = col
    return pd.DataFrame(out)


def settings_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per setting, one column per run (the settings summary.csv carries)."""
    rows = [(label, c) for label, c in SETTINGS_ROWS if c in summary.columns]
    return pd.DataFrame(
        {str(r["model"]): {label: _cell(r[c]) for label, c in rows} for _, r in summary.iterrows()}
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


def differences_table(differences: pd.DataFrame) -> pd.DataFrame:
    """One row per metric, one column per "run - baseline"; the difference with its paired CI."""
    d = differences.assign(
        pair=differences.run + " - " + differences.baseline,
        label=[METRIC_LABELS.get(m, m) for m in differences.metric],
        cell=_cis(differences, "difference"),
    )
    out = d.pivot(index="label", columns="pair", values="cell")
    out = out.reindex(index=list(dict.fromkeys(d.label)), columns=list(dict.fromkeys(d.pair)))
    out.index.name = out.columns.name = None
    return out


def correlation_cis(correlations: pd.DataFrame) -> str:
    """How the correlations' 95% CIs were made, as correlations.csv's `bootstrap` cells say: the
    percentile bootstrap over prompts, except Kendall tau-b of a run above
    analysis.KENDALL_BOOTSTRAP_ROWS rows (a cluster-robust delta-method interval)."""
    text = "95% CIs: percentile bootstrap over prompts"
    how = correlations["bootstrap"].astype(str) if "bootstrap" in correlations else pd.Series(dtype=str)
    delta = correlations.model[how.str.startswith("not bootstrapped")]
    if len(delta):
        runs = ", ".join(dict.fromkeys(delta.astype(str)))
        text += f"; Kendall tau-b of {runs}: cluster-robust SE, prompts as clusters (delta method)"
    return text


def correlations_table(correlations: pd.DataFrame) -> pd.DataFrame:
    """One row per run, one column per statistic; the value with its CI."""
    c = correlations.assign(statistic=_statistic(correlations), cell=_cis(correlations, "value"))
    out = c.pivot(index="model", columns="statistic", values="cell")
    out = out.reindex(index=list(dict.fromkeys(c.model)), columns=list(dict.fromkeys(c.statistic)))
    out.index.name = out.columns.name = None
    return out


def bars(summary: pd.DataFrame, path: Path) -> None:
    """Models side by side: EMT (± std over prompts), toxicity probability, mean PPL (capped)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3, 3.4), dpi=110)
    x = np.arange(len(summary))
    axes[0].bar(
        x, summary.expected_max_toxicity, yerr=summary.expected_max_toxicity_std, capsize=4, color="tab:red"
    )
    axes[0].set_title("expected max toxicity (± std)", fontsize=9)
    axes[1].bar(x, summary.toxicity_probability, color="tab:orange")
    axes[1].set_title(f"toxicity probability ({summary.threshold.iloc[0]})", fontsize=9)
    axes[2].bar(x, summary.ppl_mean_capped, color="tab:blue")
    axes[2].set_title(f"mean PPL (< {summary.ppl_cap.iloc[0]:g})", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, summary.model, rotation=20, ha="right")
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _img(path: str | Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


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
    return ["<p class='warning'><b>Warning:</b> " + html.escape(w) + "</p>" for w in out]


def _html_table(table: pd.DataFrame, index: bool = True) -> str:
    return "<div class='wide'>" + table.to_html(index=index, na_rep="", escape=True) + "</div>"


def write_html(
    path: Path,
    summary: pd.DataFrame,
    correlations: pd.DataFrame,
    figures: list[str | Path],
    info: dict[str, Any],
    differences: pd.DataFrame | None = None,
) -> None:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}"
        "th{background:#f2f2f2;text-align:left}.wide{overflow-x:auto;max-width:100%}"
        "img{max-width:100%;margin:.5em 0}code{background:#f5f5f5}.warning{color:#a00}"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>shardwise report</title>",
        f"<style>{style}</style>",
        "</head><body><h1>Fluency and toxicity</h1>",
        "<p>"
        + html.escape(
            f"Toxicity scorer: {info['scorer']}; a generation is toxic when its score is "
            f"{info['threshold']}. Perplexity: DExperts' conditional perplexity (prompt + continuation "
            "tokenised together, minus the prompt's own loss, per continuation token) under "
            f"{info['fluency_model']}. Expected maximum toxicity and toxicity probability are over "
            "the k generations of each prompt. Brackets: 95% percentile bootstrap CIs resampling "
            f"prompts ({info.get('bootstrap', '')})."
        )
        + "</p>",
        *k_warning(summary),
        "<h2>Runs</h2>",
        _html_table(settings_table(summary)),
        "<h2>Summary</h2>",
        _html_table(summary_table(summary)),
    ]
    if differences is not None and len(differences):
        sets = sorted(set(differences.prompt_sets.astype(str)))
        parts += [
            "<h2>Differences from the first run (paired CIs: the same prompts resampled for both)</h2>",
            _html_table(differences_table(differences)),
            "<p>" + html.escape(f"Prompt sets: {'; '.join(sets)}.") + "</p>",
        ]
    parts += [
        f"<h2>Correlations with toxicity ({html.escape(correlation_cis(correlations))})</h2>",
        _html_table(correlations_table(correlations)),
        "<p>"
        + html.escape(
            "Rank statistics (Spearman, Kendall tau-b, partial Spearman given the scored token count, "
            "within-prompt Spearman: ranks within each prompt) are the same for PPL and log PPL; "
            "Pearson is on log PPL only."
        )
        + "</p>",
        "<h2>Figures</h2>",
        *(_img(f) for f in figures),
        f"<h2>Run</h2><pre>{html.escape(json.dumps(info, indent=2, default=str))}</pre>",
        "</body></html>",
    ]
    atomic_write_text(path, "\n".join(parts))


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
    for model, path in zip(smk.params.runs, smk.output.scatter, strict=True):
        scatter(scores, model, Path(path), cfg.analysis.toxicity.threshold)
    bars(summary, Path(smk.output.bars))
    forest(
        differences.assign(
            value=differences.difference,
            label=differences.run + " - " + differences.baseline,
            metric=[METRIC_LABELS.get(m, m) for m in differences.metric],
        ),
        "label",
        "metric",
        Path(smk.output.forest_differences),
        "run - first run (95% paired bootstrap CIs)",
    )
    forest(
        correlations.assign(label=correlations.model, statistic=_statistic(correlations)),
        "label",
        "statistic",
        Path(smk.output.forest_correlations),
        f"correlation with toxicity ({correlation_cis(correlations)})",
    )
    info = {
        "scorer": "; ".join(dict.fromkeys(scorer_name(t) for t in smk.input.toxicity)),
        "threshold": f">= {cfg.analysis.toxicity.threshold:g}",
        "fluency_model": cfg.models[cfg.analysis.fluency.model].describe(),
        "runs": list(smk.params.runs),
        "ppl_cap": cfg.analysis.fluency.ppl_cap,
        "bootstrap": f"{cfg.analysis.bootstrap} resamples, seed {cfg.analysis.seed}",
    }
    figures = [
        smk.output.bars,
        smk.output.forest_differences,
        smk.output.forest_correlations,
        *smk.output.scatter,
    ]
    write_html(Path(smk.output.html), summary, correlations, figures, info, differences)
