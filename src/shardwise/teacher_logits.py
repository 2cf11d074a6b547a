"""Stage `teacher_logits`: a teacher's top-k next-token log-probs over a corpus, sharded
(docs/design.md §3 "Teacher logits"; the file layout, reader and KD loss are in :mod:`shardwise.logits`).

Per item: tokenise (truncated to ``max_length``), one forward pass of the base model in batches of
length-sorted items (right-padded, attention mask), then, in slices of rows so that the full
``[tokens, vocab]`` logits never exist at once, the LM head, log-softmax over the full vocabulary
and top-k. A non-finite log-prob fails the shard, naming the item.

Determinism: shard boundaries fall on multiples of ``chunk_size`` and batches are formed inside a
chunk, so every item is computed in the same batch whatever ``n_shards`` or ``shards_per_job`` is:
merged files are byte-identical across shard layouts (on the same hardware and software).

The GPU is never left waiting for the disk: each batch's results are copied to pinned host memory
asynchronously and handed to a writer thread (a bounded queue), which waits for the copy, checks
the values, assembles each chunk in corpus order and commits it while the next batches run.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shardwise import __version__, settings
from shardwise.batching import batches, right_padded
from shardwise.config import Config
from shardwise.errors import ShardError
from shardwise.fingerprint import sha256_file, stable_hash
from shardwise.logits import check_attrs, concat_files, topk_dtype, write_file
from shardwise.models import load_shard_model, read_record, revision
from shardwise.sharded import Prepared, Request, ShardedStage
from shardwise.shards.worker import ShardContext
from shardwise.tables import count_generations, load_texts

log = logging.getLogger(__name__)

# The stage's code identity (shardwise.fingerprint.stage_identity): bump VERSION when a change is meant
# to change results; LIBRARIES are the distributions whose installed versions compute them.
VERSION = 1
LIBRARIES = ("torch", "transformers")

LOGITS_BYTES = 512 * 1024**2  # fp32 logits of one LM-head slice (rows x vocab x 4 bytes)
QUEUE_DEPTH = 4  # batches in flight between the forward loop and the writer thread
FP16_MIN = float(np.finfo(np.float16).min)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True)
class H5Codec:
    """Chunks are dicts of arrays (:mod:`shardwise.logits` layout); a shard is their concatenation."""

    attrs: dict[str, Any] = field(default_factory=dict)
    ext: str = "h5"

    def write(self, obj: Any, path: Path) -> None:
        write_file(path, obj, self.attrs)

    def combine(self, parts: Any, path: Path) -> None:
        concat_files(parts, path, self.attrs)

    def check(self, path: Path, where: str) -> None:
        """At the merge: a shard of another teacher, revision, tokenizer or k is refused."""
        check_attrs(path, self.attrs, where)


def load_corpus(path: str | Path, generations: bool) -> pd.DataFrame:
    """The corpus as (id, text): a text table, or a generation run's table (text = prompt +
    continuation, id = row number of results/generations/<run>.parquet)."""
    if not generations:
        return load_texts(path)[["id", "text"]]
    gen = pd.read_parquet(path, columns=["prompt", "continuation"])
    return pd.DataFrame(
        {"id": np.arange(len(gen), dtype=np.int64), "text": gen["prompt"] + gen["continuation"]}
    )


def tokenizer_sha256(model_dir: str | Path) -> str:
    files = {n: sha256_file(Path(model_dir) / n) for n in TOKENIZER_FILES if (Path(model_dir) / n).is_file()}
    return stable_hash(files)[:16]


def vocab_size(model_dir: str | Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size)


@dataclass(frozen=True)
class TeacherArgs:
    """A teacher-logits worker's arguments."""

    corpus: str
    from_generations: bool
    model_dir: str
    dtype: str
    k: int
    max_length: int
    batch_tokens: int
    vocab_size: int


