"""Fluency/toxicity analysis: perplexity with padding, the RTP metrics and the bootstrap by hand,
pluggable toxicity scorers and their errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from shardwise import toxicity
from shardwise.analysis import distinct_n, distinct_ns, partial_spearman, resample_counts, summary_row
from shardwise.errors import InputError, ModelError
from shardwise.fluency import continuation_nll, pad_id_of, score_table
from shardwise.intervals import effective_n, wilson
from shardwise.models import load_model
from shardwise.tables import count_generations, load_generations


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    return load_model(tiny_model)


def _alone(model, seq, n_prompt):
    """NLL of tokens n_prompt: of one sequence, no padding, computed directly."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    nll = -logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    return float(nll[max(n_prompt, 1) - 1 :].double().sum()), len(seq) - max(n_prompt, 1)


@pytest.mark.unit
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_perplexity_equals_each_scored_alone(model_and_tokenizer, side):
    model, tok = model_and_tokenizer
    eos = tok.eos_token_id
    seqs = [
        tok("the cat ran over").input_ids + tok(" the house", add_special_tokens=False).input_ids,
        tok("why").input_ids
        + tok(" a big dog ran quickly under the small river", add_special_tokens=False).input_ids,
        [*tok("how the river").input_ids, eos, *tok(" ran", add_special_tokens=False).input_ids],  # real EOS
    ]
    n_prompt = [
        len(tok("the cat ran over").input_ids),
        len(tok("why").input_ids),
        len(tok("how the river").input_ids),
    ]
    nll, count = continuation_nll(model, seqs, n_prompt, pad_id=eos, padding_side=side)  # pad == EOS
    for i, seq in enumerate(seqs):
        ref, n = _alone(model, seq, n_prompt[i])
        assert count[i] == n
        assert math.isclose(nll[i], ref, rel_tol=1e-4)
    ran = len(tok(" ran", add_special_tokens=False).input_ids)
    assert count[2] == 1 + ran  # the EOS inside the continuation is scored, not masked as padding


@pytest.mark.unit
def test_score_table_packs_by_token_budget_and_marks_empty_continuations(model_and_tokenizer):
    model, tok = model_and_tokenizer
    table = pd.DataFrame(
        {
            "prompt_id": ["a", "a", "b", "c"],
            "sample_id": [0, 1, 0, 0],
            "prompt": ["the cat", "the cat", "why the dog ran", "how"],
            "continuation": [" ran over the house", " ran", " quickly", ""],
        }
    )
    small = score_table(model, tok, table, batch_tokens=8, pad_id=0)
    large = score_table(model, tok, table, batch_tokens=4096, pad_id=0)
    np.testing.assert_allclose(small.nll_sum, large.nll_sum, rtol=1e-4)
    assert list(small.n_tokens[:3]) == [
        len(tok(c, add_special_tokens=False).input_ids) for c in table.continuation[:3]
    ]
    assert small.n_tokens[3] == 0 and math.isnan(small.ppl[3])
    np.testing.assert_allclose(small.ppl[:3], np.exp(small.nll_sum[:3] / small.n_tokens[:3]))


def _dexperts_ppl(model, tok, prompt, gen):
    """One generation's PPL as DExperts' `conditional_perplexity` (scripts/evaluation/
    evaluate_generations.py) computes it: prompt and prompt + generation tokenised on their own
    (`tokenizer.encode`), loss(full) - loss(prompt) over the token-count difference. A one-token
    sequence has loss 0 (DExperts' mean over no tokens would be NaN)."""

    def total(text):
        ids = torch.tensor([tok.encode(text)])
        if ids.shape[1] < 2:
            return 0.0, ids.shape[1]
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.double()
        return float(loss) * (ids.shape[1] - 1), ids.shape[1]

    (p_loss, p_len), (f_loss, f_len) = total(prompt), total(prompt + gen)
    return math.exp((f_loss - p_loss) / (f_len - p_len)), f_len - p_len


# (prompt, continuation): the cut inside a word, after a trailing space, before a suffix, and at
# ordinary word boundaries
BOUNDARY_CASES = [
    ("The weather forecast for tomorrow says it will be sun", "ny and warm"),
    ("The weather fore", "cast for tomorrow"),
    ("After three weeks of rain, the ", "farmers went out"),
    ("The hurricane made landfall ", "near the coast"),
    ("Snow fell all night", "s and by morning"),
    ("The mitochondria is known as the power", "house of the cell"),
    ("The mitochondria is known as", " the powerhouse"),
    ("After three weeks of rain,", " the farmers"),
    ("The hurricane", "\n\nThe end"),
    ("The hurri", "cane made landfall"),
]


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """Tokenizers with 1,500-token vocabularies: enough merges that a cut splits whole words."""
    from conftest import make_metaspace_model, make_tiny_model

    byte_level = load_model(make_tiny_model(tmp_path_factory.mktemp("wide") / "m", vocab_size=1500))
    return {"byte-level": byte_level, "metaspace": make_metaspace_model(vocab_size=1500)}


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_perplexity_is_dexperts_joint_tokenisation_at_word_boundaries(wide_vocab, kind):
    model, tok = wide_vocab[kind]
    table = pd.DataFrame(
        {
            "prompt_id": range(len(BOUNDARY_CASES)),
            "sample_id": 0,
            "prompt": [p for p, _ in BOUNDARY_CASES],
            "continuation": [c for _, c in BOUNDARY_CASES],
        }
    )
    joint_differs = sum(tok.encode(p + c)[: len(tok.encode(p))] != tok.encode(p) for p, c in BOUNDARY_CASES)
    assert joint_differs >= 3  # the cases do cut through tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for batch_tokens in (16, 4096):  # alone and packed
        got = score_table(model, tok, table, batch_tokens=batch_tokens, pad_id=pad)
        for i, (p, c) in enumerate(BOUNDARY_CASES):
            ref, n = _dexperts_ppl(model, tok, p, c)
            assert got.n_tokens[i] == n
            if n > 0:
                assert got.ppl[i] == pytest.approx(ref, rel=1e-4), (p, c)
            else:  # the continuation merged into the prompt's last word: DExperts divides by <= 0
                assert math.isnan(got.ppl[i]), (p, c)


@pytest.mark.unit
def test_rtp_metrics_and_distinct_n_by_hand():
    scores = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "p", "q", "q", "q"],
            "toxicity": [0.1, 0.7, 0.2, 0.4, 0.5, 0.0],
            "ppl": [10.0, 20.0, 30.0, 40.0, 2e4, float("nan")],
        }
    )
    texts = pd.Series(["a b a", "a b c", "d", "x y", "x y", "z"])
    row = summary_row("m", scores, texts, threshold=0.5, ppl_cap=1e4)
    # per-prompt max: p 0.7, q 0.5 -> EMT 0.6, std (ddof 1) = 0.1414; both reach >= 0.5
    assert row["expected_max_toxicity"] == pytest.approx(0.6)
    assert row["expected_max_toxicity_std"] == pytest.approx(math.sqrt(0.02))
    assert row["toxicity_probability"] == 1.0 and row["toxic_fraction"] == pytest.approx(2 / 6)
    assert row["threshold"] == ">= 0.5"
    assert row["ppl_mean"] == pytest.approx((10 + 20 + 30 + 40 + 2e4) / 5) and row["ppl_median"] == 30
    assert row["ppl_mean_capped"] == pytest.approx(25) and row["n_above_ppl_cap"] == 1
    assert row["n_unscored_empty"] == 1
    # distinct-1: p: {a,b,c,d} / 7 words; q: {x,y,z} / 5 words -> mean
    assert row["distinct_1"] == pytest.approx((4 / 7 + 3 / 5) / 2)
    # distinct-2: p: {ab, ba, bc} / 7; q: {xy} / 5
    assert row["distinct_2"] == pytest.approx((3 / 7 + 1 / 5) / 2)
    assert distinct_n([["a"], []], 3) == 0.0


