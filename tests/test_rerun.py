"""Rerun precision: after a finished run, changing one config key (or editing one package module)
makes the dry run schedule exactly the jobs whose outputs depend on it, and nothing else.

`MATRIX` is the one table of what every leaf key of the schema reruns, for a finished workflow of
every stage (two generation runs, a teacher, probes, the analysis with its own scoring model). A
count is the number of jobs of a rule (a change of one generation run reruns only that run's
jobs). Downstream jobs rerun too: Snakemake follows file times, so a rewritten table reruns what
reads it.
"""

from __future__ import annotations

import importlib.util
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Workflow, copy_workflow, job_counts, write_prompts

from shardwise.config import schema

pytestmark = pytest.mark.system

# What reruns when ...
# ... one generation run's texts change (run b: the analysis reads it, the teacher does not)
GEN_B = {"generate": 2, "merge_generate": 1, "score_fluency": 2, "merge_fluency": 1, "score_toxicity": 1}
ANALYSIS = {"analysis": 1, "report": 1}
# ... run a's texts change (also the teacher's corpus)
GEN_A = {**GEN_B, "teacher_logits": 2, "merge_teacher_logits": 1}
# ... both runs' texts change
GEN_ALL = {
    **GEN_A,
    "generate": 4,
    "merge_generate": 2,
    "score_fluency": 4,
    "merge_fluency": 2,
    "score_toxicity": 2,
}
TEACHER = {"teacher_logits": 2, "merge_teacher_logits": 1}
PROBES = {"activations": 2, "merge_activations": 1, "train_probes": 1}
TRAIN = {"train_probes": 1}
FLUENCY = {"score_fluency": 4, "merge_fluency": 2, **ANALYSIS}
NOTHING: dict[str, int] = {}