def prepare(cfg: Config, request: Request) -> Prepared[TeacherArgs]:
    """A teacher's shards, and the codec that stamps every file with the layout attrs."""
    tl = cfg.teacher_logits
    teacher = request.wildcards["teacher"]
    model_dir, corpus = request.model_dir, request.items
    generations = tl.corpus is None
    # a generation run's rows from its footer (2.5M texts would be read)
    n_items = count_generations(corpus) if generations else len(load_corpus(corpus, generations))
    record = read_record(model_dir)
    tok_hash = tokenizer_sha256(model_dir)
    wanted = settings.teacher_logits(cfg, teacher)
    vocab = vocab_size(model_dir)
    attrs = {
        "teacher": teacher,
        "model": cfg.models[tl.teachers[teacher]].describe(),
        "revision": revision(record),
        "tokenizer_sha256": tok_hash,
        "k": tl.k,
        "vocab_size": vocab,
        "max_length": tl.max_length,
        "version": __version__,
    }
    args = TeacherArgs(
        corpus=str(corpus),
        from_generations=generations,
        model_dir=str(model_dir),
        dtype=wanted["dtype"],
        k=tl.k,
        max_length=tl.max_length,
        batch_tokens=tl.batch_tokens,
        vocab_size=vocab,
    )
    return Prepared(
        settings=wanted,
        n_items=n_items,
        spec=tl.shards,
        args=args,
        codec=lambda plan: H5Codec(attrs={**attrs, "fingerprint": plan.fingerprint}),
        identity={"tokenizer_sha256": tok_hash},
        align=tl.shards.chunk_size,
    )


# --------------------------------------------------------------------------- the computation


