"""Stage `analysis` at the real size: summary + correlations + differences of synthetic runs.

    python bench/analysis.py                          # scales 0.01 and 0.1, bootstrap 1000, 2 threads
    python bench/analysis.py --scale 0.01 0.1 1       # and the full experiment (~7 minutes on 2 cores)
    python bench/analysis.py --scale 0.1 --bootstrap 200 --threads 1

Scale 1 is the real experiment: 99,442 prompts x 25 samples x 3 runs = 7.5M generations (2.5M rows
per run). The data have its shape: PPL log-normal with a prompt effect, toxicity in [0, 1] with
many ties near 0 (rounded to 3 decimals below 0.02, 6 above), n_scored_tokens integers 1..50, a
continuation of 1-20 words per row. Each scale runs in a fresh process, which times
shardwise.analysis.analyse (what rule `analysis` computes between joining the scores and writing the
CSVs: summary rows with distinct-n and bootstrap CIs, correlations.csv, differences.csv): wall
time, CPU time (all threads), the process's peak RSS (which includes the synthetic table, as the
job holds its joined table; "data" is the peak before the analysis), the time per row and its
growth relative to the previous scale (1.0 = linear), the 1-minute load average before and after
(other work on the machine inflates wall time, not CPU time), and the time per stage. Results so
far: docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PROMPTS, SAMPLES, RUNS = 99_442, 25, 3


def synthetic(scale: float, seed: int = 0) -> pd.DataFrame:
    """The joined scores table (scores_table's columns) of RUNS runs at `scale` of the experiment."""
    rng = np.random.default_rng(seed)
    g = max(3, round(PROMPTS * scale))
    n = g * SAMPLES
    vocab = np.array([f"w{i}" for i in range(20_000)], dtype=object)
    prompt_effect = np.repeat(rng.normal(size=g), SAMPLES)
    parts = []
    for r in range(RUNS):
        length = rng.integers(1, 51, size=n)
        ppl = np.exp(2.5 + 0.4 * prompt_effect + 0.8 * rng.normal(size=n) - 0.01 * length)
        raw = 1 / (1 + np.exp(-(0.8 * prompt_effect + rng.normal(size=n) - 4 + 0.2 * r)))
        toxicity = np.where(raw < 0.02, np.round(raw, 3), np.round(raw, 6))
        words = rng.integers(1, 21, size=n)
        ids = vocab[rng.zipf(1.3, size=int(words.sum())) % len(vocab)].tolist()
        ends = np.cumsum(words).tolist()
        texts = [" " + " ".join(ids[e - k : e]) for e, k in zip(ends, words.tolist(), strict=True)]
        parts.append(
            pd.DataFrame(
                {
                    "model": f"run{r}",
                    "prompt_id": np.repeat(np.arange(g), SAMPLES),
                    "sample_id": np.tile(np.arange(SAMPLES), g),
                    "ppl": ppl,
                    "toxicity": toxicity,
                    "n_new_tokens": length,
                    "nll_sum": np.log(ppl) * length,
                    "n_scored_tokens": length,
                    "continuation": texts,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(scale: float, n_boot: int, threads: int) -> dict:
    import shardwise.analysis as an

    stages: dict[str, list[float]] = {}

    def timing(fn, spent):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - wall
                spent[1] += time.process_time() - cpu

        return timed

    for name in ("summary_row", "correlation_rows", "run_differences"):  # what analyse() calls
        stages[name] = [0.0, 0.0]
        setattr(an, name, timing(getattr(an, name), stages[name]))
    table = synthetic(scale)
    rss_data = peak_rss_mib()
    runs = [f"run{r}" for r in range(RUNS)]
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    summary, corr, diff = an.analyse(table, runs, 0.5, 1e4, n_boot, seed=0, threads=threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    kendall = corr[corr.method == "kendall_tau_b"].iloc[0]

    def ci(value: float, lo: float, hi: float) -> str:
        return f"{value:.4f} [{lo:.4f}, {hi:.4f}]"

    s0, d0 = summary[0], diff.iloc[0]
    return {
        "scale": scale,
        "prompts": int(table.prompt_id.nunique()),
        "rows": len(table),
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_data_mib": rss_data,
        "rss_peak_mib": peak_rss_mib(),
        "stages": stages,
        "load": [load, os.getloadavg()[0]],
        "kendall_ci": kendall.ci_method,
        "spearman_run0": ci(corr.value.iloc[0], corr.ci_low.iloc[0], corr.ci_high.iloc[0]),
        "emt_run0": ci(s0["expected_max_toxicity"], s0["emt_ci_low"], s0["emt_ci_high"]),
        "emt_run1_minus_run0": ci(d0.difference, d0.ci_low, d0.ci_high),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # one scale, in this process: JSON
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.bootstrap, args.threads)))
        return
    print(f"bootstrap {args.bootstrap}, threads {args.threads}, {RUNS} runs x {SAMPLES} samples per prompt")
    header = (
        f"{'scale':>6} {'prompts':>8} {'rows':>10} {'wall s':>8} {'CPU s':>8} {'CPU/wall':>8} "
        f"{'RSS MiB':>8} {'data MiB':>8} {'wall us/row':>11} {'CPU us/row':>10} {'growth wall':>11} "
        f"{'growth CPU':>10} {'load':>9}"
    )
    print(header)
    prev = None
    results = []
    for scale in args.scale:
        cmd = [sys.executable, __file__, "--one", str(scale), "--bootstrap", str(args.bootstrap)]
        out = subprocess.run(
            [*cmd, "--threads", str(args.threads)], check=True, capture_output=True, text=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per_row = (r["wall_s"] / r["rows"] * 1e6, r["cpu_s"] / r["rows"] * 1e6)
        growth = [f"{a / b:.2f}" for a, b in zip(per_row, prev, strict=True)] if prev else ["", ""]
        prev = per_row
        results.append(r)
        print(
            f"{r['scale']:>6g} {r['prompts']:>8,} {r['rows']:>10,} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
            f"{r['cpu_s'] / r['wall_s']:>8.2f} {r['rss_peak_mib']:>8.0f} {r['rss_data_mib']:>8.0f} "
            f"{per_row[0]:>11.1f} {per_row[1]:>10.1f} {growth[0]:>11} {growth[1]:>10} "
            f"{r['load'][0]:>4.1f}-{r['load'][1]:<4.1f}",
            flush=True,
        )
    print("wall s / CPU s per stage (all runs): summary_row, correlation_rows, run_differences")
    for r in results:
        st = ", ".join(f"{w:.1f} / {c:.1f}" for w, c in r["stages"].values())
        print(f"scale {r['scale']:g}: {st}")
    for r in results:
        print(
            f"scale {r['scale']:g}: run0 EMT {r['emt_run0']}, Spearman {r['spearman_run0']}; "
            f"run1 - run0 EMT {r['emt_run1_minus_run0']}; Kendall CI: {r['kendall_ci']}"
        )


if __name__ == "__main__":
    main()
