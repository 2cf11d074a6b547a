"""Content hashes: files, JSON-able objects and the code a stage runs."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

from shardwise import __version__

_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


PACKAGE = "shardwise"


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    return Path(spec.origin)


@cache
def imports_of(module: str) -> frozenset[str]:
    """The shardwise modules that `module`'s source imports, at the top or inside a function
    (read with `ast`, nothing is imported)."""
    found = set()
    for node in ast.walk(ast.parse(_source(module).read_bytes())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == PACKAGE:  # from shardwise import generate
                names += [f"{PACKAGE}.{a.name}" for a in node.names if find_spec_safe(f"{PACKAGE}.{a.name}")]
        else:
            continue
        found.update(n for n in names if n == PACKAGE or n.startswith(PACKAGE + "."))
    found.discard(module)
    return frozenset(found)


def find_spec_safe(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def import_closure(*modules: str) -> list[str]:
    """`modules` and every shardwise module they import, directly or not (sorted)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports_of(name))
    return sorted(seen)


@cache
def code_version(*modules: str) -> str:
    """A hash of the package version and the source of `modules` (e.g. "shardwise.generate") and
    of every shardwise module they import, directly or not (:func:`import_closure`).

    Passed to rules as a param, so that editing any code a stage runs makes Snakemake see its
    outputs as outdated, and folded into shard fingerprints, so that old shards are not reused.
    """
    digest = hashlib.sha256(__version__.encode())
    for name in import_closure(*modules):
        digest.update(name.encode())
        digest.update(_source(name).read_bytes())
    return digest.hexdigest()[:16]
