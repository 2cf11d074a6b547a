"""Stage identities (shardwise.fingerprint.stage_identity): what of the software decides a stage's bytes.

A docstring, a comment, an annotation, the layout of the code or an edit to the plumbing (config,
settings, status, the shard mechanism) leaves every identity as it was; a change to the code that
computes rows, the stage's VERSION or a library version changes the identities of exactly the
stages that depend on it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO

from shardwise import fingerprint
from shardwise.config import ShardSpec
from shardwise.errors import ShardError
from shardwise.fingerprint import code_modules, normalize, stage_identity
from shardwise.shards import ShardPlan, verify

pytestmark = pytest.mark.unit

GPU_STAGES = ("generate", "teacher_logits", "activations", "fluency")
STAGES = (*GPU_STAGES, "prepare_model", "toxicity", "probes", "analysis", "report")


def test_normalize_ignores_docstrings_comments_annotations_and_layout():
    before = '''
from __future__ import annotations
from typing import Any
def f(x: int, y=2) -> int:
    """Add."""
    # a comment
    return x + y
class C:
    """A class."""
    n: int = 3
'''
    after = '''
"""A module docstring now."""
from __future__ import annotations
from typing import TYPE_CHECKING, Any, Sequence
if TYPE_CHECKING:
    import numpy
def f(
    x: float,   # retyped, reflowed
    y = 2,
):
    return (x
            + y)
class C:
    n: "Sequence[int]" = 3
'''
    assert normalize(before) == normalize(after)
    assert normalize(before) != normalize(before.replace("x + y", "x - y"))
    assert normalize(before) != normalize(before.replace("n: int = 3", "n: int = 4"))


def test_plumbing_is_outside_every_stage_code():
    for stage in STAGES:
        modules = code_modules(stage)
        assert f"shardwise.{stage}" in modules
        for plumbing in ("config", "settings", "status", "shards", "smk", "cluster", "errors"):
            assert f"shardwise.{plumbing}" not in modules, (stage, plumbing)
        assert not [m for m in modules if m.startswith("shardwise.shards.")], stage
    assert "shardwise.models" in code_modules("generate")  # model loading decides the logits
    assert "shardwise.logits" in code_modules("teacher_logits")  # the file layout


def test_identities_are_read_from_the_source_without_importing_it():
    """Snakemake computes every stage's identity at each start (the rules' `code` params), on a login
    node and in every SLURM job: reading the modules' source must not import them (torch and
    transformers take ~1 s)."""
    code = (
        "import sys; from shardwise.fingerprint import code_version; "
        f"[code_version(s) for s in {list(STAGES)!r}]; "
        "heavy = ('torch', 'transformers', 'numpy', 'pandas'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy "
        "or m.startswith('shardwise.') and m not in ('shardwise.fingerprint', 'shardwise.errors')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_normalised_sources_kept_on_disk_are_checked_and_keyed_by_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = b"def f(x: int) -> int:\n    'Add one.'\n    return x + 1  # one\n"
    assert fingerprint.normalize_cached(source) == normalize(source)
    (kept,) = fingerprint.cache_dir().iterdir()
    digest, text = kept.read_text().split("\n", 1)
    assert text == normalize(source)
    # read back, not recomputed: a consistent file is taken as it is
    fake = "def f(x):\n    return x + 2"
    kept.write_text(f"{hashlib.sha256(fake.encode()).hexdigest()}\n{fake}")
    assert fingerprint.normalize_cached(source) == fake
    # a damaged file fails its checksum and is computed again (and rewritten)
    kept.write_text(f"{digest}\n{text}x")
    assert fingerprint.normalize_cached(source) == normalize(source)
    assert kept.read_text() == f"{digest}\n{text}"
    # another source is another file; an edit to the code is another source
    changed = source.replace(b"x + 1", b"x + 3")
    assert fingerprint.normalize_cached(changed) == normalize(changed) != normalize(source)
    assert len(list(fingerprint.cache_dir().iterdir())) == 2
    # no cache where none can be written
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-cache-here")
    assert fingerprint.normalize_cached(source) == normalize(source)


def identities(src: Path) -> dict[str, dict]:
    """Every stage's identity computed from the package at `src` (in a child: nothing cached)."""
    code = (
        "import json; from shardwise.fingerprint import stage_identity; "
        f"print(json.dumps({{s: stage_identity(s) for s in {list(STAGES)!r}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(src)}
    )
    return json.loads(out.stdout)


