"""Stage `generate`: sample continuations of prompts, sharded (docs/design.md §3 "Generations").

Output per generation run: ``results/generations/<run>.parquet`` with one row per
(prompt, sample): prompt_id, sample_id, prompt, continuation, n_prompt_tokens, n_new_tokens,
finish_reason ("stop": the model ended it; "length": max_new_tokens reached), seed, and the prompt
table's extra columns. ``continuation`` is the part after the decoded prompt of prompt and new tokens
decoded together, so the boundary (a leading space a SentencePiece decoder would drop) is kept and
``prompt + continuation`` is the text the model produced.

Reproducibility: each (prompt_id, sample_id) has its own random stream (:func:`row_seed`), and
sampling draws one uniform number per step from that stream (:class:`SeededSampler`, inverse-CDF
over the filtered distribution). Which other rows share the batch, the batch size, `n_shards` and
`shards_per_job` therefore do not change the texts, up to floating-point differences in the logits
themselves between batch shapes: in float32 these flip a token only when a draw lands within ~1e-7
of a token boundary (0 of 48 SmolLM2 continuations changed between batch sizes 16 and 3); in
bfloat16 they do not stay that small (32 of 48 changed), so texts depend on the batch size there.
Shards therefore cut at multiples of `chunk_size` and batches form inside chunks, so `n_shards` and
`shards_per_job` never change which rows share a batch; in bf16/fp16 the batch size is part of the
fingerprint (:func:`prepare`); on the CPU the torch thread count changes bf16 sums too, and is
recorded with the dtype and batch size in each shard's stats.

Engines (``engine`` per run): ``hf`` is the above. ``vllm`` (:func:`vllm_table`) sends one vLLM
request per (prompt_id, sample_id) with ``seed = row_seed(...)`` and the prompt's token ids from
the same tokenizer, inside the same shards and chunks (a chunk's requests go to the engine
together, so prefix caching shares a prompt's KV across its samples); its texts differ from hf's
(vLLM draws from its own per-request generator) but, like hf's, not with shards, chunks or which
requests share a step, up to the logits' rounding (fp32: measured equal, docs/performance.md;
bf16: they can change). The engine and vLLM's version are in the fingerprint
(:func:`shardwise.settings.generate`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise import settings
from shardwise.config import Config, Sampling
from shardwise.models import load_shard_model
from shardwise.sharded import Prepared, Request, ShardedStage
from shardwise.shards.codecs import ParquetCodec
from shardwise.shards.worker import ShardContext
from shardwise.tables import load_prompts

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("torch", "transformers")  # and, for engine vllm, vLLM: settings.generate

CODEC = ParquetCodec()
COLUMNS = [
    "prompt_id",
    "sample_id",
    "prompt",
    "continuation",
    "n_prompt_tokens",
    "n_new_tokens",
    "finish_reason",
    "seed",
]


def row_seed(base: int, prompt_id: Any, sample_id: int) -> int:
    """The seed of one (prompt_id, sample_id): independent of shards, batches and order."""
    digest = hashlib.sha256(f"{base}\x1f{prompt_id}\x1f{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampler:
    """A logits processor that samples each row from its own random stream.

    Applies temperature, min_new_tokens (EOS suppressed), top-k and top-p, then picks the token
    whose cumulative probability (over token ids in order) first reaches the row's uniform draw for
    this step, and returns logits that are 0 for that token and -inf elsewhere, so that greedy
    decoding emits exactly it.
    """

    def __init__(self, uniforms: Any, prompt_len: int, sampling: Sampling, eos_ids: list[int]):
        self.uniforms = uniforms  # [batch, max_new_tokens] float64 tensor
        self.prompt_len = prompt_len
        self.s = sampling
        self.eos_ids = eos_ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_len
        logits = scores.float() / self.s.temperature
        if step < self.s.min_new_tokens and self.eos_ids:
            logits[:, self.eos_ids] = float("-inf")
        if self.s.top_k > 0:
            kth = torch.topk(logits, min(self.s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.s.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= self.s.top_p  # keeps >= 1 token
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        cdf = probs.double().cumsum(-1)
        u = self.uniforms[:, step].to(cdf.device).unsqueeze(-1) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u).clamp_(max=probs.shape[-1] - 1)
        # never land on a zero-probability token at the top of the CDF's flat tail
        token = torch.where(probs.gather(-1, token) > 0, token, probs.argmax(-1, keepdim=True))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def _continuation_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int], prompt_text: str) -> str:
    """The continuation's text: prompt and new tokens decoded together, minus the decoded prompt.

    Decoded on their own, the new tokens lose what depends on what precedes them: a SentencePiece
    decoder (Llama-2, Mistral) drops the leading space of a text, gluing the continuation to the
    prompt; a character split over the boundary bytes would be garbled."""
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    n = next((i for i, (a, b) in enumerate(zip(full, prompt_text, strict=False)) if a != b), len(prompt_text))
    return full[n:]


def generate_table(
    model: Any,
    tokenizer: Any,
    prompts: pd.DataFrame,
    sampling: Sampling,
    batch_size: int,
    device: str = "cpu",
    progress: Any = None,
    cache_implementation: str | None = None,
) -> pd.DataFrame:
    """Sample `sampling.samples_per_prompt` continuations of each prompt; rows in prompt order.
    (`cache_implementation`, e.g. "static", is passed to generate: bench/generation.py compares it.)

    Only the config decides the sampling: transformers fills every field a generate() call leaves
    unset from model.generation_config (a model may ship repetition_penalty, no_repeat_ngram_size,
    top_k, temperature, ...) and runs those processors before ours, so generation runs with a
    pristine generation config that keeps only the model's special-token ids (its EOS list among
    them); the model's own one is put back afterwards."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=shipped.bos_token_id,
        eos_token_id=shipped.eos_token_id,
        pad_token_id=shipped.pad_token_id,
    )
    try:
        return _generate_table(
            model, tokenizer, prompts, sampling, batch_size, device, progress, cache_implementation
        )
    finally:
        model.generation_config = shipped


