"""Stage `score_fluency`: prompt-conditioned perplexity of every generation, sharded
(docs/design.md §3 "Analysis", §4).

Each generation is scored as DExperts' ``conditional_perplexity`` scores it (its
scripts/evaluation/evaluate_generations.py): ``prompt + continuation`` tokenised jointly, with the
tokenizer's special tokens (BOS where the model expects one), and the prompt's own loss subtracted,
so a cut inside a word ("... will be sun" + "ny") is scored as the joint text's tokens, not as
tokens the text never had (:func:`score_table`). The loss mask is built from token positions,
never from the pad id, so a pad token equal to EOS does not hide a real EOS. Batches are packed by a
padded-token budget from length-sorted items; padding is on the right with the default positions,
or, for ``padding_side="left"``, with explicit ``position_ids`` (an absolute-position model would
otherwise see shifted positions). Stored per generation: ``nll_sum`` (nats), ``n_tokens`` (the
joint minus the prompt's token count), ``n_prompt_tokens`` (the prompt's own, special tokens
included), ``ppl = exp(nll_sum / n_tokens)`` and ``dtype``, the dtype the scorer ran in
(``analysis.fluency.dtype``, float32 unless configured otherwise; summary.csv's ``fluency_dtype``).

``ppl`` is NaN, as in DExperts, where
- ``n_tokens <= 0``: an empty continuation, or one that merged into the prompt's last word
  (DExperts divides by <= 0);
- ``n_prompt_tokens < 2``: a prompt of one token with a tokenizer that adds no BOS (GPT-2, the
  scorer DExperts uses): DExperts' prompt loss is HF's mean over zero predicted tokens, NaN, so its
  PPL is NaN and its ``if ppl < 1e4`` drops the text. ``nll_sum`` and ``n_tokens`` are still
  stored (the continuation's tokens, each predicted from what precedes it), so
  ``exp(nll_sum / n_tokens)`` gives that text a PPL for anyone who wants one.
The analysis counts both (``n_unscored_empty``, ``n_unscored_one_token_prompt``) and leaves them out
of every PPL statistic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shardwise import settings
from shardwise.batching import batches
from shardwise.config import Config
from shardwise.errors import ModelError
from shardwise.models import load_shard_model
from shardwise.sharded import Prepared, Request, ShardedStage
from shardwise.shards.codecs import ParquetCodec
from shardwise.shards.worker import ShardContext
from shardwise.tables import count_generations, load_generations

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("torch", "transformers")

CODEC = ParquetCodec()


def pad_id_of(tokenizer: Any, name: str) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ModelError(f"scoring model {name!r}: its tokenizer has neither a pad token nor an EOS token")


def continuation_nll(
    model: Any,
    sequences: Sequence[Sequence[int]],
    n_prompt: Sequence[int],
    pad_id: int,
    padding_side: str = "right",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(nll_sum [B] float64, n_tokens [B]) of tokens n_prompt[i]: of each sequence, in one batch."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    scored = torch.zeros((len(sequences), width), dtype=torch.bool)  # position t predicts token t
    for r, (seq, p) in enumerate(zip(sequences, n_prompt, strict=True)):
        start = width - len(seq) if padding_side == "left" else 0
        ids[r, start : start + len(seq)] = torch.as_tensor(seq)
        mask[r, start : start + len(seq)] = 1
        scored[r, start + max(p, 1) : start + len(seq)] = True  # token 0 has no prediction
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
        ).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:].to(device)
        token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = scored[:, 1:].to(device)
        nll = (token_nll * keep).double().sum(1)
    return nll.cpu().numpy(), keep.sum(1).cpu().numpy()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one bounds the prefix
        if x != y:
            break
        n += 1
    return n


def score_table(
    model: Any,
    tokenizer: Any,
    table: pd.DataFrame,
    batch_tokens: int,
    pad_id: int,
    device: str = "cpu",
    progress: Any = None,
) -> pd.DataFrame:
    """DExperts' conditional perplexity of each row of a generations table (rows in table order).

    As DExperts' ``conditional_perplexity``: ``prompt`` and ``prompt + continuation`` are each
    tokenised on their own, with the tokenizer's special tokens; ``nll_sum = NLL(full) - NLL(prompt)``
    and ``n_tokens = len(full) - len(prompt)``. The two sequences share their tokens up to where the
    joint tokenisation first differs (the boundary token, when a cut falls inside a word); the NLL of
    that shared prefix is the same in both, so only the full sequence's tokens from there on are
    scored, minus the prompt's own tokens from there on (an extra, short sequence only when the
    boundary moved). ``ppl`` is NaN when ``n_tokens <= 0`` (an empty continuation, or one that merged
    into the prompt's last word) or ``n_prompt_tokens < 2`` (DExperts' NaN: see the module's doc)."""
    n = len(table)
    nll = np.zeros(n)
    count = np.zeros(n, dtype=np.int64)
    n_prompt = np.zeros(n, dtype=np.int64)
    if n:
        prompts = list(table["prompt"])
        unique = list(dict.fromkeys(prompts))
        encoded = dict(zip(unique, tokenizer(unique).input_ids, strict=True))
        fulls = tokenizer([p + c for p, c in zip(prompts, table["continuation"], strict=True)]).input_ids
        items: list[tuple[list[int], int]] = []  # (sequence, first scored position)
        owners: list[list[tuple[int, float]]] = []  # (row, +1 for the full sequence / -1 for the prompt)
        corrections: dict[tuple[str, int], int] = {}
        for r, (prompt, full) in enumerate(zip(prompts, fulls, strict=True)):
            own = encoded[prompt]
            count[r] = len(full) - len(own)
            n_prompt[r] = len(own)
            first = max(_common_prefix(own, full), 1)  # token 0 has no prediction
            if first < len(full):
                items.append((full, first))
                owners.append([(r, 1.0)])
            if first < len(own):
                key = (prompt, first)
                if key not in corrections:
                    corrections[key] = len(items)
                    items.append((own, first))
                    owners.append([])
                owners[corrections[key]].append((r, -1.0))
        for batch in batches([len(seq) for seq, _ in items], batch_tokens):
            part, _ = continuation_nll(
                model, [items[i][0] for i in batch], [items[i][1] for i in batch], pad_id, device=device
            )
            for i, value in zip(batch, part, strict=True):
                for r, sign in owners[i]:
                    nll[r] += sign * value
            if progress is not None:
                progress.update(sum(1 for i in batch for _, sign in owners[i] if sign > 0))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ppl = np.where((count > 0) & (n_prompt >= 2), np.exp(nll / np.maximum(count, 1)), math.nan)
    return pd.DataFrame(
        {
            "prompt_id": table["prompt_id"].to_numpy(),
            "sample_id": table["sample_id"].to_numpy(),
            "nll_sum": nll,
            "n_tokens": count,
            "n_prompt_tokens": n_prompt,
            "ppl": ppl,
        }
    )


def dtype_name(model: Any) -> str:
    """The dtype a model's weights are in, as torch names it without its prefix: "float32"."""
    return str(model.dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- shard plumbing


@dataclass(frozen=True)
class FluencyArgs:
    """A perplexity worker's arguments."""

    generations: str
    model_dir: str
    dtype: str
    batch_tokens: int
    scorer: str


def prepare(cfg: Config, request: Request) -> Prepared[FluencyArgs]:
    """A run's perplexity shards (rows of its merged generations, in order)."""
    an = cfg.analysis
    wanted = settings.score_fluency(cfg)
    args = FluencyArgs(
        generations=str(request.items),
        model_dir=str(request.model_dir),
        dtype=wanted["dtype"],
        batch_tokens=an.fluency.batch_tokens,
        scorer=str(an.fluency.model),
    )
    return Prepared(
        settings=wanted,
        n_items=count_generations(request.items),
        spec=an.fluency.shards,
        args=args,
        codec=lambda _plan: CODEC,
    )


def compute_shard(ctx: ShardContext) -> None:
    """Worker body: the perplexities of the shard's pending chunks, each committed as it completes."""
    a: FluencyArgs = ctx.args
    chunks = ctx.pending_chunks()
    if not chunks:
        return
    table = load_generations(a.generations)
    model, tokenizer, device = load_shard_model(a.model_dir, a.dtype, ctx.device, ctx.n_gpus)
    pad = pad_id_of(tokenizer, a.scorer)
    items, tokens = sum(len(c) for c in chunks), 0
    with ctx.progress(items, unit="seq") as bar:
        for chunk in chunks:
            part = table.iloc[chunk.start : chunk.stop]
            scores = score_table(model, tokenizer, part, a.batch_tokens, pad, device, bar)
            ctx.commit(chunk, scores.assign(dtype=dtype_name(model)))
            tokens += int(scores["n_tokens"].sum())
    ctx.record_speed(model, items=items, tokens=tokens)


STAGE: ShardedStage[FluencyArgs] = ShardedStage(
    name="score_fluency",
    code="fluency",
    outputs="analysis/fluency",
    key=("run",),
    items="generations",
    ext=CODEC.ext,
    prepare=prepare,
    compute=compute_shard,
)
