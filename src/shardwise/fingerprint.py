"""Content hashes: files, JSON-able objects and the code a stage runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
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


def code_version(*modules: str) -> str:
    """A hash of the package version and the source of `modules` (e.g. "shardwise.generate").

    Passed to rules as a param, so that editing the code a stage runs makes Snakemake see its
    outputs as outdated, and folded into shard fingerprints, so that old shards are not reused.
    """
    digest = hashlib.sha256(__version__.encode())
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(name)
        digest.update(name.encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]