def test_edits_to_the_plumbing_change_no_identity_and_the_sampler_changes_generate_only(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pkg = src / "shardwise"
    before = identities(src)
    assert all(before[s]["version"] == 1 for s in STAGES)

    plumbing = [pkg / f"{m}.py" for m in ("config", "settings", "status")]
    plumbing += sorted((pkg / "shards").glob("*.py"))
    for path in plumbing:  # a comment, and code no stage runs to compute rows
        path.write_text(path.read_text() + "\n# a note\n\n\ndef _unrelated() -> int:\n    return 1\n")
    for stage in STAGES:  # a comment and a reworded docstring in every stage module
        path = pkg / f"{stage}.py"
        text = path.read_text()
        first = text.index('"""') + 3
        path.write_text(text[:first] + "Reworded. " + text[first:] + "\n# a comment\n")
    assert identities(src) == before

    sampler = pkg / "generate.py"
    text = sampler.read_text()
    old = "logits = scores.float() / self.s.temperature"
    assert old in text
    sampler.write_text(text.replace(old, "logits = scores.float() / max(self.s.temperature, 1e-6)"))
    after = identities(src)
    assert after["generate"]["code"] != before["generate"]["code"]
    assert {s for s in STAGES if after[s] != before[s]} == {"generate"}

    text = sampler.read_text()
    sampler.write_text(text.replace("\nVERSION = 1\n", "\nVERSION = 2\n"))
    assert identities(src)["generate"]["version"] == 2

    models = pkg / "models.py"  # model loading: every stage that loads a model
    models.write_text(models.read_text() + "\n\ndef _used_by_nobody_yet() -> int:\n    return 2\n")
    changed = {s for s, ident in identities(src).items() if ident["code"] != after[s]["code"]}
    assert changed == {"generate", "teacher_logits", "activations", "fluency", "prepare_model", "toxicity"}


@pytest.fixture
def transformers_upgraded(monkeypatch):
    """transformers reports another version (as after `pip install -U transformers`)."""
    real = metadata.version

    def version(name: str) -> str:
        return "99.0.0" if name == "transformers" else real(name)

    stage_identity.cache_clear()
    monkeypatch.setattr(fingerprint.metadata, "version", version)
    yield
    stage_identity.cache_clear()


def plan(tmp_path: Path, stage: str = "generate") -> ShardPlan:
    return ShardPlan(
        stage=stage,
        key="run",
        n_items=8,
        spec=ShardSpec(n_shards=2, shards_per_job=2, gpus_per_shard=0, chunk_size=4),
        identity={"code": stage_identity(stage)},
        root=tmp_path / "results",
        log_dir=tmp_path / "logs",
        ext="parquet",
    )


def test_a_new_transformers_starts_a_new_store_and_the_merge_refuses_the_old_shards(tmp_path, request):
    stage_identity.cache_clear()
    old = plan(tmp_path)
    records = []
    for i, rows in enumerate(old.ranges()):
        path = old.shard_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
        records.append(
            {
                "index": i,
                "rows": [rows.start, rows.stop],
                "fingerprint": old.shard_fingerprint(i),
                "file": path.name,
                "bytes": i + 1,
                "sha256": fingerprint.sha256_file(path),
            }
        )
    manifest = tmp_path / "job-0000.json"
    manifest.write_text(json.dumps({"store": str(old.store), "shards": records}))
    assert verify(old, [manifest]) == [old.shard_path(0), old.shard_path(1)]

    request.getfixturevalue("transformers_upgraded")
    new = plan(tmp_path)
    assert new.identity["code"]["libraries"]["transformers"] == "99.0.0"
    assert new.identity["code"]["code"] == old.identity["code"]["code"]
    assert new.store != old.store  # a new store: nothing of the old one is reused or mixed in
    with pytest.raises(ShardError) as err:
        verify(new, [manifest])
    assert len(str(err.value).splitlines()) == 1 and "stale" in str(err.value)
    assert plan(tmp_path, "analysis").identity == {
        "code": stage_identity("analysis")
    }  # no transformers there
    assert "transformers" not in stage_identity("analysis")["libraries"]
