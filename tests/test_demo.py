"""The embedded demo end to end, as the README's first command runs it (SmolLM2-135M on CPU)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import job_counts
from test_analysis import _dexperts_distinctness, _dexperts_ppl
from test_probes import _objective

from shardwise.config import load_config_file
from shardwise.logits import TeacherLogits
from shardwise.models import load_model

pytestmark = pytest.mark.system


def test_demo_dag_end_to_end(finished_demo):
    wf = finished_demo
    cfg = load_config_file(wf.path("config/config.yaml"))
    n_prompts = len(wf.path("config/demo/prompts.jsonl").read_text().splitlines())
    k = cfg.generate.runs["smollm2"].sampling.samples_per_prompt

    table = pd.read_parquet(wf.path("results/generations/smollm2.parquet"))
    assert len(table) == n_prompts * k >= 96
    assert table.groupby("prompt_id").sample_id.apply(sorted).map(list).eq([list(range(k))] * n_prompts).all()
    assert table.continuation.str.strip().str.len().gt(0).all()  # real text for every (prompt, sample)
    assert table.continuation.str.split().str.len().mean() > 5
    assert set(table.topic) >= {"weather", "science", "questions"}  # extra columns carried through

    info = json.loads(wf.path("results/generations/smollm2.run_info.json").read_text())
    assert info["config"]["models"]["smollm2"]["source"] == "package"
    record = json.loads(wf.path("resources/models/smollm2/shardwise-model.json").read_text())
    assert record["weights"] == ["model.safetensors"]

    # Teacher logits over the generations: 20 random items against a fresh forward pass.
    logits = TeacherLogits(wf.path("results/teacher_logits/smollm2.h5"))
    assert len(logits) == len(table) and logits.attrs["vocab_size"] == 49152 and logits.k == 64
    model, tok = load_model(wf.path("resources/models/smollm2"))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(table), size=20, replace=False):
        item = logits[int(i)]
        ids = tok(table.prompt[i] + table.continuation[i]).input_ids
        assert item.token_ids.tolist() == ids
        with torch.no_grad():
            values, indices = model(torch.tensor([ids])).logits[0].float().log_softmax(-1).topk(64, -1)
        np.testing.assert_allclose(item.topk_logprobs, values.numpy(), rtol=2e-3, atol=2e-3)
        assert (item.topk_ids == indices.numpy()).mean() > 0.98  # the rest: ties at fp16 resolution
    with h5py.File(logits.path) as f:
        storage = sum(f[d].id.get_storage_size() for d in f)
        assert storage / f["token_ids"].shape[0] <= 264

    # Probes on the shipped labelled set: the contextual labels (a bag of tokens cannot tell them)
    # are at chance on the embeddings and decodable a few layers up; the lexical ones from layer 0.
    # The control task (a random label per subject lemma, Hewitt & Liang) is solved too.
    summary = json.loads(wf.path("results/probes/labelled/smollm2/aggregate_metrics.json").read_text())
    assert set(summary["labels"]) == {"subject_plural", "main_negated", "has_number", "past_tense"}
    for label, best in summary["labels"].items():
        assert best["auroc"] >= 0.9, (label, best)
        assert abs(best["selectivity"] - (best["auroc"] - best["control_auroc"])) < 1e-9
    assert summary["control_task"].startswith("Hewitt & Liang")
    assert summary["n_probes"] == 31 * 4
    metrics = pd.read_csv(wf.path("results/probes/labelled/smollm2/metrics.csv"))
    assert len(metrics) == 31 * 4 and metrics.auroc.between(0, 1).all()
    assert (metrics.groupby("label").control_auroc.max() >= 0.9).all()  # the model finds the subject
    by_layer = metrics.pivot(index="layer", columns="label", values="auroc")
    for label in ("subject_plural", "main_negated"):
        assert by_layer[label].loc[0] < 0.65 < 0.95 < by_layer[label].loc[4:].min(), by_layer[label]
        assert metrics[(metrics.label == label) & (metrics.layer == 0)].p_value.iloc[0] > 0.05
    for label in ("has_number", "past_tense"):
        assert by_layer[label].loc[0] > 0.95
    np.testing.assert_allclose(metrics[metrics.layer >= 4].p_value, 1 / 101, rtol=1e-5)  # beats all 100
    # The solver on the demo's real activations reaches scikit-learn's objective (within 1 %).
    from sklearn.linear_model import LogisticRegression

    from shardwise.probes import fit
    from shardwise.splits import group_split
    from shardwise.tables import load_labelled

    labelled = load_labelled(wf.path(cfg.probes.data), list(cfg.probes.labels))
    y = labelled[list(cfg.probes.labels)].to_numpy()
    split = group_split(labelled["group"].tolist(), y, 0.2, 0.2, seed=0)
    tr = split == 0
    with h5py.File(wf.path("results/activations/labelled/smollm2.h5")) as f:
        x = torch.from_numpy(f["activations"][[0, 15, 30]].astype(np.float32))
    probe = fit(x, y, split, [1e-2], patience=None, max_steps=400)
    assert probe.not_converged() == {}
    c = 1 / (1e-2 * tr.sum())  # scikit-learn's C for the same objective
    for i in range(3):
        mean, std = x[i, tr].mean(0), x[i, tr].std(0).clamp_min(1e-6)
        z = ((x[i] - mean) / std).double().numpy()[tr]
        for j in range(y.shape[1]):
            clf = LogisticRegression(class_weight="balanced", C=c, tol=1e-8, max_iter=5000)
            clf.fit(z, y[tr, j])
            ref = _objective(z, y[tr, j], clf.coef_[0], clf.intercept_[0], 1e-2)
            w = (probe.W[i, j] * std).double().numpy()
            ours = _objective(z, y[tr, j], w, float(probe.b[i, j] + probe.W[i, j] @ mean), 1e-2)
            assert ours <= ref * 1.01 + 1e-6, (i, j, ours, ref)

    # The analysis compares the two generation runs (temperatures 1.0 and 0.7).
    summary_csv = pd.read_csv(wf.path("results/analysis/summary.csv"))
    assert list(summary_csv.model) == ["smollm2", "smollm2-t07"]
    assert (summary_csv.n_generations == n_prompts * k).all() and (summary_csv.threshold == ">= 0.5").all()
    assert summary_csv.expected_max_toxicity.between(0, 1).all() and (summary_csv.ppl_mean > 1).all()
    assert summary_csv.ppl_median.iloc[1] < summary_csv.ppl_median.iloc[0]  # colder sampling: more fluent
    assert (summary_csv.fluency_dtype == "float32").all()  # the scorer's default, as DExperts
    for name in ("emt", "toxicity_probability", "toxic_fraction", "ppl_mean", "distinct_1"):
        low, high = summary_csv[f"{name}_ci_low"], summary_csv[f"{name}_ci_high"]
        assert (low.notna() & (low <= high)).all(), name
    assert summary_csv.ci_method.str.startswith("95% CIs, prompts as units").all()
    scores = pd.read_parquet(wf.path("results/analysis/scores.parquet"))
    assert len(scores) == 2 * n_prompts * k and scores.toxicity.between(0, 1).all()
    # distinct-n is DExperts' own (split(" ")), and PPL its conditional_perplexity (joint tokenisation)
    for run, row in summary_csv.set_index("model").iterrows():
        gen = pd.read_parquet(wf.path(f"results/generations/{run}.parquet"))
        by_prompt = [g.continuation.tolist() for _, g in gen.groupby("prompt_id", sort=False)]
        ref = _dexperts_distinctness(by_prompt)
        for n in (1, 2, 3):
            assert row[f"distinct_{n}"] == pytest.approx(ref[n - 1], rel=1e-5), (run, n)  # csv: 6 digits
    gen = table.merge(scores[scores.model == "smollm2"], on=["prompt_id", "sample_id"])
    for i in rng.choice(len(gen), size=12, replace=False):
        ref, n_ref = _dexperts_ppl(model, tok, gen.prompt[i], gen.continuation[i])
        assert gen.n_scored_tokens[i] == n_ref and gen.ppl[i] == pytest.approx(ref, rel=1e-4)
    corr = pd.read_csv(wf.path("results/analysis/correlations.csv"))
    methods = {"spearman", "kendall_tau_b", "pearson", "partial_spearman_given_length"}
    assert set(corr.method) == methods | {"within_prompt_spearman"}
    boot = corr[corr.method == "spearman"]
    assert ((boot.ci_low <= boot.value) & (boot.value <= boot.ci_high)).all()
    # The generations' own toxicity is probed too: their continuations, labelled by the scores above.
    tox = pd.read_parquet(wf.path("results/probes/toxicity/data.parquet"))
    joined = tox.merge(
        scores, left_on=["run", "prompt_id", "sample_id"], right_on=["model", "prompt_id", "sample_id"]
    )
    assert len(joined) == len(tox) > 0.9 * len(scores) and (joined.toxicity_x == joined.toxicity_y).all()
    assert (tox.toxic == (tox.toxicity >= 0.5)).all() and 0 < tox.toxic.sum() < len(tox)
    tox_metrics = pd.read_csv(wf.path("results/probes/toxicity/smollm2/metrics.csv"))
    assert len(tox_metrics) == 31 and set(tox_metrics.label) == {"toxic"}
    assert tox_metrics.auroc.between(0, 1).all() and (tox_metrics.n_test_positive > 0).all()
    html = wf.path("results/analysis/report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "alt-profanity-check" in html and "&gt;= 0.5" in html
    assert "generated smollm2, smollm2-t07" in html  # the fluency model is the generator: said
    for table in ("settings", "summary", "differences", "correlations", "summary_by_prompt_toxicity"):
        assert wf.path(f"results/analysis/tables/{table}.csv").exists()
        assert wf.path(f"results/analysis/tables/{table}.tex").exists()
    for png in wf.path("results/analysis/figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_demo_has_nothing_to_do_and_every_shard_done(finished_demo):
    wf = finished_demo
    status = wf.shardwise("status").stdout
    assert "generate/smollm2: 2 shards (2 done, 0 running, 0 failed, 0 pending)" in status
    assert "teacher_logits/smollm2: 2 shards (2 done, 0 running, 0 failed, 0 pending)" in status
    assert "activations/labelled/smollm2: 2 shards (2 done" in status
    assert "activations/toxicity/smollm2: 2 shards (2 done" in status
    assert "score_fluency/smollm2-t07: 2 shards (2 done" in status  # deeper under results/
    done = wf.run()
    assert "Nothing to be done" in done.stdout + done.stderr


def test_a_change_of_how_probes_are_trained_retrains_them_and_leaves_the_activations(finished_demo):
    wf = finished_demo
    raw = yaml.safe_load(wf.path("config/config.yaml").read_text())
    raw["probes"]["l2_grid"] = [0.01, 0.1]
    variant = wf.root.parent / "variant-l2-grid.yaml"  # outside the shared workflow
    variant.write_text(yaml.safe_dump(raw, sort_keys=False))
    counts = job_counts(wf.run("-n", "--configfile", str(variant)).stdout)
    assert counts["train_probes"] == 2 and not {"activations", "merge_activations"} & set(counts), counts
