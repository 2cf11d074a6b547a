"""config/snellius.yaml, the Snellius example: valid against today's schema (without its prompts file or
models, which live on the cluster), Hub models pinned explicitly, one job = one gpu_a100 node."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from shardwise.config import Config, load_config

pytestmark = pytest.mark.unit

PATH = Path(__file__).resolve().parents[1] / "config" / "snellius.yaml"
PLACEHOLDER = "<commit-sha>"  # what the example ships; users paste a commit hash over it
GPUS_PER_NODE = 4  # gpu_a100: 4 x A100 40 GB


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cfg(raw) -> Config:
    # load_config validates against the schema (unknown keys are errors) but, unlike
    # load_config_file + `shardwise check`, does not look for the prompts file or the models.
    return load_config(raw, source=str(PATH))


def test_validates_against_the_schema(cfg):
    assert cfg.generate.runs
    assert cfg.hf_home and cfg.hf_home.startswith("/")


def test_every_model_is_from_the_hub_with_an_explicit_revision(raw, cfg):
    assert cfg.models
    for name, spec in cfg.models.items():
        assert spec.source == "hf", name
        assert "revision" in raw["models"][name], f"{name}: revision not set (would default to main)"
        assert spec.revision == PLACEHOLDER or re.fullmatch(r"[0-9a-f]{40}", spec.revision), (
            f"{name}: revision {spec.revision!r} is neither a commit hash nor the placeholder"
        )


def test_generation_runs_use_registry_models(cfg):
    for run in cfg.generate.runs.values():
        assert run.model in cfg.models


def test_the_realtoxicityprompts_protocol(cfg):
    for run in cfg.generate.runs.values():
        s = run.sampling
        assert (s.samples_per_prompt, s.max_new_tokens, s.top_p, s.top_k) == (25, 20, 0.9, 0), run.name


def test_one_generate_job_is_one_gpu_a100_node(cfg):
    shards = cfg.generate.shards
    assert shards.shards_per_job * shards.gpus_per_shard == GPUS_PER_NODE
    assert shards.gpus_per_job == GPUS_PER_NODE