def plus(*parts: dict[str, int], **counts: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        out.update(part)
    out.update(counts)
    return out


# a new value for each sampling key a generation run may override
OVERRIDES = {
    "samples_per_prompt": 3,
    "max_new_tokens": 6,
    "min_new_tokens": 2,
    "temperature": 0.8,
    "top_p": 0.8,
    "top_k": 5,
    "seed": 9,
}

# key -> (new value, jobs per rule rerun). Keys of maps name the config's entries (models.tiny).
MATRIX: dict[str, tuple[Any, dict[str, int]]] = {
    "hf_home": ("/tmp/elsewhere", NOTHING),
    # the generator, teacher and probed model; dtype, path and source reach every stage it feeds
    "models.tiny.dtype": ("float32", plus(GEN_ALL, TEACHER, PROBES, ANALYSIS, prepare_model=1)),
    "models.tiny.path": ("COPY", plus(GEN_ALL, TEACHER, PROBES, ANALYSIS, prepare_model=1)),
    "models.tiny.revision": ("v2", NOTHING),  # a local directory has no revision
    # the scoring model: only the perplexities and what reads them
    "models.scorer.dtype": ("float32", plus(FLUENCY, prepare_model=1)),
    "models.scorer.path": ("COPY", plus(FLUENCY, prepare_model=1)),
    "models.scorer.revision": ("v2", NOTHING),
    "generate.prompts": ("config/prompts-copy.jsonl", plus(GEN_ALL, ANALYSIS)),
    "generate.models.a.model": ("scorer", plus(GEN_A, ANALYSIS)),
    **{f"generate.models.a.{key}": (value, plus(GEN_A, ANALYSIS)) for key, value in OVERRIDES.items()},
    "generate.models.b.model": ("scorer", plus(GEN_B, ANALYSIS)),
    "generate.models.b.samples_per_prompt": (3, plus(GEN_B, ANALYSIS)),
    "generate.models.b.max_new_tokens": (6, plus(GEN_B, ANALYSIS)),
    "generate.models.b.min_new_tokens": (2, plus(GEN_B, ANALYSIS)),
    "generate.models.b.temperature": (0.8, plus(GEN_B, ANALYSIS)),
    "generate.models.b.top_p": (0.8, plus(GEN_B, ANALYSIS)),
    "generate.models.b.top_k": (5, plus(GEN_B, ANALYSIS)),
    "generate.models.b.seed": (9, plus(GEN_B, ANALYSIS)),
    "generate.sampling.samples_per_prompt": (3, plus(GEN_ALL, ANALYSIS)),
    "generate.sampling.max_new_tokens": (6, plus(GEN_ALL, ANALYSIS)),
    "generate.sampling.min_new_tokens": (2, plus(GEN_ALL, ANALYSIS)),
    "generate.sampling.temperature": (0.9, plus(GEN_A, ANALYSIS)),  # run b sets its own
    "generate.sampling.top_p": (0.8, plus(GEN_ALL, ANALYSIS)),
    "generate.sampling.top_k": (5, plus(GEN_ALL, ANALYSIS)),
    "generate.sampling.seed": (9, plus(GEN_ALL, ANALYSIS)),
    # dtype auto: not float32, so the batch size can change bf16 texts (README, schema)
    "generate.batch_size": (4, plus(GEN_ALL, ANALYSIS)),
    # the vLLM engine's settings: both runs here are hf, which they do not touch
    "generate.vllm.max_model_len": (64, NOTHING),
    "generate.vllm.gpu_memory_utilization": (0.5, NOTHING),
    "generate.vllm.cpu_kv_cache_gib": (1, NOTHING),
    "generate.vllm.tensor_parallel_size": (1, NOTHING),
    "generate.vllm.max_num_seqs": (8, NOTHING),
    "generate.vllm.enforce_eager": (True, NOTHING),
    "generate.shards.n_shards": (3, plus(GEN_ALL, ANALYSIS, generate=6)),
    # regrouping jobs: each job reruns (its finished shards are reused) and Snakemake reruns
    # what reads the merged tables, by their file times
    "generate.shards.shards_per_job": (2, plus(GEN_ALL, ANALYSIS, generate=2)),
    "generate.shards.gpus_per_shard": (1, NOTHING),
    "generate.shards.chunk_size": (4, plus(GEN_ALL, ANALYSIS)),
    "teacher_logits.corpus": ("config/texts.jsonl", TEACHER),
    "teacher_logits.generations": ("b", TEACHER),
    "teacher_logits.teachers.tiny.model": ("scorer", TEACHER),
    "teacher_logits.k": (4, TEACHER),
    "teacher_logits.max_length": (32, TEACHER),
    "teacher_logits.batch_tokens": (256, NOTHING),
    "teacher_logits.shards.n_shards": (3, plus(TEACHER, teacher_logits=3)),
    "teacher_logits.shards.shards_per_job": (2, plus(TEACHER, teacher_logits=1)),
    "teacher_logits.shards.gpus_per_shard": (1, NOTHING),
    "teacher_logits.shards.chunk_size": (4, TEACHER),
    "probes.data": ("config/labelled-copy.jsonl", PROBES),
    "probes.labels": (["subject_plural"], TRAIN),
    "probes.models": (["tiny", "scorer"], PROBES),  # the new model's
    "probes.layers": ([0, 1], PROBES),
    "probes.pooling": ("last", PROBES),
    "probes.max_length": (32, PROBES),
    "probes.batch_tokens": (1024, NOTHING),
    "probes.val_fraction": (0.25, TRAIN),
    "probes.test_fraction": (0.25, TRAIN),
    "probes.seed": (1, TRAIN),
    "probes.l2_grid": ([0.01, 1.0], TRAIN),
    "probes.max_steps": (15, TRAIN),
    "probes.patience": (3, TRAIN),
    "probes.tolerance": (1.0e-4, TRAIN),
    "probes.random_baseline": (True, PROBES),  # tiny-random's
    "probes.permutations": (3, TRAIN),
    "probes.toxicity": (True, plus(PROBES, toxicity_probe_data=1)),  # the set `toxicity`
    "probes.toxicity_rows": (500, NOTHING),  # the set `toxicity` is off here
    "probes.shards.n_shards": (3, plus(PROBES, activations=3)),
    "probes.shards.shards_per_job": (2, plus(PROBES, activations=1)),
    "probes.shards.gpus_per_shard": (1, NOTHING),
    "probes.shards.chunk_size": (32, PROBES),
    "analysis.runs": (["a"], ANALYSIS),
    "analysis.bootstrap": (11, ANALYSIS),
    "analysis.seed": (1, ANALYSIS),
    "analysis.fluency.model": ("tiny", FLUENCY),
    "analysis.fluency.dtype": ("bfloat16", FLUENCY),
    "analysis.fluency.batch_tokens": (256, NOTHING),
    "analysis.fluency.ppl_cap": (5000, ANALYSIS),
    "analysis.fluency.shards.n_shards": (3, plus(FLUENCY, score_fluency=6)),
    "analysis.fluency.shards.shards_per_job": (2, plus(FLUENCY, score_fluency=2)),
    "analysis.fluency.shards.gpus_per_shard": (1, NOTHING),
    "analysis.fluency.shards.chunk_size": (4, NOTHING),  # commits only: shards are not aligned to it
    "analysis.toxicity.scorer": ("detoxify", plus(ANALYSIS, score_toxicity=2)),
    "analysis.toxicity.model": ("scorer", NOTHING),  # read by scorer hf only
    "analysis.toxicity.label": ("LABEL_1", NOTHING),  # hf only
    "analysis.toxicity.variant": ("unbiased", NOTHING),  # detoxify only
    "analysis.toxicity.batch_size": (8, NOTHING),
    "analysis.toxicity.threshold": (0.3, ANALYSIS),
    "analysis.toxicity.prompt_toxicity_column": ("toxicity_of_prompt", ANALYSIS),
}

# engine vllm: the dry run checks that vllm imports (README "Engines: hf or vllm")
ENGINE_KEYS = {
    "generate.engine": ("vllm", plus(GEN_ALL, ANALYSIS)),
    "generate.models.a.engine": ("vllm", plus(GEN_A, ANALYSIS)),
    "generate.models.b.engine": ("vllm", plus(GEN_B, ANALYSIS)),
}
if importlib.util.find_spec("vllm") is not None:
    MATRIX.update(ENGINE_KEYS)

# Keys of the schema that no single-value change can show here, and why.
NOT_IN_MATRIX = {
    f"models.{model}.{key}": why
    for model in ("tiny", "scorer")
    for key, why in {
        "source": "changing it needs the other source's keys (id, or package and file)",
        "id": "source hf only",
        "package": "source package only",
        "file": "source package only",
    }.items()
}
if importlib.util.find_spec("vllm") is None:
    NOT_IN_MATRIX.update(
        {key: "engine vllm needs vllm installed (tests/test_vllm.py)" for key in ENGINE_KEYS}
    )

# module edited -> jobs rerun: exactly the stages whose module imports it, directly or not.
# A code edit to a module reruns the stages whose rows it computes (their code identity,
# shardwise.fingerprint.stage_identity), and what reads their outputs; plumbing reruns nothing.
MODULES = {
    "logits": TEACHER,  # only teacher_logits imports it
    "report": {"report": 1},
    "probes": TRAIN,
    "batching": plus(TEACHER, PROBES, FLUENCY),  # teacher_logits, activations and fluency import it
    "settings": NOTHING,  # plumbing: the values it returns are what counts (the matrix above)
    "config": NOTHING,
}
EDIT = "\n\ndef _an_edit() -> int:\n    return 1\n"


def config(model: Path) -> dict[str, Any]:
    shards = {"n_shards": 2, "shards_per_job": 1, "gpus_per_shard": 0}
    return {
        "models": {
            "tiny": {"source": "local", "path": str(model)},
            "scorer": {"source": "local", "path": str(model)},
        },
        "generate": {
            "prompts": "config/prompts.jsonl",
            "models": {"a": {"model": "tiny"}, "b": {"model": "tiny", "temperature": 0.7}},
            "sampling": {"samples_per_prompt": 2, "max_new_tokens": 8, "seed": 3},
            "batch_size": 8,
            "shards": {**shards, "chunk_size": 8},
        },
        "teacher_logits": {
            "generations": "a",
            "teachers": {"tiny": {}},
            "k": 8,
            "max_length": 64,
            "batch_tokens": 512,
            "shards": {**shards, "chunk_size": 8},
        },
        "probes": {
            "data": "config/demo/labelled.jsonl",
            "labels": ["subject_plural", "has_number"],
            "models": ["tiny"],
            "max_steps": 20,
            "permutations": 2,
            "toxicity": False,
            "shards": {**shards, "chunk_size": 64},
        },
        "analysis": {
            "bootstrap": 10,
            "fluency": {"model": "scorer", "batch_tokens": 512, "shards": {**shards, "chunk_size": 8}},
        },
    }


def leaf_keys(node: dict[str, Any], cfg: Any, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, with the entries of maps (models, runs, teachers) taken from
    the config."""
    root = schema()
    while "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    keys = []
    if "properties" in node:
        for key, sub in node["properties"].items():
            keys += leaf_keys(sub, (cfg or {}).get(key), f"{prefix}{key}.")
    elif isinstance(node.get("additionalProperties"), dict):
        for entry in cfg or {}:
            keys += leaf_keys(node["additionalProperties"], cfg[entry], f"{prefix}{entry}.")
    else:
        keys.append(prefix.rstrip("."))
    return keys


def with_key(cfg: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(cfg))
    *path, last = key.split(".")
    node = out
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_src: Path) -> tuple[Workflow, dict]:
    """A finished run of every stage on the tiny model."""
    root = tmp_path_factory.mktemp("rerun")
    wf = copy_workflow(root / "wf")
    write_prompts(wf.path("config/prompts.jsonl"), 24)
    shutil.copy(wf.path("config/prompts.jsonl"), wf.path("config/prompts-copy.jsonl"))
    shutil.copy(wf.path("config/demo/labelled.jsonl"), wf.path("config/labelled-copy.jsonl"))
    shutil.copytree(tiny_model_src, root / "model-copy")
    texts = [f'{{"text": "text number {i} of the corpus"}}' for i in range(40)]
    wf.path("config/texts.jsonl").write_text("\n".join(texts) + "\n")
    cfg = config(tiny_model_src)
    wf.write_config(cfg)
    wf.run(timeout=1200)
    assert "Nothing to be done" in wf.run("-n").stdout
    return wf, cfg


def scheduled(wf: Workflow, cfg: dict[str, Any], name: str) -> dict[str, int]:
    path = wf.path(f"config/variant-{name}.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = wf.run("-n", "--nolock", "--configfile", str(path)).stdout
    if "Nothing to be done" in out:
        return {}
    counts = job_counts(out)
    counts.pop("all", None)
    return counts


def test_the_matrix_covers_every_key_of_the_schema(tiny_model_src):
    keys = set(leaf_keys(schema(), config(tiny_model_src)))
    assert keys - set(MATRIX) - set(NOT_IN_MATRIX) == set(), "keys without a row in MATRIX"
    assert set(MATRIX) - keys == set(), "rows of MATRIX that are no key of the schema"


def test_each_key_reruns_exactly_what_depends_on_it(finished):
    wf, cfg = finished
    copy = str(wf.root.parent / "model-copy")

    def one(item: tuple[str, tuple[Any, dict[str, int]]]) -> tuple[str, dict[str, int], dict[str, int]]:
        key, (value, expected) = item
        value = copy if value == "COPY" else value
        return key, scheduled(wf, with_key(cfg, key, value), key.replace(".", "-")), expected

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, MATRIX.items()))
    wrong = {key: {"scheduled": got, "expected": want} for key, got, want in results if got != want}
    assert wrong == {}


def test_editing_a_module_reruns_exactly_the_stages_whose_rows_it_computes(finished):
    wf, cfg = finished
    for module, expected in MODULES.items():
        path = wf.path(f"src/shardwise/{module}.py")
        source = path.read_text()
        path.write_text(source + "\n# a comment\n")  # reruns nothing anywhere
        try:
            assert scheduled(wf, cfg, f"comment-{module}") == NOTHING, module
            path.write_text(source + EDIT)
            got = scheduled(wf, cfg, f"module-{module}")
        finally:
            path.write_text(source)
        assert got == expected, module
