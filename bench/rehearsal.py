"""The Snellius example's DAG on this machine: every stage, through Snakemake and the real shard
mechanism, with a micro model (a random 2-layer x 32-dim Llama and a 512-token byte-level BPE
tokenizer, built offline) in place of each of the example's models, at a fraction of its item counts.

    python bench/rehearsal.py --scale 0.01 [0.1 ...] [--cores 2] [--keep DIR]
    python bench/rehearsal.py --scale 0.01 0.1 --keep DIR --measured   # tables of the kept runs again

Shape of config/snellius.yaml, scaled: 99,442 x scale prompts x 25 samples x 3 generation runs
(32 shards, 4 per job), teacher logits of one run (64 shards; k 64), fluency of every run (8 shards
each), toxicity, the analysis with bootstrap 1000 and the report. The chunk counts are the example's
(chunk_size x scale). Two differences, both said in the table's header: toxicity is the embedded
profanity-check scorer (the example's RoBERTa classifier cannot be built offline), and probes (not in
the example) are added on the demo's labelled set and the capped toxicity set, so every stage runs.
Everything runs on the CPU in float32.

Prints one row per rule: jobs, items, wall (sum over its jobs), CPU, peak RSS of a job (Snakemake's
benchmark: the job's process tree), output size, and the time per item the pipeline spends outside
the model's forward passes (shard workers: compute-loop time minus forward time, SHARDWISE_TIME_FORWARD;
other rules: all of their CPU time). With several scales, the growth of CPU time per item from each
scale to the next (1.0 = linear), and each job's peak RSS projected to the full example (linear
from the two largest scales).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "workflow", "scripts", "src", "profiles", "envs", "config")
PROMPTS, SAMPLES = 99_442, 25
RUNS = {"llama8b": {}, "llama8b-t07": {"temperature": 0.7}, "smollm2-1b7": {}}
TEACHER_RUN = "smollm2-1b7"
# words of the synthetic prompts; a few profane ones, so that profanity-check finds toxic
# continuations (the toxicity probe needs both classes)
WORDS = str.split(
    "the a of and to in is was he she they we it that for on with as at by from his her their this "
    "said people time year day man woman city world house school water night story game music book "
    "money war work family friend street road river car door window phone letter morning evening "
    "walked talked looked found made took gave told asked thought wanted went came saw knew felt "
    "old new good great small large long little young big red dark cold warm quiet loud "
    "idiot stupid damn hell crap sucks dumb moron"
)


def micro_model(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A random 2-layer, 32-dim Llama with a 512-token byte-level BPE tokenizer trained on `texts`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_id": f"p{i:06d}", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(6, 14)))}
        for i in range(n)
    ]


def scaled_chunk(chunk_size: int, scale: float) -> int:
    return max(1, round(chunk_size * scale))


def config(scale: float, model: Path) -> dict:
    n_prompts = round(PROMPTS * scale)
    cpu = {"gpus_per_shard": 0}
    return {
        "models": {"micro": {"source": "local", "path": str(model), "dtype": "float32"}},
        "generate": {
            "prompts": "config/rehearsal-prompts.jsonl",
            "models": {run: {"model": "micro", **extra} for run, extra in RUNS.items()},
            "sampling": {
                "samples_per_prompt": SAMPLES,
                "max_new_tokens": 20,
                "min_new_tokens": 0,
                "temperature": 1.0,
                "top_p": 0.9,
                "top_k": 0,
                "seed": 0,
            },
            "batch_size": 256,
            "shards": {"n_shards": 32, "shards_per_job": 4, "chunk_size": scaled_chunk(256, scale), **cpu},
        },
        "teacher_logits": {
            "generations": TEACHER_RUN,
            "teachers": {"micro": {}},
            "k": 64,
            "max_length": 512,
            "batch_tokens": 8192,
            "shards": {"n_shards": 64, "shards_per_job": 1, "chunk_size": scaled_chunk(1024, scale), **cpu},
        },
        "probes": {
            "data": "config/demo/labelled.jsonl",
            "labels": ["subject_plural", "main_negated", "has_number", "past_tense"],
            "models": ["micro"],
            "max_length": 64,
        },
        "analysis": {
            "runs": None,
            "bootstrap": 1000,
            "fluency": {
                "model": "micro",
                "batch_tokens": 32768,
                "ppl_cap": 10000,
                "shards": {
                    "n_shards": 8,
                    "shards_per_job": 1,
                    "chunk_size": scaled_chunk(8192, scale),
                    **cpu,
                },
            },
            "toxicity": {"scorer": "profanity-check", "threshold": 0.5},
        },
        "_n_prompts": n_prompts,
    }


def setup(root: Path, scale: float) -> dict:
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, root / name)
    cfg = config(scale, root / "micro-model")
    rows = prompts(cfg.pop("_n_prompts"))
    with open(root / "config/rehearsal-prompts.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    micro_model(root / "micro-model", [r["prompt"] for r in rows[:5000]])
    (root / "config/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"prompts": len(rows)}


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# what each rule writes (shard stores for the compute rules: their declared outputs are manifests);
# keyed by the rule's benchmark name (benchmarks/<name>/; teacher_logits: teacher_logits)
OUTPUTS = {
    "prepare_model": ["resources/models/*"],
    "generate": ["results/generations/*/shards"],
    "merge_generate": ["results/generations/*.parquet"],
    "teacher_logits": ["results/teacher_logits/*/shards"],
    "merge_teacher_logits": ["results/teacher_logits/*.h5"],
    "score_fluency": ["results/analysis/fluency/*/shards"],
    "merge_fluency": ["results/analysis/fluency/*.parquet"],
    "score_toxicity": ["results/analysis/toxicity/*.parquet"],
    "toxicity_probe_data": ["results/probes/toxicity/data.parquet"],
    "activations": ["results/activations/*/*/shards"],
    "merge_activations": ["results/activations/*/*.h5"],
    "train_probes": ["results/probes/*/micro"],
    "analysis": ["results/analysis/*.csv", "results/analysis/*.parquet"],
    "report": ["results/analysis/report.html", "results/analysis/figures"],
}


def shard_records(root: Path) -> dict[str, list[dict]]:
    """Shard records by stage (the run's current ones: those in each store's newest run dir)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for plan in root.glob("results/**/shards/*/plan.json"):
        for path in plan.parent.glob("*-of-*.json"):
            record = json.loads(path.read_text())
            out[record["stage"]].append(record)
    return out