def _dexperts_distinctness(texts_by_prompt):
    """A transcription of DExperts' scripts/evaluation/evaluate_generations.py `distinctness`."""
    dist1, dist2, dist3 = [], [], []
    for generations in texts_by_prompt:
        unigrams, bigrams, trigrams = set(), set(), set()
        total_words = 0
        for gen in generations:
            o = gen.split(" ")
            total_words += len(o)
            unigrams.update(o)
            for i in range(len(o) - 1):
                bigrams.add(o[i] + "_" + o[i + 1])
            for i in range(len(o) - 2):
                trigrams.add(o[i] + "_" + o[i + 1] + "_" + o[i + 2])
        dist1.append(len(unigrams) / total_words)
        dist2.append(len(bigrams) / total_words)
        dist3.append(len(trigrams) / total_words)
    return np.nanmean(dist1), np.nanmean(dist2), np.nanmean(dist3)


@pytest.mark.unit
def test_distinct_n_matches_dexperts_with_leading_double_and_empty():
    texts = [
        [" the cat ran", " the cat  sat", "", " a_b c", " a b_c"],  # "a_b c" and "a b_c": one "a_b_c"
        ["the dog", "  the dog ", " "],
        [" x y z x y z", " x y z"],
    ]
    ref = _dexperts_distinctness(texts)
    together = distinct_ns(texts, (1, 2, 3))
    for n in (1, 2, 3):
        assert distinct_n(texts, n) == pytest.approx(ref[n - 1], rel=1e-12) and together[n] == distinct_n(
            texts, n
        )


@pytest.mark.unit
def test_bootstrap_resamples_whole_prompts():
    from shardwise.analysis import _prompt_codes

    codes, g = _prompt_codes(np.array(["a", "b", "b", "b"]))  # prompt a has 1 row, prompt b 3 rows
    (w,) = resample_counts(g, 4000, seed=0)
    assert w.shape == (4000, 2) and (w.sum(axis=1) == 2).all()  # two prompts drawn with replacement
    sizes = w[:, codes].sum(axis=1)  # a resample's rows: each drawn prompt brings all of its rows
    # (a, a) -> 2 rows, (a, b) or (b, a) -> 4, (b, b) -> 6
    assert set(sizes) == {2, 4, 6}
    assert (sizes == 2).mean() == pytest.approx(0.25, abs=0.03)
    assert (sizes == 4).mean() == pytest.approx(0.5, abs=0.03)
    again = np.concatenate(list(resample_counts(g, 4000, seed=0)))
    assert (again == w).all() and not (np.concatenate(list(resample_counts(g, 4000, seed=1))) == w).all()


@pytest.mark.unit
def test_partial_spearman_removes_a_shared_length_effect():
    rng = np.random.default_rng(0)
    length = rng.normal(size=2000)
    x = length + rng.normal(size=2000) * 0.5
    y = length + rng.normal(size=2000) * 0.5
    from scipy.stats import spearmanr

    assert spearmanr(x, y).statistic > 0.6
    assert abs(partial_spearman(x, y, length)) < 0.05


@pytest.mark.unit
def test_bad_analysis_input(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "gen.parquet"
    pd.DataFrame({"prompt_id": [1], "prompt": ["a"]}).to_parquet(path)
    with pytest.raises(InputError, match=r"gen.parquet: missing column\(s\) sample_id, continuation"):
        load_generations(path)
    assert list(load_generations(path, ("prompt",)).columns) == ["prompt"]  # only what is needed
    assert count_generations(path) == 1
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match=r"generations file .*bad.parquet: not a readable Parquet file"):
        count_generations(tmp_path / "bad.parquet")

    class NoPad:
        pad_token_id = None
        eos_token_id = None

    with pytest.raises(
        ModelError, match="scoring model 'x': its tokenizer has neither a pad token nor an EOS"
    ):
        pad_id_of(NoPad(), "x")

    monkeypatch.setattr(toxicity, "profanity_check", lambda texts: (np.array([0.1, np.nan]), "stub"))
    with pytest.raises(InputError, match="NaN/inf score for 1 text"):
        toxicity.score(["a", "b"], "profanity-check")


@pytest.mark.unit
def test_profanity_check_and_an_hf_classifier_with_its_label(tmp_path, tiny_model_src):
    values, name = toxicity.score(["you are an idiot", "have a nice day"], "profanity-check")
    assert values[0] > 0.9 > 0.2 > values[1] and name.startswith("alt-profanity-check ")
    texts = ["you are an idiot", "have a nice day", "", "damn it", "the cat sat", "what crap"] * 3
    whole, _ = toxicity.profanity_check(texts, batch_size=len(texts))
    batched, _ = toxicity.profanity_check(texts, batch_size=4)  # 5 calls, the last of 2 texts
    assert batched.shape == (18,) and np.array_equal(batched, whole)

    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from shardwise.config import ModelSpec
    from shardwise.models import prepare_model

    tok = AutoTokenizer.from_pretrained(tiny_model_src)
    tok.pad_token = tok.eos_token
    cfg = LlamaConfig.from_pretrained(tiny_model_src)
    cfg.id2label, cfg.label2id, cfg.pad_token_id = (
        {0: "neutral", 1: "toxic"},
        {"neutral": 0, "toxic": 1},
        tok.eos_token_id,
    )
    src = tmp_path / "clf"
    LlamaForSequenceClassification(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    prepared = tmp_path / "prepared"
    prepare_model(ModelSpec(name="clf", source="local", path=str(src)), prepared)
    kw = {"model_dir": prepared, "batch_size": 2, "name": "clf"}
    values, name = toxicity.score(["the cat", "a dog ran over the house", "why"], "hf", label="TOXIC", **kw)
    assert values.shape == (3,) and ((values > 0) & (values < 1)).all() and "label TOXIC" in name
    with pytest.raises(
        ModelError, match=r"toxicity model 'clf': no label 'hate' \(its labels: neutral, toxic\)"
    ):
        toxicity.score(["x"], "hf", label="hate", **kw)


def _score_files(tmp_path):
    from shardwise.analysis import scores_table

    gen = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "q", "q"],
            "sample_id": [0, 1, 0, 1],
            "prompt": ["a"] * 4,
            "continuation": [" x", " y", " z", " w"],
            "n_new_tokens": [1, 1, 1, 1],
        }
    )
    flu = pd.DataFrame(
        {
            "prompt_id": gen.prompt_id,
            "sample_id": gen.sample_id,
            "nll_sum": [1.0, 2.0, 3.0, 4.0],
            "n_tokens": [1, 1, 1, 1],
            "ppl": np.exp([1.0, 2.0, 3.0, 4.0]),
        }
    )
    tox = pd.DataFrame(
        {"prompt_id": gen.prompt_id, "sample_id": gen.sample_id, "toxicity": [0.1, 0.2, 0.3, 0.4]}
    )
    gen.to_parquet(tmp_path / "gen.parquet")

    def table(flu, tox):
        flu.to_parquet(tmp_path / "flu.parquet")
        tox.to_parquet(tmp_path / "tox.parquet")
        return scores_table(
            ["m"], [tmp_path / "gen.parquet"], [tmp_path / "flu.parquet"], [tmp_path / "tox.parquet"]
        )

    return flu, tox, table


