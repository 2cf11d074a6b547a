"""The package's structure: layers, no import cycle, code versions from the import graph."""

from __future__ import annotations

import pkgutil

import shardwise
from shardwise.fingerprint import import_closure, imports_of

# Each module imports only modules of lower layers (read from the source, function-level
# imports included). A new module gets a row here.
LAYERS = [
    {"shardwise", "errors", "atomic", "environment", "batching"},  # leaves: no shardwise import
    {"config", "fingerprint", "tables", "logits", "profile"},  # typed config, hashes, table loaders
    {"settings", "models", "shards"},  # per-stage settings, model loading, the shard mechanism
    {  # the stages: none imports another
        "prepare_model",
        "generate",
        "teacher_logits",
        "activations",
        "probes",
        "fluency",
        "toxicity",
        "analysis",
        "report",
        "status",
    },
    {"checks", "smk"},  # input checks, the Snakemake adapter
    {"cli"},
]


def modules() -> set[str]:
    return {"shardwise", *(f"shardwise.{m.name}" for m in pkgutil.iter_modules(shardwise.__path__))}


def short(name: str) -> str:
    return name.removeprefix("shardwise.") if name != "shardwise" else name


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if short(name) in layer)


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert {short(m) for m in modules()} == placed


def test_modules_import_only_lower_layers():
    wrong = [
        f"{short(m)} (layer {layer_of(m)}) imports {short(d)} (layer {layer_of(d)})"
        for m in sorted(modules())
        for d in sorted(imports_of(m))
        if layer_of(d) >= layer_of(m)
    ]
    assert wrong == []


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


def test_code_versions_follow_the_import_graph():
    gen = import_closure("shardwise.generate")
    assert {"shardwise.shards", "shardwise.atomic", "shardwise.settings", "shardwise.environment"} <= set(gen)
    assert "shardwise.probes" not in gen and "shardwise.logits" not in gen
    assert "shardwise.logits" in import_closure("shardwise.teacher_logits")
    assert import_closure("shardwise.errors") == ["shardwise.errors"]