STAGE_OF = {  # shard records' stage -> its compute rule's benchmark name
    "generate": "generate",
    "teacher_logits": "teacher_logits",
    "activations": "activations",
    "fluency": "score_fluency",
}


def measure(root: Path, info: dict) -> pd.DataFrame:
    rows = []
    n_gen = info["prompts"] * SAMPLES
    items = {
        "generate": n_gen * len(RUNS),
        "merge_generate": n_gen * len(RUNS),
        "teacher_logits": n_gen,
        "merge_teacher_logits": n_gen,
        "score_fluency": n_gen * len(RUNS),
        "merge_fluency": n_gen * len(RUNS),
        "score_toxicity": n_gen * len(RUNS),
        "toxicity_probe_data": n_gen * len(RUNS),
        "analysis": n_gen * len(RUNS),
        "report": n_gen * len(RUNS),
    }
    records = shard_records(root)
    loop, forward = defaultdict(float), defaultdict(float)
    for stage, recs in records.items():
        rule = STAGE_OF.get(stage, stage)
        for r in recs:
            stats = r.get("stats", {})
            loop[rule] += stats.get("seconds", 0.0)
            forward[rule] += stats.get("forward_seconds", 0.0)
            if rule == "activations":  # both probe sets: their rows, not the generations
                items[rule] = items.get(rule, 0) + r["n_rows"]
    if "activations" in items:  # the probe sets' rows (the toxicity set is capped)
        items["merge_activations"] = items["train_probes"] = items["activations"]
    tsvs = defaultdict(list)
    for tsv in root.glob("benchmarks/**/*.tsv"):
        rule = tsv.relative_to(root / "benchmarks").parts[0]
        tsvs[rule].append(pd.read_csv(tsv, sep="\t").iloc[-1])
    for rule, bench in sorted(
        tsvs.items(), key=lambda kv: list(OUTPUTS).index(kv[0]) if kv[0] in OUTPUTS else 99
    ):
        b = pd.DataFrame(bench)
        n = items.get(rule)
        out_bytes = sum(size(p) for pattern in OUTPUTS.get(rule, []) for p in root.glob(pattern))
        cpu = float(b.cpu_time.sum())
        if rule in loop and forward[rule] > 0:
            outside = (loop[rule] - forward[rule]) / n * 1e3 if n else float("nan")
        else:
            outside = cpu / n * 1e3 if n else float("nan")
        rows.append(
            {
                "rule": rule,
                "jobs": len(b),
                "items": n,
                "wall_s": round(float(b.s.sum()), 1),
                "cpu_s": round(cpu, 1),
                "peak_rss_mib": round(float(b.max_rss.max()), 0),
                "output_mib": round(out_bytes / 2**20, 2),
                "forward_s": round(forward[rule], 1) if rule in forward else None,
                "outside_model_ms_per_item": round(outside, 4),
                "cpu_ms_per_item": round(cpu / n * 1e3, 4) if n else None,
            }
        )
    return pd.DataFrame(rows)