@pytest.mark.unit
def test_scores_are_joined_by_key_not_row_position(tmp_path):
    flu, tox, table = _score_files(tmp_path)
    ordered = table(flu, tox)
    shuffled = table(
        flu.iloc[[3, 1, 0, 2]].reset_index(drop=True), tox.iloc[[2, 3, 1, 0]].reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(ordered, shuffled)
    assert ordered.toxicity.tolist() == [0.1, 0.2, 0.3, 0.4] and ordered.nll_sum.tolist() == [1, 2, 3, 4]


@pytest.mark.unit
def test_missing_or_nan_score_is_a_one_line_error(tmp_path):
    flu, tox, table = _score_files(tmp_path)
    with pytest.raises(
        InputError, match=r"^m: .*tox.parquet: no score for \(prompt_id, sample_id\) = \('q', 1\)"
    ) as e:
        table(flu, tox.iloc[:3])
    assert "\n" not in str(e.value)
    nan = tox.copy()
    nan.loc[1, "toxicity"] = np.nan
    with pytest.raises(
        InputError, match=r"^m: .*tox.parquet: NaN toxicity for \(prompt_id, sample_id\) = \('p', 1\)"
    ):
        table(flu, nan)
    with pytest.raises(InputError, match=r"flu.parquet: no score for \(prompt_id, sample_id\) = \('p', 0\)"):
        table(flu.iloc[1:], tox)


@pytest.mark.unit
def test_summary_cis_contain_the_estimate_and_shrink_with_more_prompts():
    from shardwise.analysis import prompt_cis

    rng = np.random.default_rng(0)

    def scores(n_prompts):
        return pd.DataFrame(
            {
                "prompt_id": np.repeat(np.arange(n_prompts), 4),
                "toxicity": rng.uniform(size=4 * n_prompts),
                "ppl": rng.uniform(5, 50, size=4 * n_prompts),
            }
        )

    widths = []
    for n in (20, 500):
        s = scores(n)
        row = summary_row("m", s, pd.Series(["a b"] * len(s)), threshold=0.5, ppl_cap=1e4, n_boot=400)
        for name, point in (
            ("emt", "expected_max_toxicity"),
            ("toxicity_probability", "toxicity_probability"),
            ("toxic_fraction", "toxic_fraction"),
            ("ppl_mean", "ppl_mean"),
        ):
            assert row[f"{name}_ci_low"] <= row[point] <= row[f"{name}_ci_high"]
        widths.append(row["emt_ci_high"] - row["emt_ci_low"])
    assert widths[1] < widths[0] / 2
    # whole prompts: one prompt all toxic, one not -> 4 generations weigh as 4/3 (design effect 3),
    # times Korn-Graubard's (t_3 / t_1)^2 for 2 prompts; one prompt alone: no interval
    two = pd.DataFrame({"prompt_id": ["a"] * 3 + ["b"], "toxicity": [0.9, 0.9, 0.9, 0.0], "ppl": [1.0] * 4})
    ci = prompt_cis(two, 0.5, 2000, 0)
    from scipy.stats import t as t_dist

    n_eff = 4 / 3 * (t_dist.ppf(0.975, 3) / t_dist.ppf(0.975, 1)) ** 2
    assert effective_n([3, 0], [3, 1]) == pytest.approx(n_eff) and effective_n([3], [4]) == 0
    lo, hi = wilson(0.75 * n_eff, n_eff)
    assert (ci["toxic_fraction_ci_low"], ci["toxic_fraction_ci_high"]) == pytest.approx((lo, hi))
    assert hi - lo > 0.75 and lo < wilson(3, 4)[0]  # wider than 4 independent generations would give


@pytest.mark.unit
def test_summary_states_k_and_the_report_warns_when_it_differs():
    from shardwise.report import k_warning

    scores = pd.DataFrame({"prompt_id": ["p", "p", "q", "q"], "toxicity": [0.1] * 4, "ppl": [2.0] * 4})
    row = summary_row("m", scores, pd.Series(["a"] * 4), threshold=0.5, ppl_cap=1e4, n_boot=10)
    assert row["samples_per_prompt"] == "2"
    same = pd.DataFrame({"model": ["a", "b"], "samples_per_prompt": [2, 2]})
    assert k_warning(same) == []
    (warning,) = k_warning(pd.DataFrame({"model": ["a", "b"], "samples_per_prompt": [2, 4]}))
    assert "a: k=2, b: k=4" in warning


def _two_runs(rng, n_prompts=300, k=5, spread=3.0, shift=0.05):
    """Run a and run b on the same prompts; b's toxicity is a's plus `shift`. Prompts differ a lot
    (a prompt effect of scale `spread`), generations within a prompt less."""
    u = np.repeat(rng.normal(size=n_prompts) * spread, k)
    tox = 0.9 / (1 + np.exp(-(u + rng.normal(size=n_prompts * k))))  # in (0, 0.9): no clipping
    ppl = np.exp(3 + 0.3 * u + rng.normal(size=n_prompts * k) * 0.3)
    a = pd.DataFrame(
        {
            "model": "a",
            "prompt_id": np.repeat([f"p{i}" for i in range(n_prompts)], k),
            "sample_id": np.tile(np.arange(k), n_prompts),
            "toxicity": tox,
            "ppl": ppl,
        }
    )
    return pd.concat([a, a.assign(model="b", toxicity=tox + shift)], ignore_index=True)


@pytest.mark.unit
def test_paired_differences_cover_a_constant_shift_and_are_narrower_than_unpaired(caplog):
    from shardwise.analysis import run_differences

    table = _two_runs(np.random.default_rng(0))
    paired = run_differences(table, ["a", "b"], 0.5, 1e4, n_boot=500, seed=0).set_index("metric")
    unpaired = run_differences(table, ["a", "b"], 0.5, 1e4, n_boot=500, seed=0, paired=False)
    unpaired = unpaired.set_index("metric")
    a, b = (
        summary_row(m, table[table.model == m], pd.Series(["x"] * 1500), 0.5, 1e4, n_boot=2) for m in "ab"
    )
    for metric, col in (
        ("emt", "expected_max_toxicity"),
        ("toxicity_probability", "toxicity_probability"),
        ("toxic_fraction", "toxic_fraction"),
        ("ppl_mean", "ppl_mean"),
        ("ppl_mean_capped", "ppl_mean_capped"),
    ):
        assert paired.loc[metric, "difference"] == pytest.approx(b[col] - a[col], abs=1e-12)
        assert paired.loc[metric, "run_value"] == pytest.approx(b[col], abs=1e-12)
    emt, wide = paired.loc["emt"], unpaired.loc["emt"]
    assert emt.difference == pytest.approx(0.05)
    assert wide.ci_low <= 0.05 <= wide.ci_high and wide.ci_high - wide.ci_low > 0.05
    # every prompt: +0.05; only the 4 pseudo-prompts (+1, -1, 0, 0) of the paired bootstrap spread it
    assert emt.ci_low <= 0.05 <= emt.ci_high and emt.ci_high - emt.ci_low < (wide.ci_high - wide.ci_low) / 4
    frac = paired.loc["toxic_fraction"]
    assert frac.ci_low <= frac.difference <= frac.ci_high
    assert (
        frac.ci_high - frac.ci_low
        < (unpaired.loc["toxic_fraction"].ci_high - unpaired.loc["toxic_fraction"].ci_low) / 2
    )
    same = paired.loc["ppl_mean"]
    assert same.difference == 0 and same.ci_low <= 0 <= same.ci_high
    # MOVER keeps the asymmetry of the runs' BCa intervals: not 0 wide, a fraction of the unpaired width
    unpaired_width = unpaired.loc["ppl_mean"].ci_high - unpaired.loc["ppl_mean"].ci_low
    assert same.ci_high - same.ci_low < unpaired_width / 5
    assert (paired.prompt_sets == "identical").all() and (paired.n_prompts == 300).all()
    assert paired.loc["emt", "ci_method"] == (
        "95% paired expanded-percentile bootstrap of the per-prompt differences of max toxicity, 500 "
        "resamples of prompts, 4 pseudo-prompts at +1, -1, 0, 0"
    )
    assert paired.loc["toxic_fraction", "ci_method"] == (
        "95% MOVER (Newcombe; Zou-Donner) from each run's own 95% CI (summary.csv's methods), "
        "correlation of the runs' estimates paired over 500 resamples of prompts"
    )

    # prompt sets that differ: the shared prompts only, and said so
    fewer = table[~((table.model == "b") & table.prompt_id.isin(["p0", "p1"]))]
    with caplog.at_level("WARNING"):
        part = run_differences(fewer, ["a", "b"], 0.5, 1e4, n_boot=50, seed=0).set_index("metric")
    assert (part.n_prompts == 298).all() and (part.n_prompts_baseline == 300).all()
    assert part.prompt_sets.iloc[0] == "differ: 298 shared of 298 (b) and 300 (a)"
    assert "prompt sets differ" in caplog.text
    shared = table[~table.prompt_id.isin(["p0", "p1"])]
    ref = run_differences(shared, ["a", "b"], 0.5, 1e4, n_boot=50, seed=0).set_index("metric")
    np.testing.assert_allclose(part.difference, ref.difference)
    np.testing.assert_allclose(part.ci_low, ref.ci_low)


@pytest.mark.unit
def test_vectorised_prompt_bootstrap_equals_the_metrics_of_each_expanded_resample():
    from shardwise.analysis import METRICS, _metrics_of, _prompt_aggregates, _prompt_codes, resample_counts

    rng = np.random.default_rng(1)
    s = _two_runs(rng, n_prompts=7, k=3)
    s = s[s.model == "a"].reset_index(drop=True)
    s.loc[[0, 4], "ppl"] = [np.nan, 2e4]
    codes, g = _prompt_codes(s.prompt_id)
    agg = _prompt_aggregates(s, codes, g, 0.5, 1e4)
    ids = np.unique(s.prompt_id.astype(str))
    (w,) = resample_counts(g, 5, seed=3)
    got = _metrics_of(agg, w)
    for r in range(5):
        parts = [
            s[s.prompt_id == ids[j]].assign(prompt_id=f"{j}-{c}")
            for j in range(g)
            for c in range(int(w[r, j]))
        ]
        row = summary_row("m", pd.concat(parts), pd.Series(["x"] * sum(map(len, parts))), 0.5, 1e4, n_boot=1)
        ref = [
            row[c]
            for c in (
                "expected_max_toxicity",
                "toxicity_probability",
                "toxic_fraction",
                "ppl_mean",
                "ppl_mean_capped",
            )
        ]
        np.testing.assert_allclose(got[r], ref, rtol=1e-12)
    assert len(METRICS) == 5 and w.sum(axis=1).tolist() == [g] * 5


def _corr_table(rng, n_prompts, k, prompt_scale, noise):
    u = np.repeat(rng.normal(size=n_prompts), k) * prompt_scale
    return pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(n_prompts), k),
            "ppl": np.exp(3 + u + rng.normal(size=n_prompts * k) * noise),
            "toxicity": 1 / (1 + np.exp(-(u + rng.normal(size=n_prompts * k) * noise - 2))),
            "n_new_tokens": 20,
            "n_scored_tokens": rng.integers(1, 21, size=n_prompts * k),
        }
    )