def _generate_table(
    model: Any,
    tokenizer: Any,
    prompts: pd.DataFrame,
    sampling: Sampling,
    batch_size: int,
    device: str,
    progress: Any,
    cache_implementation: str | None = None,
) -> pd.DataFrame:
    import torch
    from transformers import GenerationConfig

    k = sampling.samples_per_prompt
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded = [tokenizer(p).input_ids for p in prompts["prompt"]]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda j: len(encoded[j]))  # stable
    rows = [(j, s) for j in order for s in range(k)]
    ids_col = list(prompts["prompt_id"])
    gen_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        **({"cache_implementation": cache_implementation} if cache_implementation else {}),
    )
    results: dict[tuple[int, int], dict[str, Any]] = {}
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        width = max(len(encoded[j]) for j, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (j, _) in enumerate(batch):  # left padding
            n = len(encoded[j])
            input_ids[r, width - n :] = torch.tensor(encoded[j])
            mask[r, width - n :] = 1
        seeds = [row_seed(sampling.seed, ids_col[j], s) for j, s in batch]
        uniforms = torch.from_numpy(
            np.stack([np.random.default_rng(seed).random(sampling.max_new_tokens) for seed in seeds])
        )
        sampler = SeededSampler(uniforms, width, sampling, eos_ids)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_config,
                logits_processor=[sampler],
            )
        new = out[:, width:].cpu().tolist()
        for r, (j, s) in enumerate(batch):
            tokens = new[r]
            stop = next((t for t, tok in enumerate(tokens) if tok in eos_ids), None)
            content = tokens if stop is None else tokens[:stop]
            results[(j, s)] = {
                "continuation": _continuation_text(tokenizer, encoded[j], content, decoded[j]),
                "n_prompt_tokens": len(encoded[j]),
                "n_new_tokens": len(content),
                "finish_reason": "length" if stop is None else "stop",
                "seed": seeds[r],
            }
        if progress is not None:
            progress.update(len(batch))

    extra = [c for c in prompts.columns if c not in ("prompt_id", "prompt")]
    records = []
    for j in range(len(prompts)):
        base = prompts.iloc[j]
        for s in range(k):
            records.append(
                {
                    "prompt_id": base["prompt_id"],
                    "sample_id": s,
                    "prompt": base["prompt"],
                    **results[(j, s)],
                    **{c: base[c] for c in extra},
                }
            )
    return pd.DataFrame.from_records(records, columns=COLUMNS + extra)


# --------------------------------------------------------------------------- the vLLM engine


