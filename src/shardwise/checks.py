"""What is checked before any job runs, at parse time in the main process and by `shardwise check`:
placeholders, model sources, input tables, shard counts, probe layers and splits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shardwise.config import Config
from shardwise.errors import InputError


def _check_shards(section: str, spec: Any, n: int, what: str, where: str, align: int = 1) -> None:
    blocks = -(-n // align)
    if spec.n_shards > blocks:
        unit = what if align == 1 else f"chunks of {align} {what} (chunk_size)"
        raise InputError(
            f"{section}.shards.n_shards ({spec.n_shards}) exceeds the number of {unit} ({blocks}) {where}"
        )


PLACEHOLDER = re.compile(r"<[A-Za-z][\w-]*>")


def check_placeholders(node: Any, key: str = "") -> None:
    """Refuse a template's placeholder left in a config value (`<commit-sha>`, `<project>`)."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_placeholders(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_placeholders(v, f"{key}[{i}]")
    elif isinstance(node, str) and PLACEHOLDER.search(node):
        raise InputError(
            f"{key}: {node!r} holds the placeholder {PLACEHOLDER.search(node).group()}; replace it "
            "(the config's comments say with what)"
        )


def _check_layers(cfg: Config, name: str) -> None:
    """probes.layers against the model's depth, as soon as its config.json is here (a local model,
    or one already prepared): read as JSON, without importing transformers."""
    from shardwise.activations import resolve_layers

    spec = cfg.models[name]
    candidates = [Path("resources/models") / name / "config.json"]
    if spec.source == "local" and spec.path:
        candidates.insert(0, Path(spec.path) / "config.json")
    for path in candidates:
        try:
            conf = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        depth = conf.get("num_hidden_layers") or (conf.get("text_config") or {}).get("num_hidden_layers")
        if isinstance(depth, int):
            resolve_layers(cfg.probes.layers, depth, source=f"probes.layers (model {name!r}, {path})")
        return


def check_inputs(cfg: Config) -> dict[str, int]:
    """What the workflow checks before any job runs (also `shardwise check`): no placeholder left,
    each used model's source, and each input table; returns the number of items per input."""
    from shardwise.models import check_source
    from shardwise.tables import load_prompts, load_texts

    check_placeholders(cfg.resolved)

    counts = {}
    gen, tl = cfg.generate, cfg.teacher_logits
    for weights in [run.model for run in gen.runs.values()] + list(tl.teachers.values()):
        check_source(cfg.models[weights])
    if gen.runs:
        from shardwise.generate import check_engines

        check_engines(cfg)  # engine vllm: one line when vllm cannot be imported
        counts["prompts"] = n = len(load_prompts(gen.prompts))
        _check_shards("generate", gen.shards, n, "prompts", f"in {gen.prompts}", align=gen.shards.chunk_size)
    if tl.teachers:
        if tl.corpus is not None:
            n, where = len(load_texts(tl.corpus)), f"in {tl.corpus}"
        else:
            n = counts["prompts"] * gen.runs[tl.generations].sampling.samples_per_prompt
            where = f"in generation run {tl.generations}"
        counts["corpus items"] = n
        _check_shards("teacher_logits", tl.shards, n, "items", where, align=tl.shards.chunk_size)
    an = cfg.analysis
    for name in (an.fluency.model, an.toxicity.model if an.toxicity.scorer == "hf" else None):
        if an.runs and name:
            check_source(cfg.models[name])
    pr = cfg.probes
    if pr.models:
        from shardwise.probes import check_split, group_split
        from shardwise.tables import load_labelled

        for name in pr.models:
            check_source(cfg.models[name])
            _check_layers(cfg, name)
        table = load_labelled(pr.data, list(pr.labels))
        counts["labelled rows"] = n = len(table)
        _check_shards("probes", pr.shards, n, "rows", f"in {pr.data}", align=pr.shards.chunk_size)
        y = table[list(pr.labels)].to_numpy()
        split = group_split(table["group"].tolist(), y, pr.val_fraction, pr.test_fraction, pr.seed)
        check_split(split, y, list(pr.labels), f"probes data file {pr.data}")
    return counts