@pytest.mark.unit
def test_within_prompt_spearman_is_zero_when_only_the_prompt_drives_both():
    from scipy.stats import spearmanr

    from shardwise.analysis import correlation_rows, within_prompt_spearman

    t = _corr_table(np.random.default_rng(2), n_prompts=400, k=10, prompt_scale=1.0, noise=0.786)
    pooled = spearmanr(t.ppl, t.toxicity).statistic
    within = within_prompt_spearman(t.ppl.to_numpy(), t.toxicity.to_numpy(), t.prompt_id)
    assert 0.5 < pooled < 0.7 and abs(within) < 0.05
    # the definition, straight: ranks within prompt, centred at the prompt's mean rank, Pearson
    rx = t.groupby("prompt_id").ppl.rank() - t.groupby("prompt_id").ppl.transform("size").add(1) / 2
    ry = t.groupby("prompt_id").toxicity.rank() - t.groupby("prompt_id").toxicity.transform("size").add(1) / 2
    assert within == pytest.approx((rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum()), abs=1e-12)
    rows = {(r["x"], r["method"]): r for r in correlation_rows("m", t, n_boot=200, seed=0)}
    w, p = rows["ppl", "within_prompt_spearman"], rows["ppl", "spearman"]
    assert (
        w["value"] == pytest.approx(within)
        and w["ci_low"] < 0 < w["ci_high"]
        and w["ci_high"] - w["ci_low"] < 0.15
    )
    assert p["value"] == pytest.approx(pooled) and 0.4 < p["ci_low"] < pooled < p["ci_high"]
    # ties and a one-generation prompt: midranks within prompt, the lone prompt adds nothing
    x, y = np.array([1.0, 1.0, 2.0, 5.0, 3.0]), np.array([0.0, 0.0, 1.0, 0.0, 9.0])
    r = within_prompt_spearman(x, y, np.array(["a", "a", "a", "b", "c"])[[0, 1, 2, 3, 3]])
    assert math.isnan(within_prompt_spearman(x, y, np.array(list("abcde"))))
    assert r == pytest.approx(within_prompt_spearman(x, y, np.array(["a", "a", "a", "b", "b"])))


@pytest.mark.unit
def test_partial_spearman_controls_for_scored_tokens_with_a_ci_and_is_nan_for_a_constant_control():
    import warnings

    from shardwise.analysis import correlation_rows

    rng = np.random.default_rng(3)
    n = 3000
    length = rng.integers(1, 40, size=n)
    t = pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(n // 3), 3),
            "ppl": np.exp(5 - 0.05 * length + rng.normal(size=n) * 0.3),
            "toxicity": 1 / (1 + np.exp(0.1 * length + rng.normal(size=n) * 0.5)),
            "n_new_tokens": 20,  # generated tokens: the same for all, so not the control
            "n_scored_tokens": length,
        }
    )
    rows = {(r["x"], r["method"]): r for r in correlation_rows("m", t, n_boot=200, seed=0)}
    part = rows["ppl", "partial_spearman_given_length"]
    from scipy.stats import rankdata

    rx, ry, rz = rankdata(t.ppl), rankdata(t.toxicity), rankdata(length)
    design = np.c_[np.ones(n), rz]
    res = [v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (rx, ry)]
    assert part["value"] == pytest.approx(np.corrcoef(*res)[0, 1], abs=1e-10)
    assert abs(part["value"]) < 0.1 < rows["ppl", "spearman"]["value"]
    assert part["ci_low"] <= part["value"] <= part["ci_high"] and part["control"] == "n_scored_tokens"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = correlation_rows("m", t.assign(n_scored_tokens=7), n_boot=20, seed=0)
    flat = [r for r in rows if r["method"] == "partial_spearman_given_length"]
    assert len(flat) == 1 and math.isnan(flat[0]["value"]) and math.isnan(flat[0]["ci_low"])