def topk_forward(model: Any, input_ids: Any, attention_mask: Any, k: int, real: Any) -> tuple[Any, Any, Any]:
    """One batch: (topk_ids int32 [T, k], topk_logprobs fp16 [T, k], non-finite bool [T]) for the
    T real tokens, whose flat positions in the [batch, width] input are `real` (a device tensor,
    computed on the host: boolean-mask indexing on the device would stall it for the count).

    Calls the base model, then the LM head on slices of rows (LOGITS_BYTES of fp32 logits at a
    time), so the full logits tensor is never materialised; log-softmax only for the top k.
    """
    import torch

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    flat = hidden.last_hidden_state.flatten(0, 1).index_select(0, real)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    rows = max(1, LOGITS_BYTES // (4 * head.weight.shape[0]))
    ids, lps, bad = [], [], []
    for a in range(0, flat.shape[0], rows):
        logits = head(flat[a : a + rows].to(head.weight.device)).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        values, indices = logits.topk(k, dim=-1)
        # log-sum-exp around the top value, in place on the slice (no longer needed): no max pass
        # and no temporary, where torch.logsumexp makes both (2x faster on the CPU)
        top = values[:, :1]
        values = values - (top + logits.sub_(top).exp_().sum(-1, keepdim=True).log_())
        bad.append(~torch.isfinite(values).all(-1))
        lps.append(values.clamp_min(FP16_MIN).half())  # fp16 would turn < -65504 into -inf
        ids.append(indices.int())
    return torch.cat(ids), torch.cat(lps), torch.cat(bad)


@dataclass
class _Chunk:
    rows: range
    item_ids: np.ndarray
    parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


class ChunkWriter(threading.Thread):
    """Receives batches (host tensors + the CUDA event of their copy), checks and assembles them,
    and commits each finished chunk in corpus order, overlapping the next batches' forward passes."""

    def __init__(self, ctx: ShardContext, id_dtype: np.dtype):
        super().__init__(name=f"writer-{ctx.index}", daemon=True)
        self.ctx = ctx
        self.id_dtype = id_dtype
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.bytes_written = 0

    def put(self, message: Any) -> None:
        self.raise_error()
        self.queue.put(message)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        chunk: _Chunk | None = None
        while (message := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain, so the producer never blocks on a full queue
            try:
                kind, *body = message
                if kind == "chunk":
                    chunk = _Chunk(*body)
                elif kind == "batch":
                    assert chunk is not None
                    self._batch(chunk, *body)
                else:
                    assert chunk is not None
                    self._commit(chunk)
            except BaseException as exc:  # handed to the producer
                self.error = exc

    def _batch(
        self, chunk: _Chunk, positions: list[int], lengths: list[int], tensors: Any, event: Any
    ) -> None:
        if event is not None:
            event.synchronize()
        tokens, ids, lps, bad = (t.numpy() for t in tensors)
        if bad.any():
            row = int(np.argmax(bad))
            ends = np.cumsum(lengths)
            r = int(np.searchsorted(ends, row, side="right"))
            j = positions[r]
            raise ShardError(
                f"{self.ctx.plan.name} shard {self.ctx.index}: item {chunk.rows.start + j} "
                f"(id {chunk.item_ids[j]}) has non-finite log-probs at token {row - (ends[r] - lengths[r])}"
            )
        start = 0
        for j, n in zip(positions, lengths, strict=True):
            chunk.parts[j] = (tokens[start : start + n], ids[start : start + n], lps[start : start + n])
            start += n

    def _commit(self, chunk: _Chunk) -> None:
        order = [chunk.parts[j] for j in range(len(chunk.rows))]
        lengths = np.array([len(p[0]) for p in order], dtype=np.int64)
        arrays: dict[str, np.ndarray] = {
            "item_ids": chunk.item_ids.astype(np.int64),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "token_ids": np.concatenate([p[0] for p in order]).astype(np.int32),
            "topk_ids": np.concatenate([p[1] for p in order]).astype(self.id_dtype),
            "topk_logprobs": np.concatenate([p[2] for p in order]),
        }
        self.ctx.commit(chunk.rows, arrays)
        self.bytes_written += sum(a.nbytes for a in arrays.values())


def compute_shard(ctx: ShardContext) -> None:
    """Worker body: top-k log-probs of the shard's pending chunks, each committed as it completes."""
    import torch

    a: TeacherArgs = ctx.args
    chunks = ctx.pending_chunks()
    if not chunks:
        return
    corpus = load_corpus(a.corpus, a.from_generations)
    model, tokenizer, device = load_shard_model(a.model_dir, a.dtype, ctx.device, ctx.n_gpus)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != a.vocab_size:
        raise ShardError(f"{ctx.plan.name}: the LM head has {vocab} outputs, config.json says {a.vocab_size}")
    k, pad = a.k, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cuda = device.startswith("cuda")
    writer = ChunkWriter(ctx, topk_dtype(vocab))
    writer.start()
    n_tokens = truncated = 0
    items = sum(len(c) for c in chunks)
    texts = corpus["text"].tolist()
    try:
        with ctx.progress(items) as bar:
            for chunk in chunks:
                encoded = tokenizer(texts[chunk.start : chunk.stop], truncation=True, max_length=a.max_length)
                enc = encoded["input_ids"]
                truncated += sum(len(e) == a.max_length for e in enc)
                lengths = [len(e) for e in enc]
                if min(lengths) == 0:
                    j = lengths.index(0)
                    raise ShardError(f"{ctx.plan.name}: item {chunk.start + j} tokenises to no tokens")
                writer.put(("chunk", chunk, corpus["id"].to_numpy()[chunk.start : chunk.stop]))
                for batch in batches(lengths, a.batch_tokens):
                    ids, mask = right_padded([enc[j] for j in batch], pad)
                    real = mask.flatten().nonzero().squeeze(1)
                    with torch.inference_mode():
                        out = topk_forward(model, ids.to(device), mask.to(device), k, real.to(device))
                        event = None
                        if cuda:  # into pinned host memory, waited for by the writer thread
                            out = tuple(t.to("cpu", non_blocking=True) for t in out)
                            event = torch.cuda.Event()
                            event.record()
                    tokens = ids.flatten()[real].int()
                    writer.put(("batch", batch, [lengths[j] for j in batch], (tokens, *out), event))
                    n_tokens += sum(lengths[j] for j in batch)
                    bar.update(len(batch))
                writer.put(("commit",))
    finally:
        writer.queue.put(None)
        writer.join()
    writer.raise_error()
    ctx.record_speed(
        model, items=items, tokens=n_tokens, truncated_items=truncated, bytes=writer.bytes_written
    )


# --------------------------------------------------------------------------- the stage

STAGE: ShardedStage[TeacherArgs] = ShardedStage(
    name="teacher_logits",
    outputs="teacher_logits",
    key=("teacher",),
    items="corpus",
    ext=H5Codec.ext,
    prepare=prepare,
    compute=compute_shard,
)