@functools.cache
def vllm_missing() -> str | None:
    """Why `import vllm` fails in this Python (one line), or None when it works. Tried in a child
    process: importing vLLM takes seconds and sets up its own logging, which the Snakemake head
    process (where the workflow checks its inputs) does not need."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def check_engines(cfg: Config) -> None:
    """Before any job runs: a run with engine vllm needs an importable vLLM (one line naming the runs
    and the fix)."""
    runs = sorted(name for name, run in cfg.generate.runs.items() if run.engine == "vllm")
    if not runs:
        return
    why = vllm_missing()
    if why is not None:
        from shardwise.errors import InputError

        raise InputError(
            f"generate.models ({', '.join(runs)}): engine vllm, but vllm cannot be imported here ({why}); "
            "install it (README, 'Install vLLM on the CPU'; the CUDA vllm on GPU nodes) or set engine: hf"
        )


def generation_eos_ids(model_dir: str | Path, tokenizer: Any) -> list[int]:
    """The EOS ids the hf engine stops at (:func:`_eos_ids` of the loaded model), read from the
    directory: its generation_config.json's, else its config's, else the tokenizer's."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def vllm_sampling_params(sampling: Sampling, seed: int, eos_ids: list[int]) -> Any:
    """One request's SamplingParams, every field that changes the draw set from the config: no
    penalties, no min_p, top_k 0 = off, EOS = the model's EOS ids (as the hf engine), suppressed
    before min_new_tokens (with the tokenizer's EOS, which vLLM always adds to that set); token ids
    only (the texts are decoded here, jointly with the prompt)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=seed,
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.min_new_tokens,
        ignore_eos=True,  # the tokenizer's EOS: stop at exactly `eos_ids` instead (stop_token_ids)
        stop_token_ids=list(eos_ids),
        detokenize=False,
    )


def vllm_engine(
    model_dir: str | Path,
    dtype: str,
    n_gpus: int,
    engine: dict[str, Any],
    layout: dict[str, Any],
    threads: int = 1,
) -> Any:
    """A vLLM engine on a prepared model directory, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0:
    no spawned engine core, so the caller needs no `__main__` guard and a killed worker leaves no
    orphan engine). The model's generation_config.json is not read (``generation_config="vllm"``);
    prefix caching is on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if n_gpus == 0:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(layout.get("cpu_kv_cache_gib", 4))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the job's CPUs, as torch threads
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch
    from vllm import LLM

    from shardwise.models import resolve_dtype

    torch.set_num_threads(max(1, threads))
    resolved = str(resolve_dtype(dtype, "cpu" if n_gpus == 0 else "cuda")).removeprefix("torch.")
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": resolved,
        "seed": 0,
        "generation_config": "vllm",
        "enable_prefix_caching": True,
        "tensor_parallel_size": engine["tensor_parallel_size"],
        "enforce_eager": engine["enforce_eager"],
        "max_num_seqs": layout.get("max_num_seqs", 256),
    }
    if engine.get("max_model_len"):
        kwargs["max_model_len"] = engine["max_model_len"]
    if n_gpus > 0:
        kwargs["gpu_memory_utilization"] = layout.get("gpu_memory_utilization", 0.9)
    return LLM(**kwargs)


def vllm_table(
    llm: Any,
    tokenizer: Any,
    prompts: pd.DataFrame,
    sampling: Sampling,
    eos_ids: list[int],
    progress: Any = None,
) -> pd.DataFrame:
    """:func:`generate_table` with vLLM: the same rows, columns and text decoding, one request per
    (prompt_id, sample_id) seeded with :func:`row_seed`; all of them go to the engine at once."""
    from vllm.inputs import TokensPrompt

    k = sampling.samples_per_prompt
    encoded = [tokenizer(p).input_ids for p in prompts["prompt"]]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in encoded]
    ids_col = list(prompts["prompt_id"])
    rows = [(j, s) for j in range(len(encoded)) for s in range(k)]
    seeds = [row_seed(sampling.seed, ids_col[j], s) for j, s in rows]
    requests = [TokensPrompt(prompt_token_ids=list(encoded[j])) for j, _ in rows]
    params = [vllm_sampling_params(sampling, seed, eos_ids) for seed in seeds]
    outputs = llm.generate(requests, params, use_tqdm=False)
    extra = [c for c in prompts.columns if c not in ("prompt_id", "prompt")]
    records = []
    for (j, s), seed, out in zip(rows, seeds, outputs, strict=True):
        tokens = list(out.outputs[0].token_ids)
        stop = next((t for t, tok in enumerate(tokens) if tok in eos_ids), None)
        content = tokens if stop is None else tokens[:stop]
        base = prompts.iloc[j]
        records.append(
            {
                "prompt_id": base["prompt_id"],
                "sample_id": s,
                "prompt": base["prompt"],
                "continuation": _continuation_text(tokenizer, encoded[j], content, decoded[j]),
                "n_prompt_tokens": len(encoded[j]),
                "n_new_tokens": len(content),
                "finish_reason": "length" if stop is None else "stop",
                "seed": seed,
                **{c: base[c] for c in extra},
            }
        )
    if progress is not None:
        progress.update(len(rows))
    return pd.DataFrame.from_records(records, columns=COLUMNS + extra)


