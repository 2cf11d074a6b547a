"""Activations and probes: what a layer index means, pooling in hooks, byte identity across shard
layouts, the group-aware split, the vectorised trainer against scikit-learn, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import job_counts, tiny_config, write_prompts

from shardwise.activations import pooled_states, resolve_layers
from shardwise.config import load_config
from shardwise.errors import InputError
from shardwise.models import load_model
from shardwise.probes import (
    AUROC_CI_METHOD,
    auroc_bootstrap,
    auroc_columns,
    auroc_interval,
    auroc_leave_one_group_out,
    control_labels,
    control_task,
    f1_threshold,
    fit,
    metrics_table,
    p_values,
    permutation_null,
    permuted_labels,
    scores,
)
from shardwise.splits import check_split, group_split
from shardwise.toxicity_probe_data import balanced_sample, build, toxicity_table

LABELS = ["subject_plural", "main_negated", "has_number", "past_tense"]
DEMO = Path(__file__).resolve().parents[1] / "config/demo/labelled.jsonl"


def probes_config(model_src: Path, data: Path, **probes) -> dict:
    cfg = tiny_config(model_src)
    shards = {
        "n_shards": 2,
        "shards_per_job": 2,
        "gpus_per_shard": 0,
        "chunk_size": 32,
        **probes.pop("shards", {}),
    }
    cfg["probes"] = {
        "data": str(data),
        "labels": LABELS,
        "models": ["tiny"],
        "max_length": 32,
        "batch_tokens": 256,
        "shards": shards,
        **probes,
    }
    return cfg


def compute(tmp: Path, model_dir: Path, raw_cfg: dict, name: str = "tiny") -> tuple[Path, object]:
    """The activations stage without Snakemake: every job, then the verified merge."""
    from shardwise import activations
    from shardwise.sharded import Request, run_all

    cfg = load_config(raw_cfg)
    data = cfg.probe_sets()["labelled"].data
    request = Request(
        {"probe_set": "labelled", "model": name}, model_dir, data, tmp / "results", tmp / "logs"
    )
    out = tmp / f"{name}.h5"
    work, _ = run_all(activations.STAGE, cfg, request, out, threads=2)
    return out, work.plan


@pytest.mark.integration
def test_random_weights_baseline_is_seeded_and_the_same_in_every_shard(tmp_path, tiny_model_src, tiny_model):
    from shardwise.models import random_model

    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:96]))
    shards = {"n_shards": 3, "chunk_size": 8}
    raw = probes_config(tiny_model_src, data, random_baseline=True, seed=5, shards=shards)
    pr = load_config(raw).probes
    assert pr.probed() == ("tiny", "tiny-random")
    assert pr.weights_of("tiny-random") == ("tiny", True) and pr.weights_of("tiny") == ("tiny", False)
    trained, _ = compute(tmp_path / "a", tiny_model, raw)
    redrawn, _ = compute(tmp_path / "b", tiny_model, raw, name="tiny-random")
    with h5py.File(trained) as f, h5py.File(redrawn) as g:
        a, b = f["activations"][...].astype(np.float32), g["activations"][...].astype(np.float32)
        assert g.attrs["revision"].startswith("random weights (seed 5)")
    assert a.shape == b.shape and not np.allclose(a, b, rtol=0.1, atol=1e-4)
    # every shard drew the same weights: recompute items of each shard with one fresh draw
    model, tok = random_model(tiny_model, "cpu", "float32", seed=5)
    rows = data.read_text().splitlines()
    for item in (0, 40, 90):  # shards 0, 1, 2
        text = json.loads(rows[item])["text"]
        enc = tok([text], truncation=True, max_length=32, return_special_tokens_mask=True)
        with torch.no_grad():
            hidden = model(torch.tensor(enc["input_ids"]), output_hidden_states=True).hidden_states
        content = 1 - torch.tensor(enc["special_tokens_mask"][0])
        mean = torch.stack([(h[0] * content[:, None]).sum(0) / content.sum() for h in hidden[:2]])
        np.testing.assert_allclose(b[:2, item], mean.numpy(), rtol=2e-2, atol=2e-3)  # (the top is pre-norm)


@pytest.mark.unit
def test_layer_indices_and_hook_pooling_match_the_hidden_states(tiny_model):
    model, tok = load_model(tiny_model)
    tok.pad_token = tok.eos_token
    enc = tok(["the cat ran", "a big dog ran over the house"], padding=True, return_tensors="pt")
    mask = enc.attention_mask
    n_blocks = model.config.num_hidden_layers
    layers = resolve_layers(None, n_blocks)
    assert layers == list(range(n_blocks + 1)) and resolve_layers([-1, 0], n_blocks) == [0, n_blocks]
    with pytest.raises(InputError, match="layer 3 is out of range for a model with 2 blocks"):
        resolve_layers([3], n_blocks)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states  # [-1] is after the final norm
        mean = pooled_states(model, enc.input_ids, mask, mask, layers, "mean")
        last = pooled_states(model, enc.input_ids, mask, mask, layers, "last")
        top = model.model.layers[-1]
        pre_norm = {}
        handle = top.register_forward_hook(
            lambda _m, _a, out: pre_norm.update(h=out[0] if isinstance(out, tuple) else out)
        )
        model(**enc)
        handle.remove()
    w = mask.float() / mask.sum(1, keepdim=True)
    for i in range(n_blocks):  # embeddings and blocks below the top: HF's hidden_states[i]
        torch.testing.assert_close(mean[i], torch.einsum("btd,bt->bd", hidden[i], w))
    torch.testing.assert_close(mean[-1], torch.einsum("btd,bt->bd", pre_norm["h"], w))  # before the norm
    assert not torch.allclose(mean[-1], torch.einsum("btd,bt->bd", hidden[-1], w))
    ends = mask.sum(1) - 1
    torch.testing.assert_close(last[1], hidden[1][torch.arange(2), ends])
    only_embeddings = pooled_states(model, enc.input_ids, mask, mask, [0], "mean")  # stops early
    torch.testing.assert_close(only_embeddings[0], mean[0])


@pytest.mark.integration
def test_activations_of_1_and_3_shards_are_identical(tmp_path, tiny_model_src, tiny_model):
    one, _ = compute(
        tmp_path / "one", tiny_model, probes_config(tiny_model_src, DEMO, shards={"n_shards": 1})
    )
    three, plan = compute(
        tmp_path / "three", tiny_model, probes_config(tiny_model_src, DEMO, shards={"n_shards": 3})
    )
    assert len(list(plan.store.glob("*.h5"))) == 3
    with h5py.File(one) as a, h5py.File(three) as b:
        assert a["activations"].dtype == np.float16 and a["activations"].shape[:2] == (3, 480)
        for name in a:
            assert a[name][...].tobytes() == b[name][...].tobytes(), name
        assert list(a["item_ids"][...]) == list(range(480)) and a.attrs["pooling"] == "mean"


@pytest.mark.unit
def test_split_keeps_groups_on_one_side_and_balances_labels():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 150, size=600)
    y = rng.random((600, 3)) < [0.5, 0.2, 0.05]
    split = group_split(groups.tolist(), y.astype(float), 0.2, 0.2, seed=1)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    shares = np.bincount(split, minlength=3) / 600
    np.testing.assert_allclose(shares, [0.6, 0.2, 0.2], atol=0.03)
    for k in range(3):
        pos = y[:, k].sum()
        np.testing.assert_allclose(
            [y[split == s, k].sum() / pos for s in range(3)], [0.6, 0.2, 0.2], atol=0.1
        )
    assert np.array_equal(split, group_split(groups.tolist(), y.astype(float), 0.2, 0.2, seed=1))
    with pytest.raises(InputError, match="fewer than the splits need: the val split has"):
        check_split(np.array([0, 0, 2, 2]), np.array([[0], [1], [0], [1]]), ["x"], "data.jsonl")


def planted(n=900, n_layers=3, dim=16, k=4, seed=0):
    """Layer l carries label k's signal with strength (l + 1) / n_layers along a random direction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_layers, n, dim)) * rng.uniform(0.5, 3, size=dim) + rng.normal(size=dim)
    y = np.zeros((n, k))
    for j in range(k):
        direction = rng.normal(size=dim)
        z = x[-1] @ direction / np.sqrt(dim) + rng.normal(size=n) * 0.7 - (0.8 if j % 2 else 0)
        y[:, j] = z > 0
    for i in range(n_layers - 1):  # lower layers: noisier copies
        x[i] = x[-1] + rng.normal(size=(n, dim)) * (n_layers - 1 - i)
    return torch.tensor(x, dtype=torch.float32), y