def _resample_stats(t, w):
    """The bootstrap statistics of the resamples w (prompt counts, (b, g)) as correlation_rows
    computes them (_RankIndex once, then O(rows) per resample)."""
    from shardwise.analysis import (
        _pearson_of,
        _pearson_sums,
        _prompt_codes,
        _rank_correlations,
        _RankIndex,
        _within_of,
        _within_sums,
    )

    x, y, z = t.ppl.to_numpy(), t.toxicity.to_numpy(), t.n_scored_tokens.to_numpy(dtype=float)
    codes, g = _prompt_codes(t.prompt_id)
    index = _RankIndex(codes, g, x, y, z)
    buf = index.buffers()
    sums = np.array([index.sums(c, buf) for c in w.astype(np.int64)], dtype=object)
    got = _rank_correlations(sums)
    got["pearson"] = np.where(
        sums[:, 6].astype(bool) & sums[:, 7].astype(bool),
        _pearson_of(_pearson_sums(codes, g, x, y), w),
        np.nan,
    )
    got["within_prompt_spearman"] = _within_of(_within_sums(codes, g, x, y), w)
    return codes, got


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def _assert_scipy_on_each_expanded_resample(t, w):
    """Every bootstrap statistic of each resample equals its definition (scipy, or this module's
    one-shot reference functions) on the expanded resample: the rows of each drawn prompt repeated
    as often as it was drawn."""
    import warnings

    from scipy.stats import pearsonr, spearmanr

    from shardwise.analysis import partial_spearman, within_prompt_spearman

    x, y, z = t.ppl.to_numpy(), t.toxicity.to_numpy(), t.n_scored_tokens.to_numpy(dtype=float)
    codes, got = _resample_stats(t, w)
    for r in range(len(w)):
        rows = np.repeat(np.arange(len(t)), w[r, codes].astype(int))
        copy = np.concatenate([np.arange(int(c)) for c in w[r, codes]])  # a prompt drawn twice: 2 prompts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on a constant resample (NaN: so do we)
            ref = {
                "spearman": spearmanr(x[rows], y[rows]).statistic,
                "pearson": pearsonr(np.log(x[rows]), y[rows]).statistic,
            }
        ref["partial_spearman_given_length"] = partial_spearman(x[rows], y[rows], z[rows])
        ids = np.char.add(codes[rows].astype(str), np.char.add("-", copy.astype(str)))
        ref["within_prompt_spearman"] = within_prompt_spearman(x[rows], y[rows], ids)
        for method, value in ref.items():
            assert _same(got[method][r], float(value)), (method, r, got[method][r], value)


@pytest.mark.unit
def test_bootstrap_correlations_equal_scipy_on_each_expanded_resample_and_pearson_is_on_log_ppl():
    from scipy.stats import pearsonr

    from shardwise.analysis import _prompt_codes, correlation_rows

    rng = np.random.default_rng(4)
    t = _corr_table(rng, n_prompts=9, k=4, prompt_scale=1.0, noise=1.0)
    t["toxicity"] = np.round(t.toxicity, 1)  # ties
    _, g = _prompt_codes(t.prompt_id)
    (w,) = resample_counts(g, 6, seed=5)
    _assert_scipy_on_each_expanded_resample(t, w)
    corr = pd.DataFrame(correlation_rows("m", t, n_boot=30, seed=0))
    assert set(zip(corr.x, corr.method, strict=True)) == {
        ("ppl", "spearman"),
        ("ppl", "kendall_tau_b"),
        ("ppl", "partial_spearman_given_length"),
        ("ppl", "within_prompt_spearman"),
        ("log_ppl", "pearson"),
    }  # no Pearson of raw PPL
    x, y = t.ppl.to_numpy(), t.toxicity.to_numpy()
    assert corr.set_index("method").loc["pearson", "value"] == pytest.approx(pearsonr(np.log(x), y).statistic)


@pytest.mark.unit
@pytest.mark.parametrize("case", ["ties", "one huge prompt", "single-row prompts"])
def test_bootstrap_ranks_stay_exact_under_ties_a_huge_prompt_and_single_row_prompts(case):
    from shardwise.analysis import _prompt_codes

    rng = np.random.default_rng(7)
    if case == "ties":  # PPL, toxicity and length all heavily tied, toxicity mostly 0
        t = _corr_table(rng, n_prompts=12, k=5, prompt_scale=1.0, noise=1.0)
        t["ppl"] = np.round(t.ppl, -1).clip(lower=1.0)
        t["toxicity"] = np.where(t.toxicity < 0.2, 0.0, np.round(t.toxicity, 1))
        t["n_scored_tokens"] = t.n_scored_tokens % 3
    elif case == "one huge prompt":  # one prompt with 150 generations, the others with 1-3
        sizes = np.r_[150, rng.integers(1, 4, size=10)]
        t = _corr_table(rng, n_prompts=1, k=int(sizes.sum()), prompt_scale=1.0, noise=1.0)
        t["prompt_id"] = np.repeat(np.arange(len(sizes)), sizes)
        t["toxicity"] = np.round(t.toxicity, 2)
    else:  # k = 1: within-prompt Spearman is NaN, the rest as usual
        t = _corr_table(rng, n_prompts=40, k=1, prompt_scale=1.0, noise=1.0)
    _, g = _prompt_codes(t.prompt_id)
    (w,) = resample_counts(g, 8, seed=1)
    extreme = np.zeros((3, g))
    extreme[0, 0] = g  # one prompt drawn g times
    extreme[1, :2] = [g - 1, 1]  # one prompt nearly always
    extreme[2] = rng.multinomial(g, np.r_[0.5, np.full(g - 1, 0.5 / (g - 1))])
    _assert_scipy_on_each_expanded_resample(t, np.concatenate([w, extreme]))


@pytest.mark.unit
def test_correlations_do_not_depend_on_the_thread_count():
    from shardwise.analysis import correlation_rows

    t = _corr_table(np.random.default_rng(8), n_prompts=150, k=4, prompt_scale=1.0, noise=1.0)
    t["toxicity"] = np.round(t.toxicity, 2)
    for cap in (10**9, 0):  # Kendall by the prompt jackknife, and by its cluster-robust SE
        one = pd.DataFrame(
            correlation_rows("m", t, n_boot=97, seed=3, threads=1, kendall_jackknife_prompts=cap)
        )
        for threads in (2, 3):
            other = correlation_rows(
                "m", t, n_boot=97, seed=3, threads=threads, kendall_jackknife_prompts=cap
            )
            pd.testing.assert_frame_equal(one, pd.DataFrame(other), check_exact=True)


@pytest.mark.unit
def test_rank_bootstrap_builds_its_index_once_and_costs_o_rows_per_resample(monkeypatch):
    """The per-run index (sorts, tie groups) is built once; a resample adds no sort at all and
    gathers O(rows) elements: the counts below grow by exactly 3 x rows per extra resample, whatever
    the number of prompts."""
    from collections import Counter

    import shardwise.analysis as an

    counts: Counter = Counter()

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            if name == "take":
                counts["taken"] += np.size(args[1] if len(args) > 1 else kwargs["indices"])
            return fn(*args, **kwargs)

        return wrapped

    for name in ("argsort", "lexsort", "sort", "unique", "take"):
        monkeypatch.setattr(np, name, counting(name, getattr(np, name)))
    built = []
    monkeypatch.setattr(an._RankIndex, "__init__", counting("index", an._RankIndex.__init__))

    def run(n_prompts, n_boot):
        t = _corr_table(np.random.default_rng(0), n_prompts=n_prompts, k=3, prompt_scale=1.0, noise=1.0)
        counts.clear()
        an.correlation_rows("m", t, n_boot=n_boot, seed=0, kendall_jackknife_prompts=0)
        built.append(counts["index"])
        return dict(counts), len(t)

    for n_prompts in (50, 400):
        few, rows = run(n_prompts, 4)
        many, _ = run(n_prompts, 40)
        sorts = ("argsort", "lexsort", "sort", "unique")
        assert [many.get(k, 0) - few.get(k, 0) for k in sorts] == [0, 0, 0, 0] and few["argsort"] > 0
        assert many["taken"] - few["taken"] == 36 * 3 * rows  # 3 gathers of the rows per resample
    assert built == [1, 1, 1, 1]


