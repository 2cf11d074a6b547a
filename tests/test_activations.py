"""Activations beyond float16's range (issue 23, finding 4): a pooled value above 65,504 is stored
in float32 instead of becoming inf and the probes train on it; the rule is per value, so parts of
either dtype concatenate to the same file for any shard layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_model, tiny_config

from shardwise.activations import ActivationsCodec, concat, storable
from shardwise.config import ModelSpec, load_config

DEMO = Path(__file__).resolve().parents[1] / "config/demo/labelled.jsonl"
LABELS = ["subject_plural", "has_number"]
PLANTED = 7.0e4  # > float16's largest finite value, 65,504


def _config(model_src: Path, data: Path, n_shards: int) -> dict:
    cfg = tiny_config(model_src)
    cfg["probes"] = {
        "data": str(data),
        "labels": LABELS,
        "models": ["tiny"],
        "max_length": 32,
        "batch_tokens": 256,
        "permutations": 2,
        "max_steps": 60,
        "shards": {"n_shards": n_shards, "shards_per_job": n_shards, "gpus_per_shard": 0, "chunk_size": 32},
    }
    return cfg


def _compute(tmp: Path, model_dir: Path, raw: dict) -> Path:
    from shardwise import activations
    from shardwise.sharded import Request, run_all

    cfg = load_config(raw)
    data = cfg.probe_sets()["labelled"].data
    request = Request(
        {"probe_set": "labelled", "model": "tiny"}, model_dir, data, tmp / "results", tmp / "logs"
    )
    out = tmp / "tiny.h5"
    run_all(activations.STAGE, cfg, request, out, threads=1)
    return out


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with embedding dimension 3 set to ~7e4 (x U(1, 1.1), seeded) for every token:
    the residual stream carries it, so every layer's pooled activations hold a value > 65,504."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardwise.models import prepare_model

    root = tmp_path_factory.mktemp("outlier")
    src = make_tiny_model(root / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(0)
        emb[:, 3] = PLANTED * (1 + 0.1 * torch.rand(emb.shape[0], generator=gen))
    model.save_pretrained(src)
    dest = root / "prepared"
    prepare_model(ModelSpec(name="tiny", source="local", path=str(src)), dest)
    return dest


@pytest.mark.integration
def test_a_planted_7e4_activation_is_stored_finite_and_the_probes_train(tmp_path, outlier_model):
    from shardwise.probes import run

    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:240]))
    raw = _config(outlier_model, data, n_shards=1)
    path = _compute(tmp_path / "one", outlier_model, raw)
    summary = run(path, load_config(raw).probes, tmp_path / "probes", "tiny")
    metrics = pd.read_csv(tmp_path / "probes" / "metrics.csv")
    assert len(metrics) == 3 * len(LABELS)
    assert np.isfinite(metrics["auroc"]).all() and np.isfinite(summary["mean_test_auroc"])
    with h5py.File(path) as f:
        acts = f["activations"][...]
    assert np.isfinite(acts).all()
    assert acts.dtype == np.float32  # a value beyond float16's range: the file is float32
    assert (np.abs(acts[:, :, 3]) > 65504).all() and np.abs(acts).max() < 1.2 * PLANTED
    small = np.abs(acts) <= 65504  # the others keep float16's precision (the same bytes in any layout)
    assert np.array_equal(acts[small], acts[small].astype(np.float16).astype(np.float32))


@pytest.mark.unit
def test_storable_keeps_float16_unless_a_value_overflows_it():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(2, 5, 8)).astype(np.float32) * 100
    half = storable(states)
    assert half.dtype == np.float16 and np.array_equal(half, states.astype(np.float16))
    states[1, 2, 3], states[0, 4, 0] = PLANTED, -65520.0  # -65,520 rounds to -inf in float16
    big = storable(states)
    assert big.dtype == np.float32 and np.isfinite(big).all()
    assert big[1, 2, 3] == PLANTED and big[0, 4, 0] == -65520.0
    rest = np.ones(states.shape, dtype=bool)
    rest[1, 2, 3] = rest[0, 4, 0] = False
    assert np.array_equal(big[rest], half[rest].astype(np.float32))  # the others: float16's values


@pytest.mark.unit
def test_concat_of_float16_and_float32_parts_is_float32_with_the_same_values(tmp_path):
    rng = np.random.default_rng(1)
    parts, whole = [], []
    for i, planted in enumerate((None, PLANTED, None)):
        states = rng.normal(size=(3, 4, 6)).astype(np.float32)
        if planted is not None:
            states[2, 1, 5] = planted
        stored = storable(states)
        whole.append(stored.astype(np.float32))
        obj = {"activations": stored, "item_ids": np.arange(4 * i, 4 * i + 4), "layers": [0, 1, 2]}
        ActivationsCodec().write(obj, tmp_path / f"part{i}.h5")
        parts.append(tmp_path / f"part{i}.h5")
    concat(parts, tmp_path / "all.h5", {"model": "m"})
    concat(parts[::2], tmp_path / "halves.h5", {"model": "m"})
    with h5py.File(tmp_path / "all.h5") as f, h5py.File(tmp_path / "halves.h5") as g:
        assert f["activations"].dtype == np.float32 and g["activations"].dtype == np.float16
        assert np.array_equal(f["activations"][...], np.concatenate(whole, axis=1))
        assert list(f["item_ids"][...]) == list(range(12)) and f.attrs["model"] == "m"