@pytest.mark.unit
def test_vectorised_trainer_matches_scikit_learn_per_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y = planted()
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.3, seed=0)
    probe = fit(x, y, split, [1e-3, 1e-2, 1e-1])
    p = scores(x, probe).numpy()
    tr, te = split == 0, split == 2
    for i in range(x.shape[0]):
        mean, std = x[i, tr].mean(0), x[i, tr].std(0)
        z = ((x[i] - mean) / std).numpy()
        for j in range(y.shape[1]):
            # the same objective: balanced weights, L2 on standardised features at the chosen strength
            c = 1.0 / (float(probe.l2[i, j]) * tr.sum())
            clf = LogisticRegression(class_weight="balanced", C=c, max_iter=5000).fit(z[tr], y[tr, j])
            ref = roc_auc_score(y[te, j], clf.predict_proba(z[te])[:, 1])
            ours = roc_auc_score(y[te, j], p[i, te, j])
            assert abs(ours - ref) <= 0.01, (i, j, ours, ref)
            assert ref > 0.6  # there is a signal to find
    assert probe.W.shape == (3, 4, 16) and probe.b.shape == (3, 4)


@pytest.mark.unit
def test_without_early_stopping_the_trainer_converges_to_scikit_learns_weights():
    """Early stopping keeps a probe's best-validation iterate; without it, every probe of the batch
    must reach the same optimum as scikit-learn's L-BFGS on its own (same objective). Weights within
    1 % need a tighter gap than the default `tolerance` certifies (the objective within 0.2 %)."""
    from sklearn.linear_model import LogisticRegression

    x, y = planted()
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.3, seed=0)
    tr = split == 0
    for l2 in (1e-2, 1.0):
        probe = fit(x, y, split, [l2], patience=None, tolerance=1e-9)
        for i in range(x.shape[0]):
            mean, std = x[i, tr].mean(0), x[i, tr].std(0)
            z = ((x[i] - mean) / std).numpy()
            for j in range(y.shape[1]):
                clf = LogisticRegression(class_weight="balanced", C=1.0 / (l2 * tr.sum()), tol=1e-8)
                clf.fit(z[tr], y[tr, j])
                ours = (probe.W[i, j] * std).numpy()  # back to the standardised space
                scale = np.abs(clf.coef_[0]).max()
                assert np.abs(ours - clf.coef_[0]).max() <= 0.01 * scale, (l2, i, j)
                bias = float(probe.b[i, j] + probe.W[i, j] @ mean)
                assert abs(bias - clf.intercept_[0]) <= 0.01 * max(scale, abs(clf.intercept_[0])), (l2, i, j)


def factor_structured(dim, n=400, n_layers=2, k=3, seed=0):
    """Features shaped like real residual streams: one dominant direction shared by every feature
    (scale 30, ~D times the curvature of the rest), the labels in weak random directions."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.4).astype(np.int64)
    layers = []
    for i in range(n_layers):
        shared = rng.standard_normal((n, 1)) * 30.0 * (1.0 + 0.1 * rng.standard_normal((1, dim)))
        directions = rng.standard_normal((k, dim)) / np.sqrt(dim)
        layers.append(shared + rng.standard_normal((n, dim)) + (2 * y - 1) @ directions * 3 * (0.5 + i))
    return torch.tensor(np.stack(layers), dtype=torch.float32), y


def _objective(z, y, w, b, l2):
    """The trainer's objective for one probe in the standardised space (class weights sum to 1)."""
    t = z @ w + b
    c = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum())
    return float((c * (np.logaddexp(0, t) - y * t)).sum() + 0.5 * l2 * (w @ w))