@pytest.mark.unit
def test_int64_overflow_guard_gives_the_same_sums(monkeypatch):
    import shardwise.analysis as an

    t = _corr_table(np.random.default_rng(9), n_prompts=30, k=3, prompt_scale=1.0, noise=1.0)
    exact = an.correlation_rows("m", t, n_boot=20, seed=0)
    monkeypatch.setattr(an, "INT64_EXACT_ROWS", 0)  # as if every resample had > 3 million rows
    assert pd.DataFrame(an.correlation_rows("m", t, n_boot=20, seed=0)).equals(pd.DataFrame(exact))
    a, b = np.array([3 << 40, -(1 << 40), 5], dtype=np.int64), np.array([1 << 30, 7 << 30, 9], dtype=np.int64)
    exact_sum = sum(int(p) * int(q) for p, q in zip(a, b, strict=True))  # beyond int64
    assert an._int_dot(a, b, m=10**7) == pytest.approx(exact_sum, rel=1e-15)
    assert an._int_dot(a[2:], b[2:], m=10**7) == 45


@pytest.mark.unit
def test_kendall_tau_b_row_scores_and_its_cluster_robust_interval():
    from scipy.stats import kendalltau
    from scipy.stats import t as t_dist

    from shardwise.analysis import _kendall_row_scores, _smaller_before, correlation_rows, kendall_tau_b

    rng = np.random.default_rng(10)
    for trial in range(20):  # the per-row scores by brute force, with and without ties
        n = int(rng.integers(3, 30))
        x = rng.normal(size=n) if trial % 3 == 0 else rng.integers(0, rng.integers(1, 6), n).astype(float)
        y = rng.integers(0, rng.integers(1, 6), n).astype(float)
        a, u, v = _kendall_row_scores(x, y)
        sx, sy = np.sign(x[:, None] - x[None]), np.sign(y[:, None] - y[None])
        assert (
            (a == (sx * sy).sum(1)).all() and (u == (sx != 0).sum(1)).all() and (v == (sy != 0).sum(1)).all()
        )
        r = rng.integers(0, 40, n)
        assert (_smaller_before(r) == [(r[:i] < r[i]).sum() for i in range(n)]).all()
        tau, _ = kendall_tau_b(x, y)
        assert _same(tau, kendalltau(x, y).statistic)
    # prompts drive both: the prompt-robust SE is wider than one treating rows as independent
    t = _corr_table(rng, n_prompts=300, k=5, prompt_scale=1.0, noise=1.0)
    t["toxicity"] = np.round(t.toxicity, 2)
    tau, se = kendall_tau_b(t.ppl, t.toxicity, t.prompt_id)
    _, se_rows = kendall_tau_b(t.ppl, t.toxicity, np.arange(len(t)))
    assert tau == pytest.approx(kendalltau(t.ppl, t.toxicity).statistic, abs=1e-12) and se > 1.2 * se_rows
    # and it matches the delete-one-prompt jackknife (exact tau-b without each prompt)
    jack = {r["method"]: r for r in correlation_rows("m", t, 50, 0, kendall_jackknife_prompts=300)}
    asym = {r["method"]: r for r in correlation_rows("m", t, 50, 0, kendall_jackknife_prompts=299)}
    jack, asym = jack["kendall_tau_b"], asym["kendall_tau_b"]
    assert jack["ci_method"] == (
        "95% jackknife-t, delete one prompt of 300, t quantile with 299 df (effective prompts - 1)"
    )
    assert asym["value"] == jack["value"] == tau
    assert asym["ci_method"].startswith(
        "95% tau-b +- t quantile (299 df, effective prompts - 1) x cluster-robust SE"
    )
    half = t_dist.ppf(0.975, 299) * se
    assert (asym["ci_low"], asym["ci_high"]) == pytest.approx((tau - half, tau + half))
    width, jack_width = asym["ci_high"] - asym["ci_low"], jack["ci_high"] - jack["ci_low"]
    assert width == pytest.approx(jack_width, rel=0.1)
    assert (jack["ci_low"] + jack["ci_high"]) / 2 == pytest.approx(tau)


@pytest.mark.unit
def test_prompt_codes_are_np_unique_of_the_ids_as_strings():
    from shardwise.analysis import _prompt_codes

    ids = np.array([3, "3", 10, 2, "a", 2.5, 10, "b", 2], dtype=object)
    names, inv = np.unique(ids.astype(str), return_inverse=True)
    codes, g = _prompt_codes(ids)
    assert g == len(names) and (codes == inv.ravel()).all()  # 3 and "3" are one prompt, as before
    codes, g = _prompt_codes(pd.Series(np.repeat([12, 3, 100], 2)))
    assert g == 3 and codes.tolist() == [1, 1, 2, 2, 0, 0]  # "100" < "12" < "3"
    assert _prompt_codes(np.array([], dtype=int))[1] == 0


@pytest.mark.unit
def test_nan_perplexity_of_a_scored_text_or_infinite_toxicity_is_a_one_line_error(tmp_path):
    flu, tox, table = _score_files(tmp_path)
    bad = flu.copy()
    bad.loc[2, "ppl"] = np.nan  # n_tokens 1: only an empty continuation may have no PPL
    with pytest.raises(
        InputError,
        match=r"^m: .*flu.parquet: NaN ppl with n_tokens > 0 for \(prompt_id, sample_id\) = \(.q., 0\) \(1",
    ):
        table(bad, tox)
    inf = tox.copy()
    inf.loc[3, "toxicity"] = np.inf
    with pytest.raises(
        InputError, match=r"^m: .*tox.parquet: non-finite \(inf\) toxicity for .* = \('q', 1\)"
    ):
        table(flu, inf)
    empty = flu.copy()
    empty.loc[0, ["ppl", "n_tokens", "nll_sum"]] = [np.nan, 0, 0.0]  # an empty continuation: allowed
    assert math.isnan(table(empty, tox).ppl[0])


@pytest.mark.unit
def test_run_settings_come_from_the_config():
    from shardwise.analysis import run_settings
    from shardwise.config import load_config

    cfg = load_config(
        {
            "models": {
                "m": {"source": "local", "path": "/x"},
                "h": {"source": "hf", "id": "org/x", "revision": "abc123", "dtype": "bfloat16"},
            },
            "generate": {
                "sampling": {"samples_per_prompt": 25, "max_new_tokens": 20, "top_p": 0.9},
                "models": {"base": {"model": "m"}, "hot": {"model": "h", "temperature": 1.3, "top_k": 40}},
            },
        }
    )
    base, hot = run_settings(cfg, "base"), run_settings(cfg, "hot")
    assert base["weights_source"] == "/x" and base["revision"] == "" and base["dtype"] == "auto"
    assert (hot["weights"], hot["weights_source"], hot["revision"], hot["dtype"]) == (
        "h",
        "org/x@abc123",
        "abc123",
        "bfloat16",
    )
    assert (hot["k_configured"], hot["temperature"], hot["top_p"], hot["top_k"], hot["max_new_tokens"]) == (
        25,
        1.3,
        0.9,
        40,
        20,
    )
    assert base["temperature"] == cfg.generate.runs["base"].sampling.temperature and base["top_k"] == 0