def _compute_shard_vllm(
    ctx: ShardContext, chunks: list[range], prompts: pd.DataFrame, a: GenerateArgs
) -> None:
    """The vLLM worker body: one engine per shard worker, one generate call per chunk, each
    committed before the next (a killed worker resumes from its last committed chunk)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from shardwise.models import resolve_dtype

    assert a.engine is not None
    sampling = a.sampling
    # ctx.device refuses a GPU shard without CUDA, as the hf engine does; SHARDWISE_FORCE_CPU=1 -> cpu
    n_gpus = 0 if ctx.device == "cpu" else ctx.n_gpus
    llm = vllm_engine(a.model_dir, a.dtype, n_gpus, a.engine, a.vllm or {}, ctx.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    eos_ids = generation_eos_ids(a.model_dir, tokenizer)
    total = sum(len(c) for c in chunks) * sampling.samples_per_prompt
    new_tokens = 0
    with ctx.progress(total, unit="seq") as bar:
        for chunk in chunks:
            table = vllm_table(llm, tokenizer, prompts.iloc[chunk.start : chunk.stop], sampling, eos_ids, bar)
            ctx.commit(chunk, table)
            new_tokens += int(table["n_new_tokens"].sum())
    dtype = resolve_dtype(a.dtype, "cpu" if n_gpus == 0 else "cuda")
    ctx.record_speed(
        SimpleNamespace(dtype=dtype),
        items=total,
        tokens=new_tokens,
        engine="vllm",
        vllm_version=a.engine["version"],
        tensor_parallel_size=a.engine["tensor_parallel_size"],
    )


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class GenerateArgs:
    """A generation worker's arguments: the run's settings, where things are, the batch size (and,
    for vLLM, the engine's settings and its memory and scheduler layout)."""

    prompts: str
    model_dir: str
    dtype: str
    sampling: Sampling
    batch_size: int
    engine: dict[str, Any] | None = None  # settings.generate's "engine" entry (engine vllm)
    vllm: dict[str, Any] | None = None  # gpu_memory_utilization, cpu_kv_cache_gib, max_num_seqs


def prepare(cfg: Config, request: Request) -> Prepared[GenerateArgs]:
    """A run's shards. They cut at multiples of `chunk_size` and batches form inside chunks, so
    every prompt is generated in the same batch whatever `n_shards` or `shards_per_job` is. The
    model's dtype is part of the identity, and so is `batch_size` unless the dtype is float32: in
    bfloat16 or float16 the batch changes the texts, so a new batch size starts a new store (the old
    one is kept, and reused if the old batch size comes back)."""
    run = request.wildcards["run"]
    gen = cfg.generate
    wanted = settings.generate(cfg, run)
    layout = None
    if gen.runs[run].engine == "vllm":
        v = gen.vllm
        layout = {
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "cpu_kv_cache_gib": v.cpu_kv_cache_gib,
            "max_num_seqs": v.max_num_seqs,
        }
    args = GenerateArgs(
        prompts=str(request.items),
        model_dir=str(request.model_dir),
        dtype=wanted["dtype"],
        sampling=gen.runs[run].sampling,
        batch_size=gen.batch_size,
        engine=wanted.get("engine"),
        vllm=layout,
    )
    return Prepared(
        settings=wanted,
        n_items=len(load_prompts(request.items)),
        spec=gen.shards,
        args=args,
        codec=lambda _plan: CODEC,
        align=gen.shards.chunk_size,
    )


def compute_shard(ctx: ShardContext) -> None:
    """Worker body: generate the shard's pending chunks and commit each one."""
    a: GenerateArgs = ctx.args
    chunks = ctx.pending_chunks()
    if not chunks:
        return
    prompts = load_prompts(a.prompts)
    if a.engine is not None and a.engine.get("name") == "vllm":
        _compute_shard_vllm(ctx, chunks, prompts, a)
        return
    model, tokenizer, device = load_shard_model(a.model_dir, a.dtype, ctx.device, ctx.n_gpus)
    total = sum(len(c) for c in chunks) * a.sampling.samples_per_prompt
    new_tokens = 0
    with ctx.progress(total, unit="seq") as bar:
        for chunk in chunks:
            part = prompts.iloc[chunk.start : chunk.stop]
            table = generate_table(model, tokenizer, part, a.sampling, a.batch_size, device, progress=bar)
            ctx.commit(chunk, table)
            new_tokens += int(table["n_new_tokens"].sum())
    ctx.record_speed(model, items=total, tokens=new_tokens, batch_size=a.batch_size)


STAGE: ShardedStage[GenerateArgs] = ShardedStage(
    name="generate",
    outputs="generations",
    key=("run",),
    items="prompts",
    ext=CODEC.ext,
    prepare=prepare,
    compute=compute_shard,
)