@pytest.mark.integration
@pytest.mark.parametrize("dim", [2048, 4096])
def test_the_solver_reaches_scikit_learns_objective_at_real_widths(dim):
    """Batched L-BFGS with 4 backtracking steps stopped at W = 0 (objective 0.693) on these
    features, where scikit-learn reaches 0.14-0.66; now every probe must be within 1 %."""
    from sklearn.linear_model import LogisticRegression

    x, y = factor_structured(dim)
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.2, seed=0)
    tr = split == 0
    for l2 in (1e-3, 1e-1):
        probe = fit(x, y, split, [l2], patience=None, max_steps=300)
        assert probe.not_converged() == {} and set(probe.status_names().ravel()) == {"converged"}
        for i in range(x.shape[0]):
            mean, std = x[i, tr].mean(0), x[i, tr].std(0)
            z = ((x[i] - mean) / std).double().numpy()[tr]
            for j in range(y.shape[1]):
                clf = LogisticRegression(
                    class_weight="balanced", C=1.0 / (l2 * tr.sum()), tol=1e-8, max_iter=5000
                )
                clf.fit(z, y[tr, j])
                ref = _objective(z, y[tr, j], clf.coef_[0], clf.intercept_[0], l2)
                w = (probe.W[i, j] * std).double().numpy()
                ours = _objective(z, y[tr, j], w, float(probe.b[i, j] + probe.W[i, j] @ mean), l2)
                assert ref < 0.69 and np.abs(w).max() > 0  # not the W = 0 of a stalled solver
                assert ours <= ref * 1.01, (dim, l2, i, j, ours, ref)


def separable(dim: int, n: int = 200, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """N < D rows (linearly separable) with three dominant directions shared by every feature, as
    real residual streams have, and each label in a weak random direction."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.4).astype(np.int64)
    shared = rng.standard_normal((n, 3)) @ (rng.standard_normal((3, dim)) * 10 + 30) / np.sqrt(3)
    noise, directions = rng.standard_normal((n, dim)), rng.standard_normal((k, dim)) / np.sqrt(dim)
    x = shared + noise + (2 * y - 1) @ directions * 3
    return torch.tensor(x[None], dtype=torch.float32), y


@pytest.mark.unit
def test_a_probe_is_converged_only_within_tolerance_of_scikit_learns_objective_on_separable_data():
    """L2 = 1e-6, 120 training rows x 2048 dims: the old absolute test (every gradient entry below
    1e-5) said "converged" at 1.114 and 1.078 x scikit-learn's objective, and at L2 = 0 after 33
    steps. Now `converged` means the gap bound is below tolerance x objective; these two end
    `stalled` (float32 resolves no further decrease) at 1.009 and 1.006 x, and say so."""
    from sklearn.linear_model import LogisticRegression

    x, y = separable(2048)
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.2, seed=0)
    tr = split == 0
    l2 = 1e-6
    probe = fit(x, y, split, [l2], patience=None, max_steps=300)
    mean, std = x[0, tr].mean(0), x[0, tr].std(0)
    z = ((x[0] - mean) / std).double().numpy()[tr]
    names = probe.status_names()[0]
    for j in range(y.shape[1]):
        clf = LogisticRegression(class_weight="balanced", C=1.0 / (l2 * tr.sum()), tol=1e-10, max_iter=20000)
        clf.fit(z, y[tr, j])  # the same objective scaled by 1 / l2
        ref = _objective(z, y[tr, j], clf.coef_[0], clf.intercept_[0], l2)
        w = (probe.W[0, j] * std).double().numpy()
        ours = _objective(z, y[tr, j], w, float(probe.b[0, j] + probe.W[0, j] @ mean), l2)
        # "converged" only within the default relative tolerance (2e-3) of the optimum, float32 aside
        assert names[j] != "converged" or ours <= ref * (1 + 2e-3) + 1e-6, (j, names[j], ours / ref)
        assert names[j] in ("converged", "stalled"), (j, names[j])  # not out of steps
        assert ours <= ref * 1.02, (j, names[j], ours / ref)  # and it gets close (1.009x, 1.006x)
    # without a penalty no minimum exists on separable data: never "converged"
    unbounded = fit(x, y, split, [0.0], patience=None, max_steps=60)
    assert "converged" not in set(unbounded.status_names().ravel())


@pytest.mark.unit
def test_a_probe_that_cannot_descend_is_counted_as_stalled():
    x, y = planted()
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.3, seed=0)
    ok = fit(x, y, split, [1e-2], patience=None)
    assert ok.not_converged() == {}
    # without backtracking, a unit gradient step along a dominant direction cannot descend: stalled
    x, y = factor_structured(1024)
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.2, seed=0)
    stuck = fit(x, y, split, [1e-3], patience=None, backtracking=0)
    codes = stuck.status_names()
    assert (
        stuck.not_converged() == {"stalled": int((codes == "stalled").sum())} and (codes == "stalled").any()
    )


def typed(encode_types: bool, n_types=40, per_type=15, dim=24, seed=0):
    """Rows of control types; the features encode either each row's type (a type embedding) or
    only the label (and no type), the label being a property of the type in the first case."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.arange(n_types), per_type)
    rng.shuffle(types)
    emb = rng.normal(size=(n_types, dim)) * 2
    if encode_types:
        y = (emb[:, 0] > 0).astype(np.int64)[types][:, None]  # the label is a function of the type
        x = emb[types] + rng.normal(size=(len(types), dim))
    else:
        y = (rng.random(len(types)) < 0.5).astype(np.int64)[:, None]
        x = rng.normal(size=(len(types), dim)) + np.outer(2 * y[:, 0] - 1, rng.normal(size=dim))
    return torch.tensor(np.stack([x, x]), dtype=torch.float32), y, types.astype(str)


@pytest.mark.unit
@pytest.mark.parametrize("encode_types", [True, False])
def test_type_level_control_measures_selectivity(encode_types):
    x, y, types = typed(encode_types)
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.3, seed=0)  # types span the splits
    control = control_labels(y, types, seed=0)
    for t in np.unique(types):  # one label per type, in every split
        assert len(np.unique(control[types == t])) == 1
    both = np.concatenate([y, control], axis=1)
    probe = fit(x, both, split, [1e-3, 1e-2, 1e-1], l2_from=[0, 0])
    assert (probe.l2[:, 1] == probe.l2[:, 0]).all()  # the control takes its probe's L2
    table = metrics_table(scores(x, probe).numpy(), both, split, [0, 1], ["a"])
    assert (table.selectivity == table.auroc - table.control_auroc).all()
    assert table.auroc.min() > 0.9
    if encode_types:  # memorising types solves the control too: no selectivity
        assert table.control_auroc.min() > 0.85 and table.selectivity.abs().max() < 0.15
    else:  # the features say nothing of the type: the control is at chance
        assert abs(table.control_auroc.mean() - 0.5) < 0.15 and table.selectivity.min() > 0.3


