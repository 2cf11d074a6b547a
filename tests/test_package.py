"""The package's structure: layers, no import cycle, names a stage is found by, the test tiers."""

from __future__ import annotations

import ast
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, copy_workflow, job_counts

import shardwise
from shardwise.fingerprint import import_closure, imports_of

# Each module imports only modules of lower layers (read from the source, function-level
# imports included). A new module gets a row here.
LAYERS = [
    {"shardwise", "errors", "atomic", "environment", "batching", "clock", "intervals"},  # leaves
    {"config", "fingerprint", "tables", "logits", "profile", "splits"},  # typed config, hashes, table loaders
    {"settings", "models", "cluster", "shards.plan", "shards.codecs"},  # settings, models, partitions, shards
    {"shards.store", "shards.worker"},  # the shard store's verification and healing; inside a worker
    {"shards.runner"},  # a job's worker processes
    {"shards"},  # the shard mechanism's rooms, re-exported
    {"sharded"},  # one sharded stage, declared once: the generic job and merge
    {  # the stages: none imports another
        "prepare_model",
        "generate",
        "teacher_logits",
        "activations",
        "probes",
        "toxicity_probe_data",
        "fluency",
        "toxicity",
        "analysis",
        "report",
        "status",
    },
    {"checks", "smk"},  # input checks, the Snakemake adapter
    {"cli", "retries"},  # the command line; the retry policy of the Snakemake head
]


def modules() -> set[str]:
    """Every module of the package, those of its subpackages (shardwise.shards.plan) included."""
    return {"shardwise", *(m.name for m in pkgutil.walk_packages(shardwise.__path__, "shardwise."))}


def short(name: str) -> str:
    return name.removeprefix("shardwise.") if name != "shardwise" else name


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if short(name) in layer)


@pytest.mark.unit
def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert {short(m) for m in modules()} == placed


@pytest.mark.unit
def test_modules_import_only_lower_layers():
    wrong = [
        f"{short(m)} (layer {layer_of(m)}) imports {short(d)} (layer {layer_of(d)})"
        for m in sorted(modules())
        for d in sorted(imports_of(m))
        if layer_of(d) >= layer_of(m)
    ]
    assert wrong == []


@pytest.mark.unit
def test_no_import_cycle():
    graph = {m: imports_of(m) for m in modules()}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(map(short, [*path[path.index(dep) :], dep])))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.unit
def test_code_versions_follow_the_import_graph():
    gen = import_closure("shardwise.generate")
    rooms = {f"shardwise.shards.{room}" for room in ("plan", "codecs", "store", "worker", "runner")}
    assert rooms | {"shardwise.atomic", "shardwise.settings", "shardwise.environment"} <= set(gen)
    assert import_closure("shardwise.shards") == sorted({"shardwise.shards", *import_closure(*rooms)})
    assert "shardwise.shards.runner" not in import_closure("shardwise.shards.store")
    assert "shardwise.probes" not in gen and "shardwise.logits" not in gen
    assert "shardwise.logits" in import_closure("shardwise.teacher_logits")
    assert import_closure("shardwise.errors") == ["shardwise.errors"]


@pytest.mark.integration
def test_a_wheel_install_checks_a_config_and_dry_runs_the_demo(tmp_path):
    """Installed from a wheel (not editable, no source tree beside it), the package still finds its
    schema: `shardwise check` passes on the demo config and the demo's dry run lists its jobs."""
    wheels = tmp_path / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
    ]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, timeout=600)
    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheels.glob("shardwise-*.whl"))) as whl:
        whl.extractall(site)
    assert (site / "shardwise" / "config.schema.yaml").is_file()
    wf = copy_workflow(tmp_path / "wf")
    shutil.rmtree(wf.path("src"))  # only the installed package is left to import
    # the editable install puts the repository's src/ on sys.path: take it off, put the wheel first
    boot = (
        f"import sys; sys.path[:] = [{str(site)!r}] + [p for p in sys.path if p != {str(REPO / 'src')!r}]; "
        "import shardwise, runpy; assert shardwise.__file__.startswith({site!r}), shardwise.__file__; "
        "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
    ).replace("{site!r}", repr(str(site)))
    check = subprocess.run(
        [sys.executable, "-c", boot, "shardwise.cli", "check", "config/config.yaml"],
        cwd=wf.root,
        capture_output=True,
        text=True,
        env=wf.env(),
        timeout=300,
    )
    assert check.returncode == 0 and "config/config.yaml: ok" in check.stdout, check.stderr
    shutil.copytree(site / "shardwise", wf.path("src/shardwise"))  # the workflow imports src/ (common.smk)
    dry = subprocess.run(
        [sys.executable, "-c", boot, "snakemake", "-n", "--cores", "1"],
        cwd=wf.root,
        capture_output=True,
        text=True,
        env=wf.env(),
        timeout=300,
    )
    assert dry.returncode == 0 and job_counts(dry.stdout)["generate"] == 4, dry.stderr


