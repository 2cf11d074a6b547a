"""Shared fixtures: tiny random models, prompt files, and Snakemake on a copy of the workflow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "workflow", "scripts", "src", "profiles", "envs", "config")
SLURM_POLLING = str(REPO / "tests/slurm/snakemake_polling.py")  # snakemake, its slurm status checks capped
STARTED: list[subprocess.Popen[str]] = []  # every Snakemake a test starts (its own process group)

# A shell starts background commands (`pytest ... &`, nohup) with SIGINT ignored, and a child keeps an
# ignored signal across exec: the Snakemake a test stops with Ctrl-C (SIGINT) would never stop.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite's processes (pytest-xdist's two, the Snakemakes they start, the shard workers, the SLURM
# jobs) share the machine's CPUs, often more torch threads than CPUs. libgomp's threads spin while
# they wait (OMP_WAIT_POLICY active, its default): two 2-thread shard jobs of the SLURM tests on 2
# CPUs took 53 s each, 2.5 s alone; with passive waiting 4 s each (tests/test_slurm.py scancelled
# job, 122 s -> 77 s). Read by libgomp when torch loads: set before any test module imports torch, and
# inherited by every process the tests start (sbatch exports the environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_factor() -> float:
    """How much slower than a quiet machine this one runs now: the 1-minute load per CPU, in
    [1, 4]. A busy CI runner or a CPU hog beside the suite gives ~2."""
    return min(4.0, max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))


def scaled(seconds: float) -> float:
    """A deadline of `seconds` on a quiet machine, stretched by the load at the time it is set."""
    return seconds * load_factor()


def stop_group(proc: subprocess.Popen[str], grace: float = 5) -> None:
    """End a Snakemake and everything it started locally (its process group): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the head is gone; its children may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def stop_started() -> None:
    """Stop every Snakemake the current test started that still runs (and its process group)."""
    while STARTED:
        stop_group(STARTED.pop(), grace=2)


UNIT_TEST: list[str] = []  # the node id of the unit test now running, if one is


@pytest.fixture(autouse=True)
def _stop_what_the_test_started(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that fails (or forgets) leaves no Snakemake or worker running into the next test;
    a unit test that copies the workflow (to run Snakemake) fails."""
    unit = request.node.get_closest_marker("unit") is not None
    if unit:
        UNIT_TEST.append(request.node.nodeid)
    try:
        yield
    finally:
        if unit:
            UNIT_TEST.remove(request.node.nodeid)
        stop_started()


# Every test has exactly one tier (pyproject.toml registers them): `pytest -m unit` is the command
# developers run on every change (README). Snakemake and its workflow copies are for the other two.
TIERS = ("unit", "integration", "system")
STARTS_SNAKEMAKE = {"workflow_copy", "finished_demo"}  # fixtures that copy or run the workflow


def tier_problems(items: list[pytest.Item]) -> list[str]:
    """One line per test that has no tier, more than one, or is a unit test with a fixture that
    starts Snakemake (a unit test that calls `copy_workflow` itself fails when it runs)."""
    problems = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            problems.append(
                f"{item.nodeid}: {len(tiers)} tiers ({', '.join(tiers) or 'none'}); give it one of {TIERS}"
            )
        elif tiers == ["unit"] and (used := STARTS_SNAKEMAKE & set(getattr(item, "fixturenames", ()))):
            problems.append(f"{item.nodeid}: a unit test with {', '.join(sorted(used))} (starts Snakemake)")
    return problems


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if problems := tier_problems(items):
        raise pytest.UsageError("tests without exactly one tier:\n" + "\n".join(problems))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    items.sort(key=xdist_order if os.environ.get("PYTEST_XDIST_WORKER") else run_order)


# Under pytest-xdist (tests/check.sh: -n 2 --dist loadscope) each test module runs in one process (its
# module fixtures are built once; the SLURM tests share one cluster). The longest modules start first,
# so that one process runs them while the other takes the rest.
LONGEST_FIRST = ("test_slurm", "test_demo", "test_rerun", "test_workflow")


def xdist_order(item: pytest.Item) -> tuple[int, int]:
    """The order under pytest-xdist: the longest modules first, then as :func:`run_order`
    (CI brings the SLURM cluster up before the tests, so no Snakemake start waits for it)."""
    module = item.nodeid.split("::")[0].removeprefix("tests/").removesuffix(".py")
    rank = LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)
    return rank, run_order(item)


def run_order(item: pytest.Item) -> int:
    """Unit tests first (the fastest failures), then integration, then system, the real-SLURM tests
    last (a stable sort: file order within each). Last, because once the SLURM client tools are
    installed and the test cluster is down again, every Snakemake start pays ~10 s: the slurm executor
    plugin runs `scontrol show config` at import (timeout 10 s), which waits for the absent slurmctld."""
    if "slurm" in item.keywords:
        return 3
    return next((i for i, tier in enumerate(TIERS) if tier in item.keywords), 0)


def random_llama(tokenizer: Any, seed: int, hidden_size: int) -> Any:
    """A seeded random 2-layer Llama for `tokenizer`'s vocabulary and special tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(cfg)


def make_tiny_model(path: Path, seed: int = 0, vocab_size: int = 320, hidden_size: int = 32) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the demo prompts.

    At hidden_size 32 its bfloat16 logits on the CPU do not depend on the batch; from ~576 (SmolLM2's
    width) they do, as a real model's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in (REPO / "config/demo/prompts.jsonl").open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    model = random_llama(fast, seed, hidden_size)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_metaspace_model(seed: int = 0, vocab_size: int = 300) -> tuple[Any, Any]:
    """A random 2-layer Llama with a SentencePiece-style tokenizer (BPE over a Metaspace
    pre-tokenizer, "▁" for spaces, a Metaspace decoder that drops the leading space of a text,
    BOS prepended), as Llama-2 and Mistral ship: (model, tokenizer), in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in (REPO / "config/demo/prompts.jsonl").open()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return random_llama(fast, seed, 32).eval(), fast


@pytest.fixture(scope="session")
def tiny_model_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory as a user would have it (source: local)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model prepared (resources/models/<name>/ layout, with its record)."""
    from shardwise.config import ModelSpec
    from shardwise.models import prepare_model

    dest = tmp_path_factory.mktemp("prepared") / "tiny"
    prepare_model(ModelSpec(name="tiny", source="local", path=str(tiny_model_src)), dest)
    return dest


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "ran",
        "over",
        "under",
        "big",
        "small",
        "house",
        "river",
        "quickly",
        "slowly",
        "why",
        "how",
        "when",
    ]
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            fh.write(json.dumps({"prompt_id": f"p{i:03d}", "prompt": text, "extra": i}) + "\n")
    return path