def rare_label(seed: int, n: int = 600, n_types: int = 12, rate: float = 0.1) -> tuple:
    """A rare label (10 %) and 12 control types over single-row groups (types span the splits)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n).astype(str)
    y = (rng.random((n, 1)) < rate).astype(np.int64)
    split = group_split([str(i) for i in range(n)], y, 0.2, 0.2, seed=seed)
    return y, types, split


@pytest.mark.unit
def test_the_control_of_a_rare_label_has_both_classes_in_every_split():
    """12 types, a 10 % label: one seeded draw per type left a split with one control class in
    27 % of seeds (test AUROC, and so selectivity, NaN); the draw is now conditional on both
    classes in train, val and test."""
    old_bad = 0
    for seed in range(100):
        y, types, split = rare_label(seed)
        first = control_labels(y, types, seed)  # the unconditional draw
        old_bad += any(len(np.unique(first[split == s])) < 2 for s in range(3))
        control, info = control_task(y, types, split, ["rare"], seed, "data.jsonl")
        assert all(set(np.unique(control[split == s, 0])) == {0, 1} for s in range(3)), seed
        for t in np.unique(types):  # still one label per type
            assert len(np.unique(control[types == t])) == 1
        if all(len(np.unique(first[split == s])) == 2 for s in range(3)):
            assert np.array_equal(control, first)  # a usable first draw is kept
        assert info["n_types"] == 12 and info["n_types_train_and_test"] == 12
        assert info["test_rows_seen_type"] == 1.0
    assert old_bad >= 15  # the unconditional draw fails often: the check above can fail
    # one of those seeds through the trainer: selectivity is a number, not NaN
    y, types, split = rare_label(3)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(1, len(y), 8)) + y[None] * 0.8, dtype=torch.float32)
    selectivity = []
    for control in (control_labels(y, types, 3), control_task(y, types, split, ["rare"], 3, "d")[0]):
        both = np.concatenate([y, control], axis=1)
        probe = fit(x, both, split, [1e-2], l2_from=[0, 0])
        table = metrics_table(scores(x, probe).numpy(), both, split, [0], ["rare"])
        selectivity.append(table.selectivity.iloc[0])
    assert np.isnan(selectivity[0]) and np.isfinite(selectivity[1])


@pytest.mark.unit
def test_a_control_whose_types_never_cross_the_split_is_refused(tmp_path, monkeypatch):
    """Types nested in the split's groups (each template's own words): the control cannot be
    learned (test AUROC ~0.5) and selectivity would be inflated, silently; now one line, before
    any activation is read."""
    from shardwise.probes import run

    rng = np.random.default_rng(0)
    n = 240
    groups = rng.integers(0, 40, n)
    table = pd.DataFrame(
        {
            "id": np.arange(n),
            "text": [f"text {i}" for i in range(n)],
            "group": [f"template{g}" for g in groups],
            "a": (rng.random(n) < 0.5).astype(int),
            "control_type": [f"word{g}-{rng.integers(0, 3)}" for g in groups],  # within a group
        }
    )
    data = tmp_path / "data.jsonl"
    table.to_json(data, orient="records", lines=True)
    pr = load_config({"probes": {"data": str(data), "labels": ["a"]}}).probes
    y = table[["a"]].to_numpy()
    split = group_split(table.group.tolist(), y, 0.2, 0.2, seed=0)
    with pytest.raises(
        InputError, match=r"data.jsonl: none of the \d+ control types occurs in both the train"
    ):
        control_task(y, table.control_type, split, ["a"], 0, f"probes data file {data}")
    with pytest.raises(
        InputError, match=r"none of the \d+ control types occurs in both the train and the test"
    ):
        run(tmp_path / "absent.h5", pr, tmp_path / "out", "tiny")
    # ... and already by `shardwise check` / the DAG's checks, before any activation is computed
    import shardwise.checks as checks
    import shardwise.models as models

    monkeypatch.setattr(models, "check_source", lambda spec: None)
    monkeypatch.setattr(checks, "_check_layers", lambda cfg, name: None)
    cfg = load_config(
        {
            "models": {"tiny": {"source": "local", "path": str(tmp_path)}},
            "probes": {"data": str(data), "labels": ["a"], "models": ["tiny"]},
        }
    )
    with pytest.raises(InputError, match=r"data.jsonl: none of the \d+ control types occurs in both"):
        checks.check_inputs(cfg)
    # types that recur across groups: how many cross, and the share of test rows they cover
    table["control_type"] = [f"word{i % 7}" if i % 2 else f"own{g}" for i, g in enumerate(groups)]
    _, info = control_task(y, table.control_type, split, ["a"], 0, "data")
    te = split == 2
    train_types = set(table.control_type[split == 0])
    assert info["n_types_train_and_test"] == len(train_types & set(table.control_type[te]))
    assert info["test_rows_seen_type"] == pytest.approx(
        table.control_type[te].isin(train_types).mean(), abs=1e-4
    )
    assert 0.4 < info["test_rows_seen_type"] < 0.7


@pytest.mark.unit
def test_fixed_l2_per_column_is_the_grid_fit_at_that_value():
    x, y = planted(n=400, seed=3)
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.3, seed=0)
    grid = fit(x, y, split, [0.05])
    fixed = fit(x, y, split, [0.0], l2_columns=torch.full((3, 4), 0.05))
    torch.testing.assert_close(fixed.W, grid.W, rtol=1e-4, atol=1e-5)
    per_layer = torch.tensor([[0.01] * 4, [0.05] * 4, [1.0] * 4])
    mixed = fit(x, y, split, [0.0], l2_columns=per_layer)
    torch.testing.assert_close(mixed.W[1], grid.W[1], rtol=1e-4, atol=1e-5)  # layers stay apart
    assert torch.equal(mixed.l2, per_layer)


@pytest.mark.unit
def test_permuted_labels_shuffle_within_train_and_val_and_keep_test():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 2)) < [0.3, 0.6]).astype(np.int64)
    split = rng.integers(0, 3, 300)
    null = permuted_labels(y, split, 7, seed=1)
    assert null.shape == (300, 14)
    for c in range(14):
        k = c // 7
        for s in (0, 1, 2):
            assert null[split == s, c].sum() == y[split == s, k].sum()  # class balance per split
        assert (null[split == 2, c] == y[split == 2, k]).all()
        assert (null[split == 0, c] != y[split == 0, k]).any()
    assert len({null[:, c].tobytes() for c in range(7)}) == 7


@pytest.mark.unit
def test_auroc_columns_is_sklearns_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random((200, 5)) + y[:, None] * np.arange(5) * 0.1, 1)  # many ties
    np.testing.assert_allclose(auroc_columns(y, p), [roc_auc_score(y, p[:, m]) for m in range(5)])


@pytest.mark.unit
def test_permutation_p_values_small_for_a_planted_signal_and_uniform_for_noise():
    from shardwise.config import load_config

    pr = load_config({"probes": {"max_steps": 100}}).probes
    rng = np.random.default_rng(0)
    n, dim, k_noise = 400, 12, 30
    x = rng.normal(size=(1, n, dim))
    signal = (x[0, :, 0] + rng.normal(size=n) * 0.5 > 0).astype(np.int64)
    noise = (rng.random((n, k_noise)) < 0.5).astype(np.int64)
    y = np.concatenate([signal[:, None], noise], axis=1)
    xt = torch.tensor(x, dtype=torch.float32)
    split = group_split([str(i) for i in range(n)], y[:, :1], 0.2, 0.3, seed=0)
    probe = fit(xt, y, split, [1e-2, 1e-1, 1.0])
    assert (probe.W.abs().amax(-1) > 0).all()  # early-stopped noise probes too: never left at W = 0
    te = split == 2
    p_test = scores(xt, probe).numpy()[0][te]
    auroc = [auroc_columns(y[te, j], p_test[:, j : j + 1])[0] for j in range(31)]
    null, unconverged = permutation_null(xt, y, split, probe.l2, 39, pr, memory_bytes=2e5)  # small batches
    assert null.shape == (1, 31, 39) and unconverged == 0
    p = p_values(np.array(auroc), null[0])
    assert p[0] == 1 / 40  # the planted signal beats every shuffle
    assert abs(null[0, 0].mean() - 0.5) < 0.05
    noise_p = p[1:]
    assert 0.35 < noise_p.mean() < 0.65 and (noise_p < 0.1).mean() < 0.3  # roughly uniform
    from scipy.stats import kstest

    assert kstest(noise_p, "uniform").pvalue > 0.01


@pytest.mark.unit
def test_metrics_have_the_contract_columns_without_a_control_task():
    x, y = planted(seed=1)
    split = group_split([str(i) for i in range(len(y))], y, 0.2, 0.3, seed=0)
    probe = fit(x, y, split, [1e-2, 1e-1, 1.0])
    table = metrics_table(scores(x, probe).numpy(), y, split, [0, 1, 2], list("abcd"), controls=False)
    assert list(table.columns[:13]) == [
        "label",
        "layer",
        "auroc",
        "auprc",
        "f1",
        "accuracy",
        "balanced_accuracy",
        "precision",
        "recall",
        "n_train",
        "n_test",
        "control_auroc",
        "selectivity",
    ]
    assert len(table) == 12 and table.control_auroc.isna().all() and table.selectivity.isna().all()
    assert table[table.layer == 2].auroc.min() > 0.8
    assert (table.auroc_ci_low <= table.auroc).all() and (table.auroc <= table.auroc_ci_high).all()
    assert (table.auroc_ci_high - table.auroc_ci_low).between(0.001, 0.3).all()
    assert (table.auroc_ci_method == AUROC_CI_METHOD).all()
    assert (table.n_test_groups == (split == 2).sum()).all()
    # with groups (pairs of rows here) only the interval and its group count change
    pairs = np.arange(len(y)) // 2
    grouped = metrics_table(scores(x, probe).numpy(), y, split, [0, 1, 2], list("abcd"), False, groups=pairs)
    assert (grouped.n_test_groups == len(np.unique(pairs[split == 2]))).all()
    pd.testing.assert_frame_equal(
        grouped.drop(columns=["auroc_ci_low", "auroc_ci_high", "n_test_groups"]),
        table.drop(columns=["auroc_ci_low", "auroc_ci_high", "n_test_groups"]),
    )


@pytest.mark.unit
def test_auroc_bootstrap_is_sklearns_auroc_of_each_resample_ties_included():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = (rng.random(60) < 0.3).astype(np.int64)
    p = np.round(rng.random(60) + 0.3 * y, 1)  # few distinct scores: many ties
    boot = auroc_bootstrap(y, p, n_boot=50, seed=7)
    draws = np.random.default_rng(7).integers(0, 60, size=(50, 60))
    ref = [roc_auc_score(y[d], p[d]) if 0 < y[d].sum() < 60 else np.nan for d in draws]
    np.testing.assert_allclose(boot, ref, rtol=0, atol=1e-12)


@pytest.mark.unit
def test_group_bootstrap_is_sklearns_auroc_of_each_resample_of_whole_groups():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    sizes = np.r_[1, 1, 2, 40, rng.integers(1, 12, size=20)]  # tiny and one huge group
    groups = np.repeat([f"g{i}" for i in range(len(sizes))], sizes)
    y = (rng.random(len(groups)) < 0.35).astype(np.int64)
    p = np.round(rng.random(len(groups)) + 0.3 * y, 1)  # ties
    boot = auroc_bootstrap(y, p, n_boot=70, seed=3, groups=groups)
    names = np.unique(groups)
    draws = np.random.default_rng(3).integers(0, len(names), size=(70, len(names)))
    for b, draw in enumerate(draws):
        rows = np.concatenate([np.flatnonzero(groups == names[g]) for g in draw])
        ref = roc_auc_score(y[rows], p[rows]) if 0 < y[rows].sum() < len(rows) else np.nan
        np.testing.assert_allclose(boot[b], ref, rtol=0, atol=1e-12)
    # every row its own group: the row bootstrap, draw for draw
    rows = auroc_bootstrap(y, p, 70, 3, np.arange(len(y)))
    np.testing.assert_array_equal(rows, auroc_bootstrap(y, p, 70, 3))


@pytest.mark.unit
def test_leave_one_group_out_auroc_is_the_auroc_without_that_group():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(6)
    sizes = np.r_[1, 3, 60, rng.integers(1, 9, size=30)]
    groups = np.repeat(np.arange(len(sizes))[::-1], sizes)  # group ids not in row order
    y = (rng.random(len(groups)) < 0.4).astype(np.int64)
    y[groups == 0] = 1  # a group of one class only
    p = np.round(rng.normal(size=len(groups)) + y, 1)  # ties within and across groups
    jack = auroc_leave_one_group_out(y, p, groups)
    for g in np.unique(groups):
        keep = groups != g
        np.testing.assert_allclose(jack[g], roc_auc_score(y[keep], p[keep]), rtol=0, atol=1e-12)
    only = np.array([0, 0, 1, 1])  # dropping the one positive group leaves one class: NaN
    assert np.isnan(auroc_leave_one_group_out(np.array([0, 0, 1, 1]), np.arange(4.0), only)).all()


def clustered(n_groups: int, per_group: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows correlated within their group, as a prompt's generations are: each group has its own
    share of positives (logit u_g - 0.3), score shift (u_g) and signal strength (1 + v_g);
    score = (1 + v_g) y + u_g + e, with u, v, e standard normal."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per_group)
    u, v = rng.normal(size=(2, n_groups))
    y = (rng.random(len(groups)) < 1 / (1 + np.exp(0.3 - u[groups]))).astype(np.int64)
    p = (1 + v[groups]) * y + u[groups] + rng.normal(size=len(groups))
    return y, p, groups


def clustered_auroc() -> float:
    """The population AUROC of :func:`clustered` (a positive and a negative of independent groups),
    by Gauss-Hermite quadrature over both groups' u: P(1 + v + u1 + e1 > u2 + e2) given u1, u2 is
    Phi((1 + u1 - u2) / sqrt(3)), each side weighted by its group's share of its class."""
    from scipy.stats import norm

    u, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    pos, neg = w / (1 + np.exp(0.3 - u)), w / (1 + np.exp(u - 0.3))
    pair = norm.cdf((1 + u[:, None] - u[None, :]) / np.sqrt(3))
    return float(pos @ pair @ neg / (pos.sum() * neg.sum()))