def project_rss(tables: dict[float, pd.DataFrame]) -> pd.DataFrame:
    """Peak RSS of a job projected to the full example (scale 1), linearly from the two largest
    scales run: what a rule's job needs on the cluster if its memory grows with its items."""
    lo, hi = sorted(tables)[-2:]
    a = tables[lo].set_index("rule").peak_rss_mib
    b = tables[hi].set_index("rule").peak_rss_mib
    slope = (b - a) / (hi - lo)
    full = (b + slope * (1 - hi)).clip(lower=b)
    columns = {f"rss {lo:g}": a, f"rss {hi:g}": b, "MiB per 0.1": (slope / 10).round(0)}
    return pd.DataFrame({**columns, "at 1 (MiB)": full.round(0)}).dropna()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, nargs="+", default=[0.01])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", type=Path, help="run in DIR/scale-<s> and keep it (default: a temp dir)")
    parser.add_argument(
        "--measured",
        action="store_true",
        help="run nothing: print the tables of the runs kept in --keep DIR (same --scale)",
    )
    args = parser.parse_args()
    if args.measured and not args.keep:
        parser.error("--measured needs --keep DIR")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SHARDWISE_TIME_FORWARD": "1"}
    env.pop("PYTHONPATH", None)
    print(f"bench/rehearsal.py on {os.cpu_count()} CPUs, --cores {args.cores}, {time.strftime('%Y-%m-%d')}")
    print("config/snellius.yaml's shape; micro model for every model; toxicity: profanity-check;")
    print("probes added (demo labelled set + toxicity set capped at probes.toxicity_rows); CPU, float32")
    tables = {}
    for scale in args.scale:
        base = args.keep or Path(tempfile.mkdtemp(prefix="rehearsal-"))
        root = base / f"scale-{scale:g}"
        if args.measured:
            info = json.loads((root / "rehearsal.json").read_text())
        else:
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            info = setup(root, scale)
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "snakemake", "--cores", str(args.cores)],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
            )
            info["wall_s"] = time.perf_counter() - started
            if proc.returncode != 0:
                sys.exit(f"scale {scale:g}: snakemake failed (in {root}):\n{proc.stderr[-4000:]}")
            (root / "rehearsal.json").write_text(json.dumps(info))
        table = measure(root, info)
        tables[scale] = table
        n_gen = info["prompts"] * SAMPLES * len(RUNS)
        print(
            f"\n## scale {scale:g}: {info['prompts']:,} prompts, {n_gen:,} generations; "
            f"workflow wall {info['wall_s']:.0f} s"
        )
        print(table.to_markdown(index=False))
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    scales = sorted(tables)
    for lo, hi in itertools.pairwise(scales):
        a = tables[lo].set_index("rule").cpu_ms_per_item
        b = tables[hi].set_index("rule").cpu_ms_per_item
        growth = (b / a).dropna().round(2)
        print(f"\n## CPU per item, scale {hi:g} vs {lo:g} (1.0 = linear)")
        print(growth.to_frame("growth").to_markdown())
    if len(scales) > 1:
        print("\n## Peak RSS of a job, projected to scale 1 (linear from the two largest scales)")
        print(project_rss(tables).to_markdown())


if __name__ == "__main__":
    main()