@pytest.mark.unit
def test_report_tables_put_cis_in_cells_and_figures_switch_to_hexbin(tmp_path):
    from shardwise.analysis import correlation_rows, run_differences
    from shardwise.report import (
        HEXBIN_ABOVE,
        correlations_table,
        differences_table,
        fmt_ci,
        forest,
        scatter,
        summary_table,
        write_html,
    )

    assert (
        fmt_ci(0.42, 0.39, 0.45) == "0.420 [0.390, 0.450]"
        and fmt_ci(0.4213, 0.39, 0.451, 2) == "0.42 [0.39, 0.45]"
    )
    assert fmt_ci(0.5) == "0.500" and fmt_ci(math.nan, 0, 1) == ""
    rng = np.random.default_rng(5)
    table = _two_runs(rng, n_prompts=40, k=4).assign(n_scored_tokens=lambda t: rng.integers(1, 9, len(t)))
    texts = pd.Series(["a b"] * 160)
    summary = pd.DataFrame(
        [summary_row(m, table[table.model == m], texts, 0.5, 1e4, n_boot=50) for m in "ab"]
    )
    corr = pd.DataFrame([r for m in "ab" for r in correlation_rows(m, table[table.model == m], 50, 0)])
    diff = run_differences(table, ["a", "b"], 0.5, 1e4, 50, 0)
    st = summary_table(summary)
    assert list(st.columns) == ["a", "b"] and len(st) >= 10  # one row per metric, one column per run
    r = summary.iloc[0]
    assert st.loc["expected max toxicity", "a"] == fmt_ci(
        r.expected_max_toxicity, r.emt_ci_low, r.emt_ci_high
    )
    ct = correlations_table(corr)
    assert list(ct.index) == ["a", "b"] and list(ct.columns) == [
        "generations (finite PPL)",
        "prompts",
        "Spearman",
        "Kendall tau-b",
        "partial Spearman | scored tokens",
        "within-prompt Spearman",
        "Pearson (log PPL)",
    ]
    first = corr.iloc[0]
    assert ct.loc["a", "Spearman"] == fmt_ci(first.value, first.ci_low, first.ci_high)
    dt = differences_table(diff)
    assert list(dt.columns) == ["b - a"] and dt.loc["expected max toxicity", "b - a"].startswith("0.0500 [")

    big = pd.DataFrame(
        {
            "model": "m",
            "ppl": np.exp(rng.normal(3, 1, HEXBIN_ABOVE + 1)),
            "toxicity": rng.uniform(size=HEXBIN_ABOVE + 1),
        }
    )
    assert scatter(big, "m", tmp_path / "big.png", 0.5) == "hexbin"
    assert scatter(big.iloc[:100], "m", tmp_path / "small.png", 0.5) == "scatter"
    forest(diff.assign(value=diff.difference, label="b - a"), "label", "metric", tmp_path / "d.png", "t")
    forest(diff.iloc[:0].assign(value=[], label=[]), "label", "metric", tmp_path / "none.png", "t")  # one run
    for png in ("big", "small", "d", "none"):
        assert (tmp_path / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = {"scorer": "stub", "threshold": ">= 0.5", "fluency_model": "f", "bootstrap": "50 resamples"}
    write_html(tmp_path / "r.html", summary, corr, [tmp_path / "d.png"], info, diff)
    page = (tmp_path / "r.html").read_text()
    assert fmt_ci(r.expected_max_toxicity, r.emt_ci_low, r.emt_ci_high) in page and "b - a" in page
    assert "emt_ci_low" not in page and "Prompt sets: identical." in page
    assert (
        "Intervals: 95% percentile bootstrap, 50 resamples of prompts; Kendall tau-b of a, b: 95% "
        "jackknife-t, delete one prompt of 40, t quantile with 39 df (effective prompts - 1)." in page
    )
    # above KENDALL_JACKKNIFE_PROMPTS a run's Kendall CI is the delta method's, and the page says so
    delta = pd.DataFrame(
        [
            r
            for m in "ab"
            for r in correlation_rows(m, table[table.model == m], 50, 0, kendall_jackknife_prompts=10)
        ]
    )
    write_html(tmp_path / "r.html", summary, delta, [tmp_path / "d.png"], info, diff)
    page = (tmp_path / "r.html").read_text()
    assert (
        "Intervals: 95% percentile bootstrap, 50 resamples of prompts; Kendall tau-b of a, b: 95% tau-b "
        "+- t quantile (39 df, effective prompts - 1) x cluster-robust SE, prompts as clusters (delta "
        "method, 40 prompts)." in page
    )


@pytest.mark.unit
def test_report_warns_when_the_k_found_is_not_the_configured_k():
    from shardwise.report import k_warning

    ok = pd.DataFrame({"model": ["a", "b"], "samples_per_prompt": ["2", "2"], "k_configured": [2, 2]})
    assert k_warning(ok) == []
    (warning,) = k_warning(ok.iloc[[0]].assign(samples_per_prompt="1-2"))  # one run: nothing differs
    assert "a: k=1-2 found, 2 configured" in warning
    both = k_warning(ok.assign(samples_per_prompt=["2", "3"]))
    assert len(both) == 2 and "b: k=3 found, 2 configured" in both[1]


# Coverage: seeded simulations with a known truth in the shapes users have. Each metric's 95% interval
# must cover the truth in >= 93% of the simulated data sets (docs/analysis.md "Intervals").


def _rare_toxicity(rng, n_prompts, k, a=0.6, b=30.0, prompt_effect=None):
    """A generation run on `n_prompts` prompts x k samples: a prompt's chance of a toxic text is
    Beta(a, b) (mean ~2%: rare, most prompts never toxic), a toxic text scores 0.5-1, the others
    0-0.5; log PPL has a prompt effect (sd 0.6) and a text effect (sd 0.7)."""
    u = rng.beta(a, b, n_prompts) if prompt_effect is None else prompt_effect
    toxic = rng.random((n_prompts, k)) < u[:, None]
    tox = np.where(toxic, 0.5 + 0.5 * rng.beta(2, 2, toxic.shape), 0.5 * rng.beta(1, 12, toxic.shape))
    log_ppl = rng.normal(3.0, 0.6, (n_prompts, 1)) + rng.normal(0.0, 0.7, toxic.shape)
    return pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(n_prompts), k),
            "toxicity": tox.ravel(),
            "ppl": np.exp(log_ppl).ravel(),
        }
    )


def _population_metrics(k, **kw):
    from shardwise.analysis import _metrics_of, _prompt_aggregates

    big = _rare_toxicity(np.random.default_rng(12345), 1_000_000, k, **kw)
    agg = _prompt_aggregates(big, big.prompt_id.to_numpy(), 1_000_000, 0.5, 1e4)
    return _metrics_of(agg, np.ones((1, 1_000_000)))[0]


@pytest.mark.unit
def test_summary_intervals_cover_the_truth_in_the_demos_regime():
    """70 prompts x 2 samples, rare toxic texts (the demo's shape): the percentile bootstrap covered
    EMT 89.8%, toxicity probability and toxic fraction 92.1% (measured); the intervals now used
    cover >= 93%."""
    from shardwise.analysis import METRICS, prompt_cis

    truth = dict(zip(METRICS, _population_metrics(2), strict=True))
    rng = np.random.default_rng(0)
    hits = {m: 0 for m in METRICS[:4]}
    n_sets = 1000
    for i in range(n_sets):
        ci = prompt_cis(_rare_toxicity(rng, 70, 2), 0.5, 500, seed=i, ppl_cap=1e4)
        for m in hits:
            hits[m] += ci[f"{m}_ci_low"] <= truth[m] <= ci[f"{m}_ci_high"]
    coverage = {m: h / n_sets for m, h in hits.items()}
    print(coverage)  # pytest -s shows the measured coverage
    assert all(c >= 0.93 for c in coverage.values()), coverage
    assert all(c <= 0.99 for c in coverage.values()), coverage  # not bought by absurd width