@pytest.mark.unit
def test_a_stage_is_findable_by_its_name():
    """Every rule's script is scripts/<rule>.py, which calls into the module whose name the rule
    contains (rule `teacher_logits` -> shardwise.teacher_logits, `score_fluency` -> shardwise.fluency),
    and every module docstring cites only files that exist."""
    rules = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        text = smk.read_text()
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", text, re.S | re.M):
            script = re.search(r'script:\s*"\.\./\.\./scripts/(\w+)\.py"', body)
            if script:
                rules[name] = script.group(1)
    assert len(rules) >= 13
    for rule, script in rules.items():
        assert script == rule, (rule, script)
        text = (REPO / f"scripts/{script}.py").read_text()
        calls = re.findall(r"^from shardwise\.(\w+) import", text, re.M)
        (module,) = set(calls) - {"smk"}
        assert module in rule, (rule, module)
    for path in sorted((REPO / "src/shardwise").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        paths = r"\b((?:docs|tests|bench|workflow|config|profiles)/[\w./-]+\.(?:md|py|yaml|smk))"
        for cited in re.findall(paths, doc):
            assert (REPO / cited).is_file(), (path.name, cited)
        assert not re.search(r"(?<![/\w])design\.md", doc), f"{path.name} cites design.md outside docs/"


UNTIERED = """
import pytest

def test_none():
    pass

@pytest.mark.unit
@pytest.mark.integration
def test_two():
    pass

@pytest.mark.unit
def test_unit_with_a_workflow(workflow_copy):
    pass

@pytest.mark.system
def test_fine(workflow_copy):
    pass
"""

TIERED = """
import pytest
from conftest import copy_workflow

@pytest.mark.unit
def test_unit_that_copies_the_workflow_itself(tmp_path):
    copy_workflow(tmp_path / "wf")

@pytest.mark.unit
def test_fine():
    pass
"""


@pytest.mark.unit
def test_a_test_without_exactly_one_tier_or_a_unit_test_that_starts_snakemake_fails(tmp_path):
    """tests/conftest.py refuses to run a session where a test has no tier or two, or where a unit
    test asks for a fixture that starts Snakemake; a unit test that copies the workflow itself fails."""
    shutil.copy(REPO / "tests/conftest.py", tmp_path / "conftest.py")
    cmd = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path)]
    cmd += ["-p", "no:cacheprovider", "-q", str(tmp_path)]
    (tmp_path / "test_tiers.py").write_text(UNTIERED)
    proc = subprocess.run([*cmd, "--collect-only"], capture_output=True, text=True, timeout=120)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 4, said  # a usage error: nothing runs
    said = said.split("tests without exactly one tier:")[1]
    assert "test_tiers.py::test_none: 0 tiers (none)" in said
    assert "test_tiers.py::test_two: 2 tiers (integration, unit)" in said
    assert (
        "test_tiers.py::test_unit_with_a_workflow: a unit test with workflow_copy (starts Snakemake)" in said
    )
    assert "test_fine" not in said

    (tmp_path / "test_tiers.py").write_text(TIERED)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 failed, 1 passed" in said, said
    assert "test_unit_that_copies_the_workflow_itself is a unit test and copies the workflow" in said