@pytest.mark.unit
def test_clustered_auroc_is_the_population_value():
    y, p, _ = clustered(200_000, 1, seed=0)  # one row per group: independent rows
    assert abs(auroc_columns(y, p[:, None])[0] - clustered_auroc()) < 0.003


@pytest.mark.unit
@pytest.mark.parametrize(("n_groups", "per_group"), [(30, 10), (15, 20)])
def test_auroc_interval_covers_the_true_auroc_with_clustered_rows(n_groups, per_group):
    """Coverage of the 95 % interval over 400 seeded data sets of correlated rows. Resampling rows
    (the old auroc_bootstrap percentiles) covered 81.8 % and 68.0 % here: its interval ignores that a
    group's rows move together. Measured with the group BCa (t-expanded): 94.5 % and 93.0 %."""
    truth = clustered_auroc()
    hits = []
    for seed in range(400):
        y, p, groups = clustered(n_groups, per_group, seed)
        low, high = auroc_interval(y, p, groups, n_boot=1000, seed=seed)
        hits.append(low <= truth <= high)
    assert np.mean(hits) >= 0.92, np.mean(hits)


@pytest.mark.unit
def test_f1_threshold_is_the_best_cut_on_validation():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(4)
    y = (rng.random(200) < 0.2).astype(np.int64)
    p = np.round(rng.random(200) * 0.5 + 0.4 * y, 2)
    t = f1_threshold(y, p)
    best = max(f1_score(y, p >= c) for c in np.unique(p))
    assert f1_score(y, p >= t) == pytest.approx(best)