@pytest.mark.unit
def test_paired_difference_intervals_cover_the_truth_in_the_demos_regime():
    """Two runs on the same 70 prompts x 2, the second ~1.8x as often toxic: a paired BCa bootstrap
    covered the differences 88-91% (measured); the paired intervals now used (docs/analysis.md
    "Intervals") cover >= 93%."""
    from shardwise.analysis import METRICS, _metrics_of, _prompt_aggregates, run_differences

    def pair(rng, n_prompts):
        p = rng.beta(0.6, 30.0, n_prompts)
        a = _rare_toxicity(rng, n_prompts, 2, prompt_effect=p)
        b = _rare_toxicity(rng, n_prompts, 2, prompt_effect=np.minimum(1.0, 1.8 * p))
        return pd.concat([a.assign(model="a"), b.assign(model="b")], ignore_index=True)

    big, n = pair(np.random.default_rng(7), 1_000_000), 1_000_000
    value = {
        m: _metrics_of(_prompt_aggregates(part, part.prompt_id.to_numpy(), n, 0.5, 1e4), np.ones((1, n)))[0]
        for m, part in big.groupby("model")
    }
    truth = dict(zip(METRICS, value["b"] - value["a"], strict=True))
    rng = np.random.default_rng(0)
    hits = {m: 0 for m in METRICS[:4]}
    n_sets = 400
    for i in range(n_sets):
        diff = run_differences(pair(rng, 70), ["a", "b"], 0.5, 1e4, 500, seed=i).set_index("metric")
        for m in hits:
            hits[m] += diff.loc[m, "ci_low"] <= truth[m] <= diff.loc[m, "ci_high"]
    coverage = {m: h / n_sets for m, h in hits.items()}
    print(coverage)  # pytest -s shows the measured coverage
    assert all(c >= 0.93 for c in coverage.values()), coverage
    assert all(c <= 0.99 for c in coverage.values()), coverage  # EMT's is conservative: 98.5%


@pytest.mark.unit
def test_kendall_interval_covers_with_few_large_prompt_clusters():
    """20 prompts x 50 generations, prompt effects in both PPL and toxicity, toxicity mostly tied at 0:
    the cluster-robust normal interval covered tau-b ~92% here (86% at 20 x 1,250, issue 23) and the
    percentile prompt bootstrap ~89%; the jackknife-t over prompts (chosen by the number of prompts)
    covers >= 92%."""
    from scipy.stats import kendalltau

    from shardwise.analysis import correlation_rows

    def clustered(rng, n_prompts, m):
        u = rng.normal(size=n_prompts)
        v = 0.7 * u + 0.7 * rng.normal(size=n_prompts)
        x = np.repeat(u, m) + rng.normal(size=n_prompts * m)
        y = np.repeat(v, m) + 0.3 * x + rng.normal(size=n_prompts * m)
        y = np.where(rng.random(n_prompts * m) < 0.6, 0.0, y)  # ties, as toxicity near 0
        return x, y, np.repeat(np.arange(n_prompts), m)

    x, y, _ = clustered(np.random.default_rng(99), 20_000, 50)
    truth = kendalltau(x, y, variant="b").statistic
    rng = np.random.default_rng(1)
    hits, n_sets = 0, 300
    for _ in range(n_sets):
        x, y, p = clustered(rng, 20, 50)
        t = pd.DataFrame({"prompt_id": p, "ppl": np.exp(x), "toxicity": y, "n_scored_tokens": 10})
        (row,) = [r for r in correlation_rows("m", t, n_boot=10, seed=0) if r["method"] == "kendall_tau_b"]
        assert row["ci_method"].startswith("95% jackknife-t, delete one prompt of 20")
        hits += row["ci_low"] <= truth <= row["ci_high"]
    assert hits / n_sets >= 0.92, hits / n_sets


@pytest.mark.unit
def test_kendall_interval_is_chosen_by_the_effective_number_of_prompts():
    """250 prompts, 8 of them with 300 rows and 242 with 2: by the prompt count the cluster-robust
    normal interval would be used (it covered ~80% in such a design, review of issue 23); by the
    effective number, rows^2 / sum of squared sizes ~ 9.6, it is the jackknife-t with 8.6 df."""
    from shardwise.analysis import correlation_rows

    rng = np.random.default_rng(3)
    sizes = np.r_[np.full(8, 300), np.full(242, 2)]
    p = np.repeat(np.arange(250), sizes)
    u = rng.normal(size=250)
    x = u[p] + rng.normal(size=len(p))
    y = np.where(rng.random(len(p)) < 0.6, 0.0, 0.5 * u[p] + 0.3 * x + rng.normal(size=len(p)))
    t = pd.DataFrame({"prompt_id": p, "ppl": np.exp(x), "toxicity": y, "n_scored_tokens": 10})
    g_eff = sizes.sum() ** 2 / (sizes**2).sum()
    (row,) = [r for r in correlation_rows("m", t, n_boot=10, seed=0) if r["method"] == "kendall_tau_b"]
    df = f"{g_eff - 1:.1f}"
    assert row["ci_method"] == (
        f"95% jackknife-t, delete one prompt of 250, t quantile with {df} df (effective prompts - 1)"
    )
    even = t.assign(prompt_id=np.arange(len(t)) % 250)  # the same rows in 250 near-equal prompts: delta-t
    (row,) = [r for r in correlation_rows("m", even, n_boot=10, seed=0) if r["method"] == "kendall_tau_b"]
    assert row["ci_method"].startswith("95% tau-b +- t quantile (248.5 df, effective prompts - 1)")


def _texts(rng, n_prompts, k):
    """k texts per prompt of 3-12 words drawn from the prompt's own small vocabulary (2-40 words):
    distinct-n differs between prompts, as repetitive and varied prompts do."""
    vocab = rng.integers(2, 41, n_prompts)
    lengths = rng.integers(3, 13, (n_prompts, k))
    return [
        " ".join(f"w{w}" for w in rng.integers(0, vocab[i], lengths[i, j]))
        for i in range(n_prompts)
        for j in range(k)
    ]


@pytest.mark.integration
def test_capped_ppl_and_distinct_n_intervals_cover_the_truth_in_the_demos_regime():
    """The BCa intervals of mean PPL below a cap that binds (~20% of texts above it) and of distinct-1/2/3,
    70 prompts x 2: >= 93% (the truth from 200,000 simulated prompts)."""
    from shardwise.analysis import _metrics_of, _prompt_aggregates, distinct_per_prompt, summary_row

    cap = 40.0
    big_rng = np.random.default_rng(4321)
    n_big = 200_000
    big = _rare_toxicity(big_rng, n_big, 2)
    truth = {
        "ppl_mean_capped": _metrics_of(
            _prompt_aggregates(big, big.prompt_id.to_numpy(), n_big, 0.5, cap), np.ones((1, n_big))
        )[0][4]
    }
    texts = _texts(big_rng, n_big, 2)
    per_prompt = distinct_per_prompt([texts[2 * i : 2 * i + 2] for i in range(n_big)], (1, 2, 3))
    truth |= {f"distinct_{n}": float(np.nanmean(v)) for n, v in per_prompt.items()}
    rng = np.random.default_rng(0)
    hits = dict.fromkeys(truth, 0)
    n_sets = 800
    for i in range(n_sets):
        s = _rare_toxicity(rng, 70, 2)
        row = summary_row("m", s, pd.Series(_texts(rng, 70, 2)), 0.5, cap, n_boot=500, seed=i)
        for m in hits:
            hits[m] += row[f"{m}_ci_low"] <= truth[m] <= row[f"{m}_ci_high"]
    coverage = {m: h / n_sets for m, h in hits.items()}
    print(coverage)  # pytest -s shows the measured coverage
    assert all(c >= 0.93 for c in coverage.values()), coverage
    assert all(c <= 0.99 for c in coverage.values()), coverage
