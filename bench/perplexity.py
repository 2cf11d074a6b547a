"""Perplexity scoring throughput: token-budget batching vs fixed-size batching vs the bare forward.

    python bench/perplexity.py                                   # CPU, a small random Llama
    python bench/perplexity.py --model-dir resources/models/smollm2
    python bench/perplexity.py --device cuda --shape 1b          # GPU

Generations with RealToxicityPrompts-like lengths (prompts of 5-40 words, continuations of 1-20
words). "token budget": :func:`shardwise.fluency.score_table` (length-sorted, packed to
--batch-tokens padded tokens). "fixed size": the same scoring in corpus order, --batch-size
generations per batch (what a plain DataLoader does). "bare forward": ``model(...).logits`` over the
token-budget batches, nothing scored. Prints scored tokens per second and the padding overhead of
each. Numbers measured so far: docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from teacher_logits import SHAPES, WORDS, random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--model-dir")
    ap.add_argument("--items", type=int, default=None, help="generations (default 512 CPU, 16384 GPU)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default 2048 CPU, 32768 GPU")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="fixed-size batches (default 32 CPU, 256 GPU)"
    )
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    gpu = a.device == "cuda"
    items = a.items or (16384 if gpu else 512)
    batch_tokens = a.batch_tokens or (32768 if gpu else 2048)
    batch_size = a.batch_size or (256 if gpu else 32)

    import pandas as pd
    import torch

    from shardwise.batching import batches
    from shardwise.config import ModelSpec
    from shardwise.fluency import continuation_nll, pad_id_of, score_table
    from shardwise.models import load_model, prepare_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-ppl-"))
    if a.model_dir:
        model_dir = Path(a.model_dir)
    else:
        model_dir = tmp / "model"
        prepare_model(
            ModelSpec(name="bench", source="local", path=str(random_model(tmp / "src", a.shape))), model_dir
        )
    device = "cuda:0" if gpu else "cpu"
    model, tok = load_model(model_dir, device, a.dtype)
    pad = pad_id_of(tok, "bench")
    rng = random.Random(0)
    table = pd.DataFrame(
        {
            "prompt_id": [i // 4 for i in range(items)],
            "sample_id": [i % 4 for i in range(items)],
            "prompt": [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) for _ in range(items)],
            "continuation": [" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 20))) for _ in range(items)],
        }
    )

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def budget() -> tuple[float, int]:
        started = time.perf_counter()
        out = score_table(model, tok, table, batch_tokens, pad, device)
        sync()
        return time.perf_counter() - started, int(out.n_tokens.sum())

    prompts = [tok(p).input_ids for p in table.prompt]
    conts = [tok(c, add_special_tokens=False).input_ids for c in table.continuation]
    seqs = [p + c for p, c in zip(prompts, conts, strict=True)]

    def fixed() -> tuple[float, int]:
        started, padded = time.perf_counter(), 0
        for s in range(0, items, batch_size):
            rows = range(s, min(s + batch_size, items))
            continuation_nll(
                model, [seqs[j] for j in rows], [len(prompts[j]) for j in rows], pad, device=device
            )
            padded += len(rows) * max(len(seqs[j]) for j in rows)
        sync()
        return time.perf_counter() - started, padded

    groups = batches([len(s) for s in seqs], batch_tokens)

    def bare() -> tuple[float, int]:
        started, padded = time.perf_counter(), 0
        with torch.inference_mode():
            for batch in groups:
                width = max(len(seqs[j]) for j in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, j in enumerate(batch):
                    ids[r, : len(seqs[j])] = torch.tensor(seqs[j])
                    mask[r, : len(seqs[j])] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # noqa: B018
                padded += ids.numel()
        sync()
        return time.perf_counter() - started, padded

    budget()  # warm-up
    b_s, scored = budget()
    f_s, f_padded = fixed()
    bare_s, b_padded = bare()
    real = sum(len(s) for s in seqs)
    where = torch.cuda.get_device_name(0) if gpu else f"CPU, {torch.get_num_threads()} threads"
    name = a.model_dir or f"random Llama {a.shape}"
    print(f"perplexity: {name} on {where}, {items} generations, {real} tokens ({scored} scored)")
    print(f"  batch_tokens {batch_tokens}, batch_size {batch_size}")
    rows = [
        ("token budget", b_s, b_padded),
        ("fixed size", f_s, f_padded),
    ]
    for label, seconds, padded in rows:
        print(
            f"  {label:13} {scored / seconds:10,.0f} scored tok/s {real / seconds:10,.0f} tok/s"
            f"   padding {padded / real - 1:6.1%}"
        )
    print(
        f"  {'bare forward':13} {'':>10}              {real / bare_s:10,.0f} tok/s   (token-budget batches)"
    )
    print(f"  token budget vs fixed size: {f_s / b_s:.2f}x faster; vs bare forward: {bare_s / b_s:.1%}")


if __name__ == "__main__":
    main()
