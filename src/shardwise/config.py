"""Typed, validated workflow configuration.

`workflow/schemas/config.schema.yaml` (a link to `src/shardwise/config.schema.yaml`, shipped as
package data) is the single source of truth for keys, types, descriptions and defaults.
`load_config` validates a raw config mapping against it, fills in the defaults and returns frozen
dataclasses that mirror its nesting (tests/test_config.py checks them key for key). Every problem
is reported as one line naming the config file and the key path, e.g.
``config/config.yaml: generate.shards.n_shards: 0 is less than the minimum of 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from shardwise.errors import ConfigError

# Shipped inside the package (also when installed from a wheel); workflow/schemas/ links to it.
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@cache
def schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _resolve(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local ``$ref`` ("#/definitions/...") to the schema node it names."""
    while "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _fill_defaults(instance: Any, node: Mapping[str, Any], root: Mapping[str, Any]) -> None:
    """Insert the defaults declared *directly* on each property (not through a ``$ref``).

    Per-run overrides refer to the sampling keys by ``$ref`` without a default of their own, so
    they stay absent and inherit the shared value instead of a schema default.
    """
    node = _resolve(node, root)
    if not isinstance(instance, dict):
        return
    for key, sub in node.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in node.get("properties", {}):
                _fill_defaults(value, extra, root)