def job_counts(dry_run_output: str) -> dict[str, int]:
    """Jobs per rule from the "Job stats" table of a (dry) run."""
    table = dry_run_output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def tiny_config(model_path: Path, prompts: str = "config/prompts.jsonl", **generate: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "models": {"tiny": {"source": "local", "path": str(model_path)}},
        "generate": {
            "prompts": prompts,
            "models": {"tiny": {}},
            "sampling": {"samples_per_prompt": 2, "max_new_tokens": 8, "seed": 3},
            "batch_size": 8,
            "shards": {"n_shards": 2, "shards_per_job": 1, "gpus_per_shard": 0, "chunk_size": 8},
        },
    }
    for key, value in generate.items():
        if isinstance(value, dict):
            cfg["generate"].setdefault(key, {}).update(value)
        else:
            cfg["generate"][key] = value
    return cfg


class Workflow:
    """A copy of the workflow in a temporary directory, run with Snakemake in a subprocess."""

    def __init__(self, root: Path):
        self.root = root
        self.snakemake = ["-m", "snakemake"]  # or [SLURM_POLLING]: the slurm plugin polls sacct every <= 3 s

    def write_config(self, cfg: dict[str, Any]) -> None:
        (self.root / "config/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, *self.snakemake, "--cores", "2", *args]

    def run(
        self, *args: str, check: bool = True, timeout: int = 600, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.env(), **(extra_env or {})}
        popen = self._start(self.cmd(*args), env, stderr=subprocess.PIPE)
        try:
            stdout, stderr = popen.communicate(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            stop_group(popen)
            stdout, stderr = popen.communicate()
            raise AssertionError(
                f"snakemake {' '.join(args)} ran past {timeout} s (x{load_factor():.1f} for the load), "
                f"stopped:\n{stdout[-5000:]}\n{stderr[-5000:]}"
            ) from None
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Snakemake in the background (stderr into stdout); stopped at the test's end if still running."""
        return self._start(self.cmd(*args), self.env(), stderr=subprocess.STDOUT)

    def _start(self, cmd: list[str], env: dict[str, str], stderr: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,
        )
        STARTED.append(proc)
        return proc

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the workflow must find its own package
        env["HF_HUB_OFFLINE"] = "1"
        # The slurm executor plugin runs `scontrol show config` whenever Snakemake starts (even for
        # local runs); where SLURM is installed but not running that blocks ~9 s. Local-executor
        # tests shadow it with a command that fails at once (the plugin then uses its default).
        stub = self.root / ".test-bin"
        stub.mkdir(exist_ok=True)
        (stub / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (stub / "scontrol").chmod(0o755)
        env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"
        return env

    def shardwise(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The `shardwise` command in this workflow's directory."""
        cmd = [sys.executable, "-m", "shardwise.cli", *args]
        return subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, check=check)

    def path(self, rel: str) -> Path:
        return self.root / rel


def copy_workflow(dest: Path) -> Workflow:
    if UNIT_TEST:
        pytest.fail(
            f"{UNIT_TEST[0]} is a unit test and copies the workflow to run Snakemake: mark it integration"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return Workflow(dest)


@pytest.fixture
def workflow_copy(tmp_path: Path) -> Workflow:
    return copy_workflow(tmp_path / "wf")


@pytest.fixture(scope="session")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> Workflow:
    """The embedded demo run once to the end (~4.5 min on 2 cores), shared by the tests that read
    it. They must not change its outputs, inputs or config/config.yaml: a variant of the config
    goes to a file of its own, passed with --configfile to a dry run."""
    wf = copy_workflow(tmp_path_factory.mktemp("demo") / "wf")
    wf.run(timeout=900)
    return wf
