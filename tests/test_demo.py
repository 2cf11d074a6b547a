"""The embedded demo end to end, as the README's first command runs it (SmolLM2-135M on CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from shardwise.config import load_config_file


@pytest.mark.slow
def test_demo_dag_end_to_end(workflow_copy):
    wf = workflow_copy
    wf.run(timeout=900)
    cfg = load_config_file(wf.path("config/config.yaml"))
    n_prompts = len(wf.path("config/demo/prompts.jsonl").read_text().splitlines())
    k = cfg.generate.runs["smollm2"].sampling.samples_per_prompt

    table = pd.read_parquet(wf.path("results/generations/smollm2.parquet"))
    assert len(table) == n_prompts * k >= 96
    assert table.groupby("prompt_id").sample_id.apply(sorted).map(list).eq([list(range(k))] * n_prompts).all()
    assert table.continuation.str.strip().str.len().gt(0).all()  # real text for every (prompt, sample)
    assert table.continuation.str.split().str.len().mean() > 5
    assert set(table.topic) >= {"weather", "science", "questions"}  # extra columns carried through

    info = json.loads(wf.path("results/generations/run_info.json").read_text())
    assert info["config"]["models"]["smollm2"]["source"] == "package"
    record = json.loads(wf.path("resources/models/smollm2/shardwise-model.json").read_text())
    assert record["weights"] == ["model.safetensors"]

    status = wf.shardwise("status").stdout
    assert "generate/smollm2: 2 shards (2 done, 0 running, 0 failed, 0 pending)" in status
    assert "Nothing to be done" in wf.run().stdout + wf.run().stderr
