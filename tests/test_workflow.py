"""The workflow through Snakemake (subprocesses, tiny model): dry run, bad input, determinism across
shard layouts, code edits, status (a SIGKILLed worker: tests/test_slurm.py, tests/test_shards.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import Workflow, job_counts, make_tiny_model, tiny_config, write_prompts

pytestmark = pytest.mark.integration


def setup(wf: Workflow, model, n_prompts: int = 24, **generate) -> None:
    write_prompts(wf.path("config/prompts.jsonl"), n_prompts)
    wf.write_config(tiny_config(model, **generate))


def generations(wf: Workflow, run: str = "tiny") -> pd.DataFrame:
    return pd.read_parquet(wf.path(f"results/generations/{run}.parquet"))


def test_dry_run_of_the_demo_lists_the_stages(workflow_copy):
    out = workflow_copy.run("-n").stdout
    assert job_counts(out) == {
        "all": 1,
        "generate": 4,  # 2 runs (two temperatures) x 2 shards
        "merge_generate": 2,
        "prepare_model": 1,
        "teacher_logits": 2,
        "merge_teacher_logits": 1,
        "activations": 4,  # 2 probe sets (the labelled table, the generations' toxicity) x 2 shards
        "merge_activations": 2,
        "train_probes": 2,
        "toxicity_probe_data": 1,
        "score_fluency": 4,
        "merge_fluency": 2,
        "score_toxicity": 2,
        "analysis": 1,
        "report": 1,
    }


def test_dry_run_groups_shards_into_jobs(workflow_copy, tiny_model_src):
    setup(workflow_copy, tiny_model_src, shards={"n_shards": 10, "shards_per_job": 4, "chunk_size": 2})
    assert job_counts(workflow_copy.run("-n").stdout)["generate"] == 3


def _bad_cases():
    def cfg(**generate):
        return lambda c: c["generate"].update(generate)

    def prompts(text):
        return lambda path: path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return {
        "wrong type": (cfg(batch_size="many"), None, "generate.batch_size: 'many' is not of type 'integer'"),
        "unknown key": (cfg(n_shard=2), None, "generate: unknown key 'n_shard'"),
        "zero shards": (
            cfg(shards={"n_shards": 0}),
            None,
            "generate.shards.n_shards: 0 is less than the minimum",
        ),
        "too many shards": (
            cfg(shards={"n_shards": 99}),
            None,
            "n_shards (99) exceeds the number of chunks of 256 prompts (chunk_size) (1)",
        ),
        "unknown source": (
            lambda c: c["models"]["tiny"].update(source="s3"),
            None,
            "models.tiny.source: 's3'",
        ),
        "unknown model": (cfg(models={"tiny": {"model": "big"}}), None, "unknown model 'big'"),
        "placeholder left": (
            lambda c: c["models"]["tiny"].update(revision="<commit-sha>"),
            None,
            "models.tiny.revision: '<commit-sha>' holds the placeholder <commit-sha>; replace it",
        ),
        "no weights": (lambda c: c["models"]["tiny"].update(path="/"), None, "has no config.json"),
        "prompts missing": (cfg(prompts="config/nope.jsonl"), None, "config/nope.jsonl: not found"),
        "prompts empty": (None, prompts(""), "prompts.jsonl: no rows"),
        "no prompt column": (None, prompts('{"text": "a"}\n'), "no 'prompt' column"),
        "empty prompt": (None, prompts('{"prompt": "a"}\n{"prompt": " "}\n'), "empty or non-text 'prompt'"),
        "duplicate ids": (
            None,
            prompts('{"prompt_id": 1, "prompt": "a"}\n{"prompt_id": 1, "prompt": "b"}\n'),
            "duplicate prompt_id 1 (rows 0, 1)",
        ),
        "not utf-8": (None, prompts(b'{"prompt": "caf\xe9"}\n'), "not valid UTF-8"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_one_line_and_overwrites_nothing(workflow_copy, tiny_model_src, case):
    change_config, change_prompts, expected = _bad_cases()[case]
    wf = workflow_copy
    setup(wf, tiny_model_src)
    cfg = tiny_config(tiny_model_src)
    if change_config:
        change_config(cfg)
        wf.write_config(cfg)
    if change_prompts:
        change_prompts(wf.path("config/prompts.jsonl"))
    existing = wf.path("results/generations/tiny.parquet")
    existing.parent.mkdir(parents=True)
    existing.write_text("an earlier result")
    before = existing.stat().st_mtime_ns

    proc = wf.run(check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert proc.returncode != 0
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0]
    assert "Traceback" not in proc.stderr
    assert existing.read_text() == "an earlier result" and existing.stat().st_mtime_ns == before
    assert not wf.path("resources").exists()


def test_same_generations_whatever_the_shard_layout(workflow_copy, tiny_model_src):
    wf = workflow_copy
    setup(wf, tiny_model_src, batch_size=4, shards={"n_shards": 3, "shards_per_job": 2})
    wf.run()
    three = generations(wf)
    assert len(three) == 48 and three.continuation.str.len().gt(0).mean() > 0.8

    wf.write_config(tiny_config(tiny_model_src, batch_size=16, shards={"n_shards": 1}))
    out = wf.run("-n").stdout
    assert job_counts(out)["generate"] == 1  # n_shards changed: outdated
    wf.run()
    one = generations(wf)
    pd.testing.assert_frame_equal(one, three)
    stores = list(wf.path("results/generations/tiny/shards").iterdir())
    assert len(stores) == 2  # the 3-shard run's store is kept, not overwritten


def test_bf16_generations_do_not_depend_on_n_shards_or_shards_per_job(workflow_copy, tmp_path):
    """In bfloat16 a different batch changes the texts (logits move by more than a draw's margin),
    so shards must cut at chunk boundaries: every prompt is then generated in the same batch."""
    wf = workflow_copy
    wide = make_tiny_model(tmp_path / "wide", hidden_size=576)  # batch-dependent in bf16, as SmolLM2
    write_prompts(wf.path("config/prompts.jsonl"), 40)

    def run(**shards):
        cfg = tiny_config(
            wide, batch_size=6, sampling={"max_new_tokens": 12}, shards={"chunk_size": 5, **shards}
        )
        cfg["models"]["tiny"]["dtype"] = "bfloat16"
        wf.write_config(cfg)
        # on the CPU the torch thread count changes bf16 sums too: each worker gets the job's
        # threads / shards_per_job, the same in both layouts (1 here)
        wf.run()
        return generations(wf)

    three = run(n_shards=3, shards_per_job=2)
    one = run(n_shards=1, shards_per_job=1)
    pd.testing.assert_frame_equal(one, three)
    assert one.continuation.str.len().gt(0).mean() > 0.8
    (record,) = wf.path("results/generations/tiny/shards").glob("*/0000-of-0001.json")
    stats = json.loads(record.read_text())["stats"]
    assert stats["dtype"] == "bfloat16" and stats["batch_size"] == 6 and stats["torch_threads"] == 1


def test_lost_or_damaged_shards_heal_by_running_the_same_command(workflow_copy, tiny_model_src):
    """The shard store decides what is missing, not Snakemake's memory of the job."""
    wf = workflow_copy
    setup(wf, tiny_model_src, shards={"n_shards": 3, "shards_per_job": 1, "chunk_size": 8})
    wf.run()
    reference = generations(wf)
    (store,) = wf.path("results/generations/tiny/shards").iterdir()
    shard = [store / f"{i:04d}-of-0003.parquet" for i in range(3)]

    def mtimes(*indices):
        return {i: shard[i].stat().st_mtime_ns for i in indices}

    # a lost shard file under a merged output that is still there: the job's manifest goes (its
    # data is gone), the merged output stays valid and untouched; status shows the shard pending
    merged = wf.path("results/generations/tiny.parquet")
    before, merged_at = mtimes(0, 2), merged.stat().st_mtime_ns
    shard[1].unlink()
    proc = wf.run()
    assert "shardwise: generate/tiny job 1: shard 1 (file missing); its manifest" in proc.stderr
    assert not wf.path("results/generations/tiny/jobs/job-0001.json").exists()
    assert merged.stat().st_mtime_ns == merged_at
    assert "generate/tiny: 3 shards (2 done, 0 running, 0 failed, 1 pending)" in wf.shardwise("status").stdout

    # ... and the next time that merge has to run, the same command recomputes just that shard
    merged.unlink()
    wf.run()
    assert mtimes(0, 2) == before and shard[1].is_file()
    pd.testing.assert_frame_equal(generations(wf), reference)

    # a byte flipped (same size): `verify` finds it (status cannot, it reads no data); the merge
    # names it and takes it out; the next run heals it
    assert wf.shardwise("verify").stdout == "generate/tiny: 3 of 3 shards recorded, all verified\n"
    data = bytearray(shard[2].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard[2].write_bytes(bytes(data))
    found = wf.shardwise("verify", check=False)
    assert found.returncode == 1 and "1 bad: shard 2 (" in found.stdout and "fails its sha256" in found.stdout
    assert shard[2].read_bytes() == bytes(data)  # verify changes nothing
    wf.path("results/generations/tiny.parquet").unlink()
    failed = wf.run(check=False)
    assert failed.returncode != 0
    expected = "1 shard(s) failed verification: shard 2 (0002-of-0003.parquet): fails its sha256"
    assert f"generate/tiny: {expected}" in failed.stderr
    assert "run the same command again - it recomputes only these shards, then merges" in failed.stderr
    assert failed.stderr.count("Error in rule merge_generate") == 1  # no hopeless retries
    before = mtimes(0, 1)
    wf.run()
    assert mtimes(0, 1) == before
    pd.testing.assert_frame_equal(generations(wf), reference)
    assert (store / "0002-of-0003.parquet.bad").is_file()  # kept for inspection


def test_code_identity_reruns_the_stage_whose_code_changed_and_nothing_for_plumbing(
    workflow_copy, tiny_model_src
):
    """A comment, a docstring or an unrelated edit to the plumbing (config, settings, status, the shard
    mechanism) reruns nothing; a change to the sampler reruns the generation (tests/test_identity.py
    checks every stage's identity without Snakemake)."""
    wf = workflow_copy
    setup(wf, tiny_model_src)
    wf.run()
    pkg = wf.path("src/shardwise")
    plumbing = [pkg / f"{m}.py" for m in ("config", "settings", "status")]
    plumbing += sorted((pkg / "shards").glob("*.py"))
    for path in [*plumbing, pkg / "generate.py"]:
        path.write_text(path.read_text() + "\n# an edit to the comments\n")
    for path in plumbing:
        path.write_text(path.read_text() + "\n\ndef _unrelated() -> int:\n    return 1\n")
    dry = wf.run("-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    sampler = pkg / "generate.py"
    old = "logits = scores.float() / self.s.temperature"
    sampler.write_text(
        sampler.read_text().replace(old, "logits = scores.float() / max(self.s.temperature, 1e-6)")
    )
    dry = wf.run("-n")
    counts = job_counts(dry.stdout)
    assert counts["generate"] == 2 and counts["merge_generate"] == 1
    assert "Params have changed since last execution" in dry.stdout + dry.stderr


def test_run_info_records_the_resolved_config(workflow_copy, tiny_model_src):
    wf = workflow_copy
    setup(wf, tiny_model_src)
    wf.run("results/generations/tiny.run_info.json")
    info = json.loads(wf.path("results/generations/tiny.run_info.json").read_text())
    assert info["config"]["generate"]["sampling"]["top_k"] == 0  # a default, filled in
    assert info["settings"]["sampling"]["top_k"] == 0  # what the output depends on
    assert info["stage"] == "merge_generate"
    assert info["versions"]["snakemake"] and info["code_version"]


def test_shardwise_check_agrees_with_the_workflow(workflow_copy, tiny_model_src):
    wf = workflow_copy
    setup(wf, tiny_model_src)
    ok = wf.shardwise("check", "config/config.yaml", check=False)
    assert ok.returncode == 0 and "ok (1 model(s), 1 generation run(s), 24 prompts)" in ok.stdout
    wf.write_config(tiny_config(tiny_model_src, shards={"n_shards": 30}))
    bad = wf.shardwise("check", "config/config.yaml", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "shardwise: error: generate.shards.n_shards (30) exceeds the number of chunks of 8 prompts "
        "(chunk_size) (3) in config/prompts.jsonl"
    ]


def test_a_configfile_replaces_the_demo_config(workflow_copy, tiny_model_src):
    wf = workflow_copy  # config/config.yaml is still the SmolLM2 demo here
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    wf.path("mine.yaml").write_text(yaml.safe_dump(tiny_config(tiny_model_src)))
    out = wf.run("-n", "--configfile", "mine.yaml").stdout
    assert "resources/models/tiny" in out and "smollm2" not in out
    assert job_counts(out)["generate"] == 2
