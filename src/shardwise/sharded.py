"""One sharded stage, declared once; one job and one merge for all of them (docs/design.md §2).

Each sharded stage module (generate, teacher_logits, activations, fluency) declares ``STAGE``, a
:class:`ShardedStage` holding only what differs between stages:

- ``name`` (the plans' stage and ``logs/<name>/``; the rule name, where it is not the module's) and
  ``code`` (the module whose code identity it is, when not ``name``);
- ``outputs``: where its outputs live, ``results/<outputs>/<key>``; ``key`` names the wildcards that
  make an output's key (a run, a teacher, a probe set and model) and ``items`` the rule input that holds
  the table its items come from;
- ``prepare(cfg, request) -> Prepared``: the settings its output depends on (:mod:`shardwise.settings`),
  the number of items, the shard spec and alignment, identity beyond the shared part, the codec, and the
  worker's arguments as the stage's own frozen dataclass (passed to the worker as that type);
- ``compute(ctx)``: the worker body; ``ctx.args`` is that dataclass.

:func:`work` adds what every stage shares to the shard identity (the model's identity, the item table's
sha256, the stage's code identity, :func:`shardwise.fingerprint.stage_identity`) and builds the plan;
:func:`job` and :func:`merge` are the Snakemake entries of every sharded stage (``STAGE.job``,
``STAGE.merge`` in scripts/), :func:`run_all` runs one output outside Snakemake (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from shardwise.config import Config, ShardSpec, load_config
from shardwise.fingerprint import sha256_file, stage_identity
from shardwise.models import read_record
from shardwise.shards.codecs import Codec
from shardwise.shards.plan import ShardPlan
from shardwise.shards.runner import run_job
from shardwise.shards.store import merge as merge_shards
from shardwise.shards.worker import ShardContext

A = TypeVar("A")


@dataclass(frozen=True)
class Request:
    """Which output of a stage: its wildcards and the paths it reads, and where results and logs go."""

    wildcards: Mapping[str, str]
    model_dir: Path
    items: Path
    results: Path = Path("results")
    logs: Path = Path("logs")


@dataclass(frozen=True)
class Prepared(Generic[A]):
    """What a stage's ``prepare`` returns for one output."""

    settings: dict[str, Any]
    n_items: int
    spec: ShardSpec
    args: A
    codec: Callable[[ShardPlan], Codec]  # from the plan: a codec may stamp the run's fingerprint
    identity: dict[str, Any] = field(default_factory=dict)
    align: int = 1


@dataclass(frozen=True)
class Work(Generic[A]):
    """One output's shards: the plan, the codec and the workers' arguments."""

    plan: ShardPlan
    codec: Codec
    args: A


@dataclass(frozen=True)
class ShardedStage(Generic[A]):
    """A sharded stage, declared once in its module (module docstring). The four declarations
    (``STAGE = ShardedStage(...)``) look alike on purpose: each is the one place where a stage says
    what differs; everything they share is here."""

    name: str  # the shard plans' stage: logs/<name>/<key>/, `shardwise status`
    outputs: str
    key: tuple[str, ...]
    items: str
    ext: str  # its shard files' extension (the codec's)
    prepare: Callable[[Config, Request], Prepared[A]]
    compute: Callable[[ShardContext], None]
    code: str = ""  # the module whose code identity it is (shardwise.<code>), when not `name`

    def key_of(self, wildcards: Mapping[str, str]) -> str:
        return "/".join(str(wildcards[name]) for name in self.key)

    def job(self, smk: Any) -> None:
        """The stage's job rule (scripts/<rule>.py calls it): :func:`job`."""
        job(self, smk)

    def merge(self, smk: Any) -> None:
        """The stage's merge rule: :func:`merge`."""
        merge(self, smk)

    def request(self, smk: Any) -> Request:
        """The request of a Snakemake job of this stage (its wildcards, `model` and items inputs)."""
        return Request(
            wildcards={name: getattr(smk.wildcards, name) for name in self.key},
            model_dir=Path(smk.input.model),
            items=Path(getattr(smk.input, self.items)),
        )


def work(stage: ShardedStage[A], cfg: Config, request: Request) -> Work[A]:
    """The plan, codec and worker arguments of one output of `stage`."""
    prepared = stage.prepare(cfg, request)
    key = stage.key_of(request.wildcards)
    identity = {
        **prepared.settings,
        "model": read_record(request.model_dir)["identity"],
        "items_sha256": sha256_file(request.items),
        **prepared.identity,
        "code": stage_identity(stage.code or stage.name),
    }
    plan = ShardPlan(
        stage=stage.name,
        key=key,
        n_items=prepared.n_items,
        spec=prepared.spec,
        identity=identity,
        root=request.results / stage.outputs / key,
        log_dir=request.logs / stage.name / key,
        ext=stage.ext,
        align=prepared.align,
    )
    return Work(plan=plan, codec=prepared.codec(plan), args=prepared.args)


def job(stage: ShardedStage[Any], smk: Any) -> None:
    """A stage's job rule (`generate`, `teacher_logits`, `activations`, `score_fluency`): run the job's
    shards, one worker each, and write its manifest."""
    cfg = load_config(smk.config)
    w = work(stage, cfg, stage.request(smk))
    run_job(
        w.plan, int(smk.wildcards.job), stage.compute, w.codec, w.args, smk.output[0], threads=smk.threads
    )


def merge(stage: ShardedStage[Any], smk: Any) -> None:
    """A stage's merge rule: verify every shard of the output and join them into `smk.output[0]`."""
    cfg = load_config(smk.config)
    w = work(stage, cfg, stage.request(smk))
    merge_shards(w.plan, smk.input.manifests, smk.output[0], w.codec)


def run_all(
    stage: ShardedStage[A], cfg: Config, request: Request, out: str | Path, threads: int = 1
) -> tuple[Work[A], list[Path]]:
    """Every job of one output of `stage`, then its verified merge into `out`, outside Snakemake
    (tests, benchmarks); the job manifests go to ``<results>/<outputs>/<key>/jobs/`` as the rules'."""
    w = work(stage, cfg, request)
    manifests = [w.plan.root / "jobs" / f"job-{j:04d}.json" for j in range(w.plan.spec.n_jobs)]
    for j, manifest in enumerate(manifests):
        run_job(w.plan, j, stage.compute, w.codec, w.args, manifest, threads=threads)
    merge_shards(w.plan, manifests, out, w.codec)
    return w, manifests