def _key_path(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _one_line(error: jsonschema.ValidationError) -> str:
    schema, instance = error.schema, error.instance
    if (
        error.validator == "additionalProperties"
        and isinstance(schema, Mapping)
        and isinstance(instance, Mapping)
    ):
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        where = _key_path(error.absolute_path)
        keys = ", ".join(repr(k) for k in extra)
        return f"{where}: unknown key {keys}{hint}"
    return f"{_key_path(error.absolute_path)}: {error.message}"


def validate(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate `raw` against the schema; return a deep copy with defaults filled in."""
    instance = copy.deepcopy(dict(raw))
    validator = jsonschema.Draft7Validator(schema())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError(f"{source}: {_one_line(errors[0])}")
    _fill_defaults(instance, schema(), schema())
    return instance


@dataclass(frozen=True)
class ShardSpec:
    n_shards: int
    shards_per_job: int
    gpus_per_shard: int
    chunk_size: int

    @property
    def n_jobs(self) -> int:
        return -(-self.n_shards // self.shards_per_job)

    def job_shards(self, job: int) -> list[int]:
        """The shard indices that job `job` runs."""
        if not 0 <= job < self.n_jobs:
            raise ValueError(f"job {job} out of range [0, {self.n_jobs})")
        start = job * self.shards_per_job
        return list(range(start, min(start + self.shards_per_job, self.n_shards)))

    @property
    def gpus_per_job(self) -> int:
        return self.shards_per_job * self.gpus_per_shard

    def content_params(self) -> dict[str, int]:
        """What changes a shard's content (and so its fingerprint); chunking and packing do not."""
        return {"n_shards": self.n_shards}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    dtype: str = "auto"
    id: str | None = None
    revision: str = "main"
    path: str | None = None
    package: str | None = None
    file: str | None = None

    def describe(self) -> str:
        if self.source == "hf":
            return f"{self.id}@{self.revision}"
        if self.source == "local":
            return str(self.path)
        return f"{self.package}/{self.file}"


@dataclass(frozen=True)
class Sampling:
    samples_per_prompt: int
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int


@dataclass(frozen=True)
class GenerateRun:
    """One generation output: weights `model` sampled with `sampling` by `engine` (hf or vllm)."""

    name: str
    model: str
    sampling: Sampling
    engine: str = "hf"


@dataclass(frozen=True)
class VllmConfig:
    """generate.vllm: the vLLM engine's settings (runs with engine vllm only)."""

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: int = 4
    tensor_parallel_size: int | None = None
    max_num_seqs: int = 256
    enforce_eager: bool | None = None

    def tensor_parallel(self, gpus_per_shard: int) -> int:
        """GPUs the model is split over: the configured size, else gpus_per_shard (1 on the CPU)."""
        return self.tensor_parallel_size or max(1, gpus_per_shard)

    def eager(self, gpus_per_shard: int) -> bool:
        """No CUDA graphs / compilation: as configured, else on the CPU only."""
        return gpus_per_shard == 0 if self.enforce_eager is None else self.enforce_eager


@dataclass(frozen=True)
class GenerateConfig:
    prompts: Path
    runs: dict[str, GenerateRun]
    batch_size: int
    shards: ShardSpec
    engine: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass(frozen=True)
class TeacherLogitsConfig:
    corpus: Path | None
    generations: str | None
    teachers: dict[str, str]  # output name -> weights (a key of `models`)
    k: int
    max_length: int
    batch_tokens: int
    shards: ShardSpec

    def corpus_path(self, results: str | Path = "results") -> Path:
        """The corpus table: `corpus`, or the generation run's merged table."""
        if self.corpus is not None:
            return self.corpus
        return Path(results) / "generations" / f"{self.generations}.parquet"


@dataclass(frozen=True)
class ProbesConfig:
    data: Path
    labels: tuple[str, ...]
    models: tuple[str, ...]
    layers: tuple[int, ...] | None
    pooling: str
    max_length: int
    batch_tokens: int
    val_fraction: float
    test_fraction: float
    seed: int
    l2_grid: tuple[float, ...]
    max_steps: int
    patience: int
    tolerance: float
    permutations: int
    random_baseline: bool
    toxicity: bool
    toxicity_rows: int
    shards: ShardSpec

    def probed(self) -> tuple[str, ...]:
        """The `{name}`s probed: each of `models`, then with random_baseline its `<name>-random`."""
        return self.models + (tuple(random_name(m) for m in self.models) if self.random_baseline else ())

    def weights_of(self, name: str) -> tuple[str, bool]:
        """(the model whose prepared directory `name` reads, whether its weights are re-drawn)."""
        if self.random_baseline and name not in self.models and name.endswith(RANDOM_SUFFIX):
            return name.removesuffix(RANDOM_SUFFIX), True
        return name, False


RANDOM_SUFFIX = "-random"


def random_name(model: str) -> str:
    """The random-weights baseline of `model` (probes.random_baseline)."""
    return model + RANDOM_SUFFIX


@dataclass(frozen=True)
class FluencyConfig:
    model: str | None
    dtype: str
    batch_tokens: int
    ppl_cap: float
    shards: ShardSpec


@dataclass(frozen=True)
class ToxicityConfig:
    scorer: str
    model: str | None
    label: str
    variant: str
    batch_size: int
    threshold: float
    prompt_toxicity_column: str


@dataclass(frozen=True)
class AnalysisConfig:
    runs: tuple[str, ...]  # resolved: null = every generation run; () when fluency.model is null
    bootstrap: int
    seed: int
    fluency: FluencyConfig
    toxicity: ToxicityConfig


TOXICITY_PROBE_DATA = Path("results/probes/toxicity/data.parquet")


@dataclass(frozen=True)
class Config:
    models: dict[str, ModelSpec]
    generate: GenerateConfig
    teacher_logits: TeacherLogitsConfig
    probes: ProbesConfig
    analysis: AnalysisConfig
    hf_home: str | None
    resolved: dict[str, Any] = field(repr=False, compare=False)

    def probe_sets(self) -> dict[str, ProbesConfig]:
        """The labelled tables the probes read, by name (the `{probe_set}` of their paths):
        ``labelled`` is probes.data; ``toxicity`` (with probes.toxicity and the analysis on) is
        the analysed generations' continuations with the label ``toxic`` (score >= threshold),
        grouped by prompt, written by the rule toxicity_probe_data."""
        pr = self.probes
        if not pr.models:
            return {}
        sets = {"labelled": pr}
        if pr.toxicity and self.analysis.runs:
            sets["toxicity"] = replace(pr, data=TOXICITY_PROBE_DATA, labels=("toxic",))
        return sets


_MODEL_FIELDS = {"hf": ("id",), "local": ("path",), "package": ("package", "file")}


def _model_spec(name: str, raw: Mapping[str, Any], source: str) -> ModelSpec:
    missing = [k for k in _MODEL_FIELDS[raw["source"]] if not raw.get(k)]
    if missing:
        raise ConfigError(
            f"{source}: models.{name}: source {raw['source']!r} needs key(s) {', '.join(missing)}"
        )
    return ModelSpec(name=name, **raw)


def _weights(models: Mapping[str, ModelSpec], section: str, name: str, entry: Mapping[str, Any], source: str):
    weights = entry.get("model", name)
    if weights not in models:
        known = ", ".join(sorted(models)) or "none"
        raise ConfigError(f"{source}: {section}.{name}: unknown model {weights!r} (models defined: {known})")
    return weights


def load_config(raw: Mapping[str, Any], source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate `raw` and build the typed config. Relative paths stay relative (to the working
    directory, as in Snakemake) unless `base_dir` is given."""
    resolved = validate(raw, source)
    models = {n: _model_spec(n, m, source) for n, m in resolved["models"].items()}

    def local(path: str) -> Path:
        p = Path(path)
        return base_dir / p if base_dir and not p.is_absolute() else p

    gen = resolved["generate"]
    shared = gen["sampling"]
    runs: dict[str, GenerateRun] = {}
    for run_name, overrides in gen["models"].items():
        weights = _weights(models, "generate.models", run_name, overrides, source)
        sampling = Sampling(**{k: overrides.get(k, v) for k, v in shared.items()})
        engine = overrides.get("engine", gen["engine"])
        runs[run_name] = GenerateRun(name=run_name, model=weights, sampling=sampling, engine=engine)

    shards = ShardSpec(**gen["shards"])
    vllm = VllmConfig(**gen["vllm"])
    if any(run.engine == "vllm" for run in runs.values()):
        tp, gpus = vllm.tensor_parallel(shards.gpus_per_shard), shards.gpus_per_shard
        if tp > max(1, gpus):
            raise ConfigError(
                f"{source}: generate.vllm.tensor_parallel_size: {tp} is more than the GPUs of a shard "
                f"(generate.shards.gpus_per_shard: {gpus}{'; the CPU runs one' if gpus == 0 else ''})"
            )
    generate = GenerateConfig(
        prompts=local(gen["prompts"]),
        runs=runs,
        batch_size=gen["batch_size"],
        shards=shards,
        engine=gen["engine"],
        vllm=vllm,
    )

    tl = resolved["teacher_logits"]
    teachers = {
        n: _weights(models, "teacher_logits.teachers", n, e, source) for n, e in tl["teachers"].items()
    }
    if teachers and tl["corpus"] is None:
        if tl["generations"] is None:
            raise ConfigError(
                f"{source}: teacher_logits: set `corpus` (a text table) or `generations` (a run)"
            )
        if tl["generations"] not in runs:
            known = ", ".join(sorted(runs)) or "none"
            raise ConfigError(
                f"{source}: teacher_logits.generations: unknown generation run {tl['generations']!r} "
                f"(runs in generate.models: {known})"
            )
    teacher_logits = TeacherLogitsConfig(
        corpus=None if tl["corpus"] is None else local(tl["corpus"]),
        generations=tl["generations"],
        teachers=teachers,
        k=tl["k"],
        max_length=tl["max_length"],
        batch_tokens=tl["batch_tokens"],
        shards=ShardSpec(**tl["shards"]),
    )
    pr = resolved["probes"]
    for name in pr["models"]:
        _weights(models, "probes.models", name, {}, source)
    probes = ProbesConfig(
        data=local(pr["data"]),
        labels=tuple(pr["labels"]),
        models=tuple(pr["models"]),
        layers=None if pr["layers"] is None else tuple(pr["layers"]),
        shards=ShardSpec(**pr["shards"]),
        l2_grid=tuple(float(v) for v in pr["l2_grid"]),
        **{
            k: v
            for k, v in pr.items()
            if k not in ("data", "labels", "models", "layers", "shards", "l2_grid")
        },
    )
    if probes.random_baseline:
        for name in probes.models:
            if random_name(name) in models:
                raise ConfigError(
                    f"{source}: probes.random_baseline: the baseline of {name!r} is named "
                    f"{random_name(name)!r}, which is already a model in `models`; rename that model"
                )
    if probes.models and not probes.labels:
        raise ConfigError(f"{source}: probes.labels: name at least one label column of {probes.data}")
    an = resolved["analysis"]
    flu, tox = an["fluency"], an["toxicity"]
    runs_of_analysis = tuple(an["runs"]) if an["runs"] is not None else tuple(runs)
    for run in runs_of_analysis:
        if run not in runs:
            known = ", ".join(sorted(runs)) or "none"
            raise ConfigError(f"{source}: analysis.runs: unknown generation run {run!r} (runs: {known})")
    for key, name in (("fluency.model", flu["model"]), ("toxicity.model", tox["model"])):
        if name is not None:
            _weights(models, f"analysis.{key}", name, {"model": name}, source)
    if tox["scorer"] == "hf" and tox["model"] is None:
        raise ConfigError(
            f"{source}: analysis.toxicity.model: scorer 'hf' needs a classifier (a name in models)"
        )
    analysis = AnalysisConfig(
        runs=runs_of_analysis if flu["model"] else (),
        bootstrap=an["bootstrap"],
        seed=an["seed"],
        fluency=FluencyConfig(
            model=flu["model"],
            dtype=flu["dtype"],
            batch_tokens=flu["batch_tokens"],
            ppl_cap=float(flu["ppl_cap"]),
            shards=ShardSpec(**flu["shards"]),
        ),
        toxicity=ToxicityConfig(**{**tox, "threshold": float(tox["threshold"])}),
    )
    return Config(
        models=models,
        generate=generate,
        teacher_logits=teacher_logits,
        probes=probes,
        analysis=analysis,
        hf_home=resolved["hf_home"],
        resolved=resolved,
    )


def load_config_file(path: str | Path) -> Config:
    """Load a YAML config file the way the workflow does (relative paths from the cwd)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return load_config(raw, source=str(path))