# --------------------------------------------------------------------------- through Snakemake


def _bad_probe_cases():
    def data(rows):
        return lambda path: path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    good = [json.loads(line) for line in DEMO.read_text().splitlines()]
    return {
        "not binary": (
            data([{**r, "past_tense": 2 if i == 3 else r["past_tense"]} for i, r in enumerate(good)]),
            {},
            "label column 'past_tense' is not binary (values 2)",
        ),
        "one class": (
            data([{**r, "has_number": 1} for r in good]),
            {},
            "label 'has_number' has one class only (all 1)",
        ),
        "no text": (
            data([{k: v for k, v in r.items() if k != "text"} for r in good]),
            {},
            "no 'text' column",
        ),
        "too few rows": (
            data(good[:12]),
            {"shards": {"n_shards": 1}},
            "12 rows are fewer than the splits need",
        ),
        "unknown label": (None, {"labels": ["subject_plural", "nope"]}, "no 'nope' column"),
        "one control type": (
            data([{**r, "control_type": "same"} for r in good]),
            {},
            "column 'control_type' has 1 type only",
        ),
        "control type decides a label": (
            data([{**r, "control_type": f"{r['past_tense']}-{r['id'] % 5}"} for r in good]),
            {},
            "label 'past_tense' is constant within every control_type",
        ),
        "no permutations": (
            None,
            {"permutations": 0},
            "probes.permutations: 0 is less than the minimum of 1",
        ),
    }


