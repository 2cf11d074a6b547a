"""Generation throughput of the engines, in one process, as one table.

    python bench/generation.py                                    # CPU, the demo model (SmolLM2-135M)
    python bench/generation.py --dtype bfloat16                   # the same in bf16
    python bench/generation.py --device cuda --model-dir <dir> --prompts <n> --bandwidth-gbs 3350

Rows (all on the same prompts, samples per prompt and max new tokens, with the run's sampling:
top_p 0.9, temperature 1, min_new_tokens 1, seeded per (prompt_id, sample_id)):

- ``hf per-prompt``: :func:`shardwise.generate.generate_table` one sequence at a time (batch 1) on
  the first --loop-prompts prompts (it is slow);
- ``hf batched``: the same at --batch-size (transformers' default dynamic cache), the `hf` engine;
- ``hf static``: the same with ``cache_implementation="static"``;
- ``vllm``: :func:`shardwise.generate.vllm_table`, one request per sample, all at once (the `vllm`
  engine; its start-up, printed apart, is not in its time).

Each row is warmed up on a few prompts first. Columns: new tokens, seconds, new tokens/s, the
ratio to the per-prompt loop, on a GPU with --bandwidth-gbs the ratio to the weight-bandwidth bound
(batch x bandwidth / weight bytes: every decoding step reads the weights once; for vLLM the bound
at --batch-size), and reproducibility: for hf rows the share of texts equal to `hf batched`'s; for
vLLM the share equal after resubmitting the second half of the requests in reverse order.
Numbers measured so far: docs/performance.md ("Generation engines").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model-dir", default=str(REPO / "resources/models/smollm2"))
    ap.add_argument("--prompts-file", default=str(REPO / "config/demo/prompts.jsonl"))
    ap.add_argument("--prompts", type=int, default=70, help="prompts (default: the demo's 70)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loop-prompts", type=int, default=10, help="prompts of the per-prompt loop row")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--engines", default="loop,hf,static,vllm", help="rows to run, comma-separated")
    ap.add_argument("--kv-gib", type=int, default=2, help="vLLM CPU KV cache (GiB)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth, GB/s")
    a = ap.parse_args()
    rows = a.engines.split(",")
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))

    import pandas as pd
    import torch

    from shardwise.config import Sampling
    from shardwise.generate import generate_table
    from shardwise.models import load_model
    from shardwise.tables import load_prompts

    torch.set_num_threads(threads)
    prompts = load_prompts(a.prompts_file).iloc[: a.prompts].reset_index(drop=True)
    sampling = Sampling(a.samples, a.max_new_tokens, 1, 1.0, 0.9, 0, 0)
    device = "cuda:0" if a.device == "cuda" else "cpu"
    warm = prompts.iloc[:2]
    results: dict[str, dict] = {}

    def timed(fn):
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if a.device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    weight_bytes = 0
    if {"loop", "hf", "static"} & set(rows):
        model, tok = load_model(a.model_dir, device, a.dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

        def hf(part, batch, cache=None):
            return generate_table(model, tok, part, sampling, batch, device, cache_implementation=cache)

        for name, part, batch, cache in (
            ("loop", prompts.iloc[: a.loop_prompts], 1, None),
            ("hf", prompts, a.batch_size, None),
            ("static", prompts, a.batch_size, "static"),
        ):
            if name in rows:
                hf(warm, batch, cache)
                table, seconds = timed(lambda part=part, batch=batch, cache=cache: hf(part, batch, cache))
                results[name] = {"table": table, "seconds": seconds, "batch": batch}
                print(f"{name}: {int(table.n_new_tokens.sum())} new tokens in {seconds:.1f} s", flush=True)
        del model

    if "vllm" in rows:
        from transformers import AutoTokenizer

        from shardwise.generate import generation_eos_ids, vllm_engine, vllm_table

        engine = {"tensor_parallel_size": 1, "enforce_eager": a.device == "cpu", "max_model_len": None}
        n_gpus = 1 if a.device == "cuda" else 0
        llm, start = timed(
            lambda: vllm_engine(a.model_dir, a.dtype, n_gpus, engine, {"cpu_kv_cache_gib": a.kv_gib}, threads)
        )
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        eos = generation_eos_ids(a.model_dir, tok)
        vllm_table(llm, tok, warm, sampling, eos)
        table, seconds = timed(lambda: vllm_table(llm, tok, prompts, sampling, eos))
        half = prompts.iloc[len(prompts) // 2 :].iloc[::-1]
        again = vllm_table(llm, tok, half, sampling, eos)
        key = ["prompt_id", "sample_id"]
        merged = table.merge(again, on=key, suffixes=("", "_again"))
        same = (merged.continuation == merged.continuation_again).mean()
        results["vllm"] = {"table": table, "seconds": seconds, "batch": a.batch_size, "same": same}
        print(f"vllm {getattr(__import__('vllm'), '__version__', '?')}: engine start {start:.1f} s")

    labels = {"loop": "hf per-prompt", "hf": "hf batched", "static": "hf static", "vllm": "vllm"}
    loop_rate = None
    lines = []
    for name in ("loop", "hf", "static", "vllm"):
        if name not in results:
            continue
        r = results[name]
        tokens = int(r["table"]["n_new_tokens"].sum())
        rate = tokens / r["seconds"]
        loop_rate = rate if name == "loop" else loop_rate
        bound = ""
        if a.bandwidth_gbs and weight_bytes:
            bound = f"{rate / (r['batch'] * a.bandwidth_gbs * 1e9 / weight_bytes):.3f}"
        if name == "vllm":
            repro = f"{r['same']:.3f} (resubmitted half, reversed)"
        elif "hf" in results:
            ref = results["hf"]["table"].set_index(["prompt_id", "sample_id"]).continuation
            mine = r["table"].set_index(["prompt_id", "sample_id"]).continuation
            repro = f"{(mine == ref.loc[mine.index]).mean():.3f} (vs hf batched)"
        else:
            repro = ""
        lines.append(
            {
                "engine": labels[name],
                "sequences": len(r["table"]),
                "new tokens": tokens,
                "seconds": round(r["seconds"], 1),
                "new tok/s": round(rate, 1),
                "x per-prompt": round(rate / loop_rate, 2) if loop_rate else None,
                "x bound": bound,
                "same texts": repro,
            }
        )
    print(
        f"{a.device}, {a.dtype}, {Path(a.model_dir).name}, {len(prompts)} prompts x {a.samples} samples x "
        f"<= {a.max_new_tokens} new tokens, batch {a.batch_size}, {threads} threads"
    )
    print(pd.DataFrame(lines).to_string(index=False))


if __name__ == "__main__":
    main()
