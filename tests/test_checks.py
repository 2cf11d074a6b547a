"""Small checks before any job runs: safe names, a quoted --profile path (finding 6 of issue 25)."""

from __future__ import annotations

import shlex

import pytest
import yaml
from conftest import REPO

from shardwise.checks import check_inputs
from shardwise.config import load_config
from shardwise.errors import ConfigError, ShardwiseError
from shardwise.profile import install_profile

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("section", "name"),
    [("run", "smollm2/t07"), ("run", "../x"), ("model", "a b"), ("run", ".hidden"), ("run", "-x")],
)
def test_names_are_one_safe_path_component(section, name):
    raw = yaml.safe_load((REPO / "config/config.yaml").read_text())
    if section == "run":
        runs = raw["generate"]["models"]
        runs[name] = {**(runs.pop(list(runs)[-1]) or {}), "model": "smollm2"}
        where = "generate.models"
    else:
        raw["models"][name] = raw["models"]["smollm2"]
        where = "models"
    cfg = load_config(raw, base_dir=REPO)
    with pytest.raises(ConfigError, match=rf"^{where}: {name!r} is not a safe name".replace(".", r"\.")):
        check_inputs(cfg)


def test_the_profile_path_is_quoted(tmp_path, monkeypatch):
    workflow = tmp_path / "my project"
    (workflow / "profiles/slurm").mkdir(parents=True)
    (workflow / "profiles/slurm/config.yaml").write_text("executor: slurm\n")
    monkeypatch.chdir(workflow)
    (tmp_path / "user/slurm").mkdir(parents=True)  # a different profile there already
    with pytest.raises(ShardwiseError) as err:
        install_profile("slurm", tmp_path / "user")
    quoted = shlex.quote(str(workflow / "profiles/slurm"))
    assert quoted.startswith("'") and f"`snakemake --profile {quoted}` instead" in str(err.value)


def test_a_prompt_longer_than_the_models_context_is_refused(tmp_path, tiny_model_src, monkeypatch):
    """The tiny model's context is 512 tokens; a 1.26M-character prompt was accepted silently."""
    import json

    from conftest import tiny_config, write_prompts

    monkeypatch.chdir(tmp_path)
    write_prompts(tmp_path / "prompts.jsonl", 20)
    cfg = load_config(tiny_config(tiny_model_src, "prompts.jsonl", sampling={"max_new_tokens": 64}))
    check_inputs(cfg)  # short prompts: nothing to tokenize
    with open(tmp_path / "prompts.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt_id": "long", "prompt": "the cat ran " * 300}) + "\n")
    with pytest.raises(
        ShardwiseError,
        match=r"prompt 'long' is \d+ tokens \(3,600 characters\); with "
        r"max_new_tokens 64 it does not fit generate\.models\.tiny \(model 'tiny', context 512",
    ):
        check_inputs(cfg)
    cfg = load_config(tiny_config(tiny_model_src, "prompts.jsonl", sampling={"max_new_tokens": 600}))
    with pytest.raises(ConfigError, match="max_new_tokens 600 leaves no room for a prompt"):
        check_inputs(cfg)