@pytest.mark.integration
@pytest.mark.parametrize("case", list(_bad_probe_cases()))
def test_bad_probe_input_is_one_line(workflow_copy, tiny_model_src, case):
    change, probes, expected = _bad_probe_cases()[case]
    wf = workflow_copy
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    data = wf.path("config/labelled.jsonl")
    data.write_text(DEMO.read_text())
    if change:
        change(data)
    wf.write_config(probes_config(tiny_model_src, Path("config/labelled.jsonl"), **probes))
    proc = wf.run("-n", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert expected in errors[0]


@pytest.mark.integration
def test_random_baseline_adds_its_own_activations_and_probes_to_the_dag(workflow_copy, tiny_model_src):
    wf = workflow_copy
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    wf.path("config/labelled.jsonl").write_text(DEMO.read_text())
    wf.write_config(probes_config(tiny_model_src, Path("config/labelled.jsonl"), random_baseline=True))
    out = wf.run("-n", "all_probes").stdout
    counts = job_counts(out)
    assert counts["train_probes"] == 2 and counts["merge_activations"] == 2 and counts["prepare_model"] == 1
    assert "results/probes/labelled/tiny-random/metrics.csv" in out


@pytest.mark.integration
def test_a_lost_activations_shard_heals_by_running_the_same_command(workflow_copy, tiny_model_src):
    wf = workflow_copy
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    wf.path("config/labelled.jsonl").write_text(DEMO.read_text())
    cfg = probes_config(tiny_model_src, Path("config/labelled.jsonl"), max_steps=20, permutations=2)
    wf.write_config(cfg)
    wf.run("all_probes")
    merged = wf.path("results/activations/labelled/tiny.h5")
    with h5py.File(merged) as f:
        reference = f["activations"][...]
    (store,) = wf.path("results/activations/labelled/tiny/shards").iterdir()
    kept, lost = store / "0000-of-0002.h5", store / "0001-of-0002.h5"
    before = kept.stat().st_mtime_ns
    lost.unlink()
    merged.unlink()
    proc = wf.run("results/activations/labelled/tiny.h5")  # asked for: the probes above it are intact
    assert "activations/labelled/tiny job 0: shard 1 (file missing)" in proc.stderr
    assert kept.stat().st_mtime_ns == before and lost.is_file()
    with h5py.File(merged) as f:
        assert np.array_equal(f["activations"][...], reference)


@pytest.mark.integration
def test_probes_through_snakemake_and_a_layer_out_of_range(workflow_copy, tiny_model_src):
    wf = workflow_copy
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    wf.path("config/labelled.jsonl").write_text(DEMO.read_text())
    wf.write_config(probes_config(tiny_model_src, Path("config/labelled.jsonl"), layers=[0, 7]))
    proc = wf.run("-n", "all_probes", check=False)  # refused up front, in a dry run too
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert proc.returncode != 0 and len(errors) == 1
    assert "probes.layers (model 'tiny', " in errors[0] and "config.json)" in errors[0]
    assert any("layer 7 is out of range for a model with 2 blocks" in e for e in errors), proc.stderr

    wf.write_config(
        probes_config(tiny_model_src, Path("config/labelled.jsonl"), layers=[0, -1], max_steps=50)
    )
    wf.run("all_probes")
    out = wf.path("results/probes/labelled/tiny")
    metrics = pd.read_csv(out / "metrics.csv")
    assert sorted(set(metrics.layer)) == [0, 2] and set(metrics.label) == set(LABELS)
    summary = json.loads((out / "aggregate_metrics.json").read_text())
    assert summary["n_probes"] == 8 and set(summary["labels"]) == set(LABELS)
    assert (out / "auroc_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    tensors = load_file(out / "probes.safetensors")
    assert tensors["W"].shape == (2, 4, 32) and tensors["b"].shape == (2, 4)
    # the stored raw-space probes reproduce the metrics' scores
    with h5py.File(wf.path("results/activations/labelled/tiny.h5")) as f:
        x = torch.from_numpy(f["activations"][...].astype(np.float32))
    p = torch.sigmoid(x @ tensors["W"].transpose(1, 2) + tensors["b"].unsqueeze(1))
    assert p.shape == (2, 480, 4) and torch.isfinite(p).all()


def _scored_run(tmp: Path, run: str, continuations: list[str], toxicity: list[float]) -> tuple[Path, Path]:
    n = len(continuations)
    gen = pd.DataFrame(
        {
            "prompt_id": [f"p{i // 2}" for i in range(n)],
            "sample_id": [i % 2 for i in range(n)],
            "prompt": ["a prompt"] * n,
            "continuation": continuations,
        }
    )
    tox = gen[["prompt_id", "sample_id"]].assign(toxicity=toxicity).iloc[::-1]  # order must not matter
    gen.to_parquet(tmp / f"{run}.gen.parquet")
    tox.to_parquet(tmp / f"{run}.tox.parquet")
    return tmp / f"{run}.gen.parquet", tmp / f"{run}.tox.parquet"


@pytest.mark.unit
def test_toxicity_probe_set_joins_scores_to_continuations(tmp_path):
    a = _scored_run(tmp_path, "a", ["you idiot", "   ", "nice day", "fine"], [0.9, 0.7, 0.1, 0.5])
    b = _scored_run(tmp_path, "b", ["stupid", "hello"], [0.6, 0.49])
    table = toxicity_table(["a", "b"], [a[0], b[0]], [a[1], b[1]], threshold=0.5)
    assert table.text.tolist() == ["you idiot", "nice day", "fine", "stupid", "hello"]  # blank dropped
    assert table.toxic.tolist() == [1, 0, 1, 1, 0]  # >= threshold, as the analysis counts
    assert table.id.tolist() == [0, 1, 2, 3, 4] and table.run.tolist() == ["a", "a", "a", "b", "b"]
    assert table.group.tolist() == ["p0", "p1", "p1", "p0", "p0"]  # a prompt's runs stay together
    short = tmp_path / "short.parquet"
    pd.read_parquet(b[1]).iloc[:1].to_parquet(short)
    with pytest.raises(InputError, match=r"short.parquet: do not cover the generations of .*b.gen.parquet"):
        toxicity_table(["b"], [b[0]], [short], threshold=0.5)


@pytest.mark.unit
def test_toxicity_probe_set_refuses_too_few_toxic_generations(tmp_path, tiny_model_src):
    from types import SimpleNamespace

    cfg = probes_config(tiny_model_src, DEMO)
    cfg["analysis"] = {"fluency": {"model": "tiny"}}
    n = 40
    texts = [f"text {i}" for i in range(n)]
    out = tmp_path / "data.parquet"

    def smk(toxic: int) -> SimpleNamespace:
        gen, tox = _scored_run(tmp_path, "tiny", texts, [0.9] * toxic + [0.1] * (n - toxic))
        return SimpleNamespace(
            config=cfg, input=SimpleNamespace(generations=[gen], toxicity=[tox]), output=[out]
        )

    with pytest.raises(
        InputError, match=r"^probes.toxicity: 0 of 40 generations are toxic \(>= 0.5, tiny\): "
    ):
        build(smk(0))
    with pytest.raises(
        InputError, match=r"1 of 40 .* split has only class 0 .*set probes.toxicity: false\)$"
    ):
        build(smk(1))
    assert not out.exists()
    build(smk(12))  # 6 prompts with toxic generations: every split gets some
    assert pd.read_parquet(out).toxic.sum() == 12


@pytest.mark.unit
def test_the_toxicity_probe_set_is_capped_class_balanced_and_by_prompt():

    rng = np.random.default_rng(0)
    n = 5000  # 500 prompts x 10 generations, 8% toxic
    table = pd.DataFrame(
        {
            "id": np.arange(n),
            "group": np.repeat([f"p{i}" for i in range(500)], 10),
            "toxic": (rng.random(n) < 0.08).astype("int64"),
        }
    )
    n_toxic = int(table.toxic.sum())
    half = balanced_sample(table, 2 * (n_toxic - 50), seed=1)
    assert half.toxic.sum() == n_toxic - 50 and (half.toxic == 0).sum() == n_toxic - 50
    short = balanced_sample(table, 1000, seed=1)  # fewer toxic than half: all of them, the rest not
    assert len(short) == 1000 and short.toxic.sum() == n_toxic
    # taken prompt by prompt: the non-toxic rows kept come from whole prompts but for the last one
    kept = short[short.toxic == 0].groupby("group").size()
    full = table[table.toxic == 0].groupby("group").size()[kept.index]
    assert (kept < full).sum() <= 1
    assert short.id.is_monotonic_increasing and short.id.is_unique
    assert balanced_sample(table, 1000, seed=1).equals(short)  # seeded
    assert not balanced_sample(table, 1000, seed=2).equals(short)
    assert balanced_sample(table, n, seed=1) is table  # under the cap: untouched


@pytest.mark.unit
def test_probes_train_a_block_of_layers_at_a_time_within_the_memory_budget(tmp_path, caplog):
    """train_probes reads [L, N, D] a block of layers at a time (an 8B model's capped toxicity set is
    10.8 GB in float32): a budget of two layers gives the probes, metrics and p-values of one pass."""
    from safetensors.numpy import load_file

    from shardwise.probes import layer_blocks, layer_bytes, run

    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:240]))
    labels = ["subject_plural", "has_number"]
    raw = {"probes": {"data": str(data), "labels": labels, "permutations": 5, "max_steps": 60}}
    pr = load_config(raw).probes
    table = pd.read_json(data, lines=True)
    rng = np.random.default_rng(0)
    n_layers, dim = 5, 24
    signal = table[labels].to_numpy(float) @ rng.normal(size=(2, dim))
    acts = np.stack([rng.normal(size=(len(table), dim)) + 0.3 * layer * signal for layer in range(n_layers)])
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as f:
        f["activations"] = acts.astype(np.float16)
        f["item_ids"] = np.arange(len(table))
        f["layers"] = np.arange(n_layers)
    per_layer = layer_bytes(len(table), dim, len(pr.l2_grid) * 2 * len(labels))
    assert [list(b) for b in layer_blocks(n_layers, per_layer, 2.5 * per_layer)] == [[0, 1], [2, 3], [4]]
    assert [list(b) for b in layer_blocks(n_layers, per_layer, 0.1 * per_layer)] == [[i] for i in range(5)]

    whole = run(path, pr, tmp_path / "whole", "tiny", memory_bytes=100 * per_layer)
    with caplog.at_level("INFO", logger="shardwise.probes"):
        blocked = run(path, pr, tmp_path / "blocked", "tiny", memory_bytes=2.5 * per_layer)
    assert "3 block(s) of <= 2 layers" in caplog.text
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("whole", "blocked"))
    assert len(a) == n_layers * len(labels)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    wa, wb = (load_file(str(tmp_path / d / "probes.safetensors")) for d in ("whole", "blocked"))
    np.testing.assert_allclose(wa["W"], wb["W"], rtol=1e-5, atol=1e-6)
    assert whole["labels"] == blocked["labels"]
