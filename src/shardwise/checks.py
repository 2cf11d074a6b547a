"""What is checked before any job runs, at parse time in the main process and by `shardwise check`:
placeholders, model sources, input tables, shard counts, probe layers and splits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shardwise.config import Config
from shardwise.errors import ConfigError, InputError


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
    elif isinstance(node, str) and (placeholder := PLACEHOLDER.search(node)):
        raise InputError(
            f"{key}: {node!r} holds the placeholder {placeholder.group()}; replace it "
            "(the config's comments say with what)"
        )


# A model, run or teacher name becomes a path component (results/generations/<run>/...) and a
# wildcard value: one plain component only ("smollm2/t07" would write inside run smollm2's folder).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_names(cfg: Config) -> None:
    """Refuse a model, generation run or teacher name that is not one safe path component."""
    for section, names in (
        ("models", cfg.models),
        ("generate.models", cfg.generate.runs),
        ("teacher_logits.teachers", cfg.teacher_logits.teachers),
    ):
        for name in names:
            if not SAFE_NAME.fullmatch(name):
                raise ConfigError(
                    f"{section}: {name!r} is not a safe name: use letters, digits, '.', '_' and '-' "
                    "(not first), since it becomes a directory name"
                )


def _model_file(cfg: Config, name: str, file: str) -> Path | None:
    """A file of model `name` where it is already on disk without loading anything: a local
    model's own directory, else its prepared directory (after prepare_model ran)."""
    spec = cfg.models[name]
    candidates = [Path("resources/models") / name / file]
    if spec.source == "local" and spec.path:
        candidates.insert(0, Path(spec.path) / file)
    return next((path for path in candidates if path.is_file()), None)


def model_context(cfg: Config, name: str) -> int | None:
    """The model's context length (max_position_embeddings of its config.json), when on disk."""
    path = _model_file(cfg, name, "config.json")
    try:
        conf = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return None
    value = conf.get("max_position_embeddings") or (conf.get("text_config") or {}).get(
        "max_position_embeddings"
    )
    return value if isinstance(value, int) and value > 0 else None


# Tokens that encoding may add to a prompt's text tokens (BOS, EOS, a leading "▁").
SPECIAL_TOKENS_MARGIN = 16


def check_prompt_lengths(cfg: Config, ids: list[Any], texts: list[str]) -> None:
    """Refuse a prompt that, with the run's max_new_tokens, does not fit its model's context (not
    counting a chat template's tokens). Checked where the model's config.json is on disk (a local
    model, or a prepared one): a prompt encodes to at most as many text tokens as it has UTF-8 bytes
    (every token of a byte-level, byte-fallback, SentencePiece or WordPiece vocabulary covers at
    least one byte, or is <unk> for at least one), so only prompts longer in bytes than the room
    left (less SPECIAL_TOKENS_MARGIN) are tokenized, with the model's tokenizer.json."""
    for run_name, run in cfg.generate.runs.items():
        context = model_context(cfg, run.model)
        if context is None:
            continue
        where = f"generate.models.{run_name} (model {run.model!r}, context {context} tokens)"
        room = context - run.sampling.max_new_tokens
        if room <= 0:
            new = run.sampling.max_new_tokens
            raise ConfigError(f"{where}: max_new_tokens {new} leaves no room for a prompt")
        long = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) + SPECIAL_TOKENS_MARGIN > room]
        tok_file = _model_file(cfg, run.model, "tokenizer.json")
        if not long or tok_file is None:
            continue
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
        for i, enc in zip(long, tokenizer.encode_batch([texts[i] for i in long]), strict=True):
            if len(enc.ids) > room:
                raise InputError(
                    f"prompts file {cfg.generate.prompts}: prompt {ids[i]!r} is {len(enc.ids)} tokens "
                    f"({len(texts[i]):,} characters); with max_new_tokens {run.sampling.max_new_tokens} "
                    f"it does not fit {where}"
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
    safe names, each used model's source, and each input table; returns the number of items per
    input."""
    from shardwise.models import check_source
    from shardwise.tables import load_prompts, load_texts

    check_placeholders(cfg.resolved)
    check_names(cfg)

    counts = {}
    gen, tl = cfg.generate, cfg.teacher_logits
    for weights in [run.model for run in gen.runs.values()] + list(tl.teachers.values()):
        check_source(cfg.models[weights])
    if gen.runs:
        from shardwise.generate import check_engines

        check_engines(cfg)  # engine vllm: one line when vllm cannot be imported
        prompts = load_prompts(gen.prompts)
        counts["prompts"] = n = len(prompts)
        check_prompt_lengths(cfg, prompts["prompt_id"].tolist(), prompts["prompt"].tolist())
        _check_shards("generate", gen.shards, n, "prompts", f"in {gen.prompts}", align=gen.shards.chunk_size)
    if tl.teachers:
        if tl.corpus is not None:
            n, where = len(load_texts(tl.corpus)), f"in {tl.corpus}"
        else:
            assert tl.generations is not None  # load_config requires it when corpus is unset
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
        from shardwise.probes import control_task
        from shardwise.splits import check_split, group_split
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
        if "control_type" in table.columns:  # as train_probes will, before any activation is computed
            control_task(
                y, table["control_type"], split, list(pr.labels), pr.seed, f"probes data file {pr.data}"
            )
    return counts
