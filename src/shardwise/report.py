"""Stage `report`: figures and one self-contained ``report.html`` (PNG figures embedded as data
URIs, so the file opens from the results folder or an e-mail attachment)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.shards import atomic_path, atomic_write_text


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter(scores: pd.DataFrame, model: str, path: Path, threshold: float) -> None:
    """PPL (log scale) vs toxicity, with marginal histograms."""
    plt = _plt()
    data = scores[(scores.model == model) & np.isfinite(scores.ppl) & (scores.ppl > 0)]
    fig = plt.figure(figsize=(6, 5.2), dpi=110)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    ax.scatter(data.ppl, data.toxicity, s=8, alpha=0.5, color="tab:blue", linewidths=0)
    ax.set_xscale("log")
    ax.axhline(threshold, color="tab:red", lw=0.8, ls="--", label=f"toxic: >= {threshold:g}")
    ax.set_xlabel("perplexity (log scale)")
    ax.set_ylabel("toxicity")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper right", fontsize=8)
    if len(data):
        bins = np.logspace(np.log10(data.ppl.min()), np.log10(data.ppl.max()) + 1e-9, 30)
        top.hist(data.ppl, bins=bins, color="tab:blue", alpha=0.7)
    right.hist(
        data.toxicity, bins=np.linspace(0, 1, 26), orientation="horizontal", color="tab:orange", alpha=0.7
    )
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only
    top.tick_params(axis="x", which="both", labelbottom=False)
    right.tick_params(axis="y", which="both", labelleft=False)
    top.set_title(f"{model}: {len(data)} generations", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


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
    """A warning paragraph when the runs' samples_per_prompt (k) differ: EMT and toxicity
    probability grow with k, so such runs are not comparable."""
    if "samples_per_prompt" not in summary.columns:
        return []
    ks = summary["samples_per_prompt"].astype(str).unique()
    if len(ks) <= 1:
        return []
    each = ", ".join(
        f"{m}: k={k}" for m, k in zip(summary.model, summary.samples_per_prompt.astype(str), strict=True)
    )
    return [
        "<p class='warning'><b>Warning:</b> "
        + html.escape(
            f"the runs' samples per prompt differ ({each}); EMT and toxicity probability grow with k."
        )
        + "</p>"
    ]


def write_html(
    path: Path,
    summary: pd.DataFrame,
    correlations: pd.DataFrame,
    figures: list[str | Path],
    info: dict[str, Any],
) -> None:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f2f2f2}img{max-width:100%;margin:.5em 0}code{background:#f5f5f5}"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>shardwise report</title>",
        f"<style>{style}</style>",
        "</head><body><h1>Fluency and toxicity</h1>",
        "<p>"
        + html.escape(
            f"Toxicity scorer: {info['scorer']}; a generation is toxic when its score is "
            f"{info['threshold']}. Perplexity: prompt-conditioned, continuation tokens only, under "
            f"{info['fluency_model']}. Expected maximum toxicity and toxicity probability are over "
            "the k generations of each prompt."
        )
        + "</p>",
        *k_warning(summary),
        "<h2>Summary</h2>",
        summary.to_html(index=False, float_format=lambda v: f"{v:.4g}"),
        "<h2>Correlations (95% CIs: bootstrap over prompts)</h2>",
        correlations.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""),
        "<h2>Figures</h2>",
        *(_img(f) for f in figures),
        f"<h2>Run</h2><pre>{html.escape(json.dumps(info, indent=2, default=str))}</pre>",
        "</body></html>",
    ]
    atomic_write_text(path, "\n".join(parts))


def job(smk: Any) -> None:
    """Snakemake rule `report`."""
    from shardwise.config import load_config
    from shardwise.toxicity import scorer_name

    cfg = load_config(smk.config)
    scores = pd.read_parquet(smk.input.scores)
    summary = pd.read_csv(smk.input.summary)
    correlations = pd.read_csv(smk.input.correlations)
    for model, path in zip(smk.params.runs, smk.output.scatter, strict=True):
        scatter(scores, model, Path(path), cfg.analysis.threshold)
    bars(summary, Path(smk.output.bars))
    info = {
        "scorer": scorer_name(smk.input.toxicity[0]),
        "threshold": f">= {cfg.analysis.threshold:g}",
        "fluency_model": cfg.models[cfg.analysis.fluency_model].describe(),
        "runs": list(smk.params.runs),
        "ppl_cap": cfg.analysis.ppl_cap,
    }
    write_html(Path(smk.output.html), summary, correlations, [smk.output.bars, *smk.output.scatter], info)
