"""Stage `score_fluency`: prompt-conditioned perplexity of every generation, sharded
(design.md §3 "Analysis", §4).

Each generation is scored as ``prompt_ids + continuation_ids``, prompt and continuation tokenised
separately (so the continuation's tokens are the ones the text was judged on, as in DExperts),
the prompt with the tokenizer's special tokens (BOS where the model expects one), the continuation
without. Only continuation tokens are scored: the loss mask is built from token counts, never from
the pad id, so a pad token equal to EOS does not hide a real EOS. Batches are packed by a padded-token
budget from length-sorted items; padding is on the right with the default positions, or, for
``padding_side="left"``, with explicit ``position_ids`` (an absolute-position model would otherwise
see shifted positions). Stored per generation: ``nll_sum`` (nats), ``n_tokens`` scored and
``ppl = exp(nll_sum / n_tokens)`` (NaN for an empty continuation).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise.batching import batches
from shardwise.config import Config, load_config
from shardwise.errors import InputError, ModelError
from shardwise.fingerprint import code_version, sha256_file
from shardwise.models import load_shard_model, read_record
from shardwise.shards import ParquetCodec, ShardContext, ShardPlan, atomic_path, run_job, verify

log = logging.getLogger(__name__)

STAGE = "score_fluency"
CODE = ("shardwise.fluency", "shardwise.batching", "shardwise.shards", "shardwise.models")
CODEC = ParquetCodec()
NEEDED = ("prompt_id", "sample_id", "prompt", "continuation")


def load_generations(path: str | Path, needed: Sequence[str] = NEEDED) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types
        raise InputError(f"generations file {path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InputError(
            f"generations file {path}: missing column(s) {', '.join(missing)} "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    return table


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


def score_table(
    model: Any,
    tokenizer: Any,
    table: pd.DataFrame,
    batch_tokens: int,
    pad_id: int,
    device: str = "cpu",
    progress: Any = None,
) -> pd.DataFrame:
    """nll_sum, n_tokens, ppl for each row of a generations table (rows in table order)."""
    prompts = [tokenizer(p).input_ids for p in table["prompt"]]
    conts = [tokenizer(c, add_special_tokens=False).input_ids for c in table["continuation"]]
    seqs = [p + c for p, c in zip(prompts, conts, strict=True)]
    nll = np.zeros(len(seqs))
    count = np.zeros(len(seqs), dtype=np.int64)
    for batch in batches([len(s) for s in seqs], batch_tokens):
        scored = [j for j in batch if conts[j]]
        if scored:
            n, c = continuation_nll(
                model, [seqs[j] for j in scored], [len(prompts[j]) for j in scored], pad_id, device=device
            )
            nll[scored], count[scored] = n, c
        if progress is not None:
            progress.update(len(batch))
    with np.errstate(invalid="ignore", divide="ignore"):
        ppl = np.where(count > 0, np.exp(nll / np.maximum(count, 1)), math.nan)
    return pd.DataFrame(
        {
            "prompt_id": table["prompt_id"].to_numpy(),
            "sample_id": table["sample_id"].to_numpy(),
            "nll_sum": nll,
            "n_tokens": count,
            "ppl": ppl,
        }
    )


# --------------------------------------------------------------------------- shard plumbing


def make_plan(
    cfg: Config, run: str, model_dir: str | Path, generations: str | Path, results: str | Path = "results"
) -> ShardPlan:
    an = cfg.analysis
    identity = {
        "model": read_record(model_dir)["identity"],
        "generations_sha256": sha256_file(generations),
        "code": code_version(*CODE),
    }
    return ShardPlan(
        stage=STAGE,
        key=run,
        n_items=len(load_generations(generations)),
        spec=an.fluency_shards,
        identity=identity,
        root=Path(results) / "analysis" / "fluency" / run,
        log_dir=Path("logs") / STAGE / run,
        ext=CODEC.ext,
    )


def compute_shard(ctx: ShardContext) -> None:
    from tqdm import tqdm

    a = ctx.args
    chunks = ctx.pending_chunks()
    if not chunks:
        return
    table = load_generations(a["generations"])
    model, tokenizer, device = load_shard_model(a["model_dir"], a["dtype"], ctx.device, ctx.n_gpus)
    pad = pad_id_of(tokenizer, a["scorer"])
    started, tokens = time.perf_counter(), 0
    with tqdm(total=sum(len(c) for c in chunks), unit="seq", mininterval=5, desc=f"shard {ctx.index}") as bar:
        for chunk in chunks:
            part = table.iloc[chunk.start : chunk.stop]
            scores = score_table(model, tokenizer, part, a["batch_tokens"], pad, device, bar)
            ctx.commit(chunk, scores)
            tokens += int(scores["n_tokens"].sum())
    seconds = time.perf_counter() - started
    ctx.stats.update(scored_tokens=tokens, seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1))


def job(smk: Any) -> None:
    """Snakemake rule `score_fluency`."""
    cfg = load_config(smk.config)
    an = cfg.analysis
    plan = make_plan(cfg, smk.wildcards.model, smk.input.model, smk.input.generations)
    args = {
        "generations": str(smk.input.generations),
        "model_dir": str(smk.input.model),
        "dtype": cfg.models[an.fluency_model].dtype,
        "batch_tokens": an.batch_tokens,
        "scorer": an.fluency_model,
    }
    run_job(plan, int(smk.wildcards.job), compute_shard, CODEC, args, smk.output[0], threads=smk.threads)


def merge(smk: Any) -> None:
    """Snakemake rule `merge_fluency`: verified per-generation scores of one run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = load_config(smk.config)
    plan = make_plan(cfg, smk.wildcards.model, smk.input.model, smk.input.generations)
    paths = verify(plan, smk.input.manifests)
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    with atomic_path(Path(smk.output[0])) as tmp:
        pq.write_table(table, tmp)
