"""Teacher-logit throughput: the bare forward pass vs the full shard writer, in one run.

    python bench/teacher_logits.py                         # CPU, a small random Llama (~1 min)
    python bench/teacher_logits.py --model-dir resources/models/smollm2   # CPU, the demo model
    python bench/teacher_logits.py --device cuda --shape 1b               # GPU, ~1.1B Llama shape

"bare": ``model(input_ids, attention_mask).logits`` over the same length-sorted batches, nothing
kept. "top-k forward": the stage's :func:`shardwise.teacher_logits.topk_forward` over the same
batches, nothing kept (what the math costs without copies or writing). "writer": the stage's own
shard worker (:func:`shardwise.teacher_logits.compute_shard`): base model, LM head in slices,
log-softmax, top-k, async device->host copies, the writer thread, one committed HDF5 chunk per
`chunk_size` items; then joining the chunks into the shard file (reported apart). Prints tokens/s
of the three, writer / bare, and bytes per token of the shard file.
Numbers measured so far: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SHAPES = {  # Llama-shaped random models: hidden, intermediate, layers, heads, kv heads, vocab
    "small": (512, 1408, 8, 8, 4, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shape
}
WORDS = ("the", "a", "cat", "dog", "ran", "over", "under", "big", "small", "house", "river", "why", "how")


def random_model(path: Path, shape: str) -> Path:
    """A random-weight Llama of `shape` with a small byte-level BPE tokenizer (ids < its vocab)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    d, ff, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_corpus(path: Path, n: int, words: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            length = rng.randint(words // 2, words)
            fh.write(json.dumps({"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(length))}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="random model shape")
    ap.add_argument("--model-dir", help="a prepared model directory instead of a random model")
    ap.add_argument("--items", type=int, default=None, help="corpus items (default: 256 CPU, 4096 GPU)")
    ap.add_argument("--words", type=int, default=None, help="max words per item (default: 64 CPU, 256 GPU)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: 2048 CPU, 16384 GPU")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    gpu = a.device == "cuda"
    items = a.items or (4096 if gpu else 256)
    words = a.words or (256 if gpu else 64)
    batch_tokens = a.batch_tokens or (16384 if gpu else 2048)

    import h5py
    import torch

    from shardwise.batching import batches, right_padded
    from shardwise.config import ModelSpec, load_config
    from shardwise.models import load_model, prepare_model
    from shardwise.shards.worker import ShardContext
    from shardwise.teacher_logits import compute_shard, make_plan, topk_forward

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tl-"))
    if a.model_dir:
        model_dir = Path(a.model_dir)
    else:
        src = random_model(tmp / "src", a.shape)
        model_dir = tmp / "model"
        prepare_model(ModelSpec(name="bench", source="local", path=str(src)), model_dir)
    corpus = write_corpus(tmp / "corpus.jsonl", items, words)
    raw = {
        "models": {"bench": {"source": "local", "path": str(model_dir), "dtype": a.dtype}},
        "teacher_logits": {
            "corpus": str(corpus),
            "teachers": {"bench": {}},
            "k": a.k,
            "max_length": 4096,
            "batch_tokens": batch_tokens,
            "shards": {"n_shards": 1, "gpus_per_shard": 1 if gpu else 0, "chunk_size": a.chunk_size},
        },
    }
    cfg = load_config(raw)
    plan, codec = make_plan(cfg, "bench", model_dir, corpus, results=tmp / "results", logs=tmp / "logs")

    # bare forward over the same batches
    model, tok = load_model(model_dir, "cuda:0" if gpu else "cpu", a.dtype)
    device = model.device
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    work = []
    for start in range(0, items, a.chunk_size):
        enc = tok(texts[start : start + a.chunk_size]).input_ids
        lengths = [len(e) for e in enc]
        for batch in batches(lengths, batch_tokens):
            ids, mask = right_padded([enc[j] for j in batch], 0)
            work.append((ids, mask, sum(lengths[j] for j in batch)))
    n_tokens = sum(w[2] for w in work)

    def bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for ids, mask, _ in work:
                model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # noqa: B018
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def topk_only() -> float:
        """The stage's own forward (base model, LM head in slices, log-softmax, top-k), nothing kept."""
        started = time.perf_counter()
        with torch.inference_mode():
            for ids, mask, _ in work:
                real = mask.flatten().nonzero().squeeze(1).to(device)
                topk_forward(model, ids.to(device), mask.to(device), a.k, real)
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    bare()  # warm-up (kernels, allocator)
    bare_s = min(bare() for _ in range(2))
    topk_s = min(topk_only() for _ in range(3))  # the first one warms up
    model = None  # free its memory before the writer loads its own copy
    if gpu:
        torch.cuda.empty_cache()

    # the shard writer (in this process, as a worker runs it)
    args = {
        "from_generations": False,
        "corpus": str(corpus),
        "model_dir": str(model_dir),
        "dtype": a.dtype,
        "k": a.k,
        "max_length": 4096,
        "batch_tokens": batch_tokens,
        "vocab_size": codec.attrs["vocab_size"],
    }
    ctx = ShardContext(plan=plan, index=0, codec=codec, args=args, threads=torch.get_num_threads())
    writer_runs = []
    for _ in range(3):  # the first one warms up; best of the other two, as for the other two rows
        for part in plan.parts_dir(0).glob("*"):
            part.unlink()
        ctx.stats.clear()
        compute_shard(ctx)
        writer_runs.append(ctx.stats["seconds"])
    writer_s = min(writer_runs[1:])
    started = time.perf_counter()
    ctx.finish()
    finish_s = time.perf_counter() - started
    shard = plan.shard_path(0)
    with h5py.File(shard) as f:
        storage = sum(f[d].id.get_storage_size() for d in f)
    name = a.model_dir or f"random Llama {a.shape} {SHAPES[a.shape]}"
    where = torch.cuda.get_device_name(0) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"teacher logits: {name} on {where}, torch {torch.__version__}")
    print(
        f"  {items} items, {n_tokens} tokens, k={a.k}, batch_tokens={batch_tokens}, chunk_size={a.chunk_size}"
    )
    print(f"  bare forward     {n_tokens / bare_s:12,.0f} tokens/s  ({bare_s:.2f} s)")
    print(f"  top-k forward    {n_tokens / topk_s:12,.0f} tokens/s  ({topk_s:.2f} s; no copies, no writer)")
    print(f"  shard writer     {n_tokens / writer_s:12,.0f} tokens/s  ({writer_s:.2f} s)")
    print(f"  writer / bare    {bare_s / writer_s:12.1%}")
    print(f"  join chunks      {finish_s:12.2f} s (once per shard, after the last chunk)")
    per_token = shard.stat().st_size / n_tokens
    print(f"  bytes per token  {per_token:12.1f} (file), {storage / n_tokens:.1f} (datasets)")


if __name__ == "__main__":
    main()
