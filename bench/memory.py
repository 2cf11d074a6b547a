"""Peak memory of the table steps of one generation run at the Snellius example's size (99,442
prompts x 25 samples = 2.5M generations), each in its own process: the merge of 32 shards
(ParquetCodec.combine), the columns score_toxicity reads, profanity-check over all continuations
(batched as the rule does it, and in one call) and the report's columns of scores.parquet for all
3 runs. Synthetic text of RealToxicityPrompts' length (prompts of 6-25 words, continuations of 20
tokens ~ 12-18 words).

    python bench/memory.py [--scale 1] [--shards 32]

Prints, per step: rows, wall and CPU seconds, peak RSS of its process (VmHWM) and what the
rule's SLURM job has in profiles/slurm (rome: 1.75 GiB per core; the merges and score_toxicity
ask for one core).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROMPTS, SAMPLES, RUNS = 99_442, 25, 3
WORDS = np.array(
    str.split(
        "the a of and to in is was he she they we it that for on with as at by from his her their this "
        "said people time year day man woman city world house school water night story game music "
        "book money war work family friend street road river car door window phone letter morning "
        "walked talked looked found made took gave told asked thought wanted went came saw knew felt "
        "old new good great small large long little young big red dark cold warm quiet loud idiot "
        "stupid damn hell crap sucks dumb moron"
    )
)


def texts(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    lengths = rng.integers(lo, hi + 1, size=n)
    words = WORDS[rng.integers(0, len(WORDS), size=int(lengths.sum()))]
    ends = np.cumsum(lengths)
    return [" " + " ".join(words[e - k : e]) for e, k in zip(ends, lengths, strict=True)]


def build(root: Path, n_prompts: int, n_shards: int) -> list[Path]:
    """One run's generation shards, of the merged table's columns, cut by prompt as generate does."""
    rng = np.random.default_rng(0)
    prompt_text = np.array(texts(rng, n_prompts, 6, 25), dtype=object)
    paths = []
    for i, block in enumerate(np.array_split(np.arange(n_prompts), n_shards)):
        n = len(block) * SAMPLES
        rows = np.repeat(block, SAMPLES)
        frame = pd.DataFrame(
            {
                "prompt_id": [f"p{r:06d}" for r in rows],
                "sample_id": np.tile(np.arange(SAMPLES), len(block)),
                "prompt": prompt_text[rows],
                "continuation": texts(rng, n, 12, 18),
                "n_prompt_tokens": rng.integers(8, 40, size=n),
                "n_new_tokens": np.full(n, 20),
                "finish_reason": "length",
                "seed": rng.integers(0, 2**62, size=n),
                "prompt_toxicity": rng.random(n),
                "challenging": rng.random(n) < 0.01,
            }
        )
        paths.append(root / f"{i:04d}.parquet")
        frame.to_parquet(paths[-1], index=False)
    return paths


def scores(path: Path, n_prompts: int) -> None:
    """scores.parquet of the analysis (its columns), all runs."""
    rng = np.random.default_rng(1)
    n = n_prompts * SAMPLES
    ids = np.array([f"p{r:06d}" for r in range(n_prompts)], dtype=object)
    frame = pd.DataFrame(
        {
            "model": np.repeat(["llama8b", "llama8b-t07", "smollm2-1b7"], n),
            "prompt_id": np.tile(np.repeat(ids, SAMPLES), RUNS),
            "sample_id": np.tile(np.arange(SAMPLES), n_prompts * RUNS),
            "ppl": rng.lognormal(3, 1, size=n * RUNS),
            "toxicity": rng.beta(0.3, 3, size=n * RUNS),
            "n_new_tokens": np.full(n * RUNS, 20),
            "nll_sum": rng.random(n * RUNS) * 60,
            "n_scored_tokens": np.full(n * RUNS, 20),
        }
    )
    frame.to_parquet(path, index=False)


# Each step runs in a fresh interpreter: `python -c STEP` with the paths as arguments.
STEPS = {
    "merge: ParquetCodec.combine": (
        "import sys; from pathlib import Path; from shardwise.shards.codecs import ParquetCodec\n"
        "ParquetCodec().combine([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))"
    ),
    "merge: all parts as one table (before)": (
        "import sys; import pyarrow as pa, pyarrow.parquet as pq\n"
        "pq.write_table(pa.concat_tables([pq.read_table(p) for p in sys.argv[2:]], "
        "promote_options='default'), sys.argv[1] + '.old')"
    ),
    "score_toxicity: its columns": (
        "import sys; from shardwise.tables import load_generations\n"
        "load_generations(sys.argv[1], ('prompt_id', 'sample_id', 'continuation'))"
    ),
    "score_toxicity: all columns (before)": ("import sys, pandas as pd\npd.read_parquet(sys.argv[1])"),
    "score_toxicity: profanity-check, 100k per call": (
        "import sys; from shardwise.tables import load_generations; from shardwise import toxicity\n"
        "t = load_generations(sys.argv[1], ('prompt_id', 'sample_id', 'continuation'))\n"
        "toxicity.profanity_check(t['continuation'].tolist())"
    ),
    "score_toxicity: profanity-check, one call (before)": (
        "import sys; from shardwise.tables import load_generations; from shardwise import toxicity\n"
        "t = load_generations(sys.argv[1], ('prompt_id', 'sample_id', 'continuation'))\n"
        "toxicity.profanity_check(t['continuation'].tolist(), batch_size=len(t))"
    ),
    "report: its columns of scores.parquet": (
        "import sys, pandas as pd\npd.read_parquet(sys.argv[1], columns=['model', 'ppl', 'toxicity'])"
    ),
    "report: all of scores.parquet (before)": ("import sys, pandas as pd\npd.read_parquet(sys.argv[1])"),
}


def peak_rss_mib(code: str, args: list[str]) -> tuple[float, dict]:
    # VmHWM, the peak RSS of this process' own memory (ru_maxrss would carry the parent's peak
    # across fork + exec on Linux)
    wrapped = (
        "import sys\n"
        f"exec(compile({code!r}, 'step', 'exec'))\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", wrapped, *args], check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
    }
    return int(out.stdout.split()[-1]) / 1024, timing


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=32)
    args = parser.parse_args()
    n_prompts = round(PROMPTS * args.scale)
    when = time.strftime("%F %T")
    print(f"bench/memory.py --scale {args.scale:g}: {n_prompts:,} prompts x {SAMPLES} samples, {when}")
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        parts = [str(p) for p in build(root, n_prompts, args.shards)]
        merged = str(root / "run.parquet")
        scores(root / "scores.parquet", n_prompts)
        print(f"built {len(parts)} shards and scores.parquet in {time.perf_counter() - started:.0f} s")
        rows = []
        for name, code in STEPS.items():
            step_args = {"merge": [merged, *parts], "report": [str(root / "scores.parquet")]}
            step_args = step_args.get(name.split(":")[0], [merged])
            rss, timing = peak_rss_mib(code, step_args)
            n = n_prompts * SAMPLES * (RUNS if name.startswith("report") else 1)
            rows.append({"step": name, "rows": n, **timing, "peak_rss_mib": round(rss)})
            print(json.dumps(rows[-1]), flush=True)
        size = Path(merged).stat().st_size / 2**20
        print(f"\nmerged run: {size:.0f} MiB on disk; the rule's job on rome: 1 core = 1,792 MiB")
        print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
