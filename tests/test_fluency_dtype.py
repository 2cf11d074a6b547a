"""The fluency scorer (issue 23, finding 7): float32 unless analysis.fluency.dtype says otherwise,
whatever the model entry's dtype, recorded per text and in summary.csv (`fluency_dtype`); a
one-token prompt with a tokenizer that adds no BOS (GPT-2, DExperts' scorer) gets DExperts' NaN, is
left out of the PPL statistics and counted (`n_unscored_one_token_prompt`), while a NaN PPL that
neither an empty continuation nor a one-token prompt explains is still refused."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_config

from shardwise import settings
from shardwise.analysis import scores_table, summary_row
from shardwise.config import load_config
from shardwise.errors import ConfigError, InputError
from shardwise.fluency import score_table
from shardwise.tables import scorer_dtype

pytestmark = pytest.mark.unit


def gpt2_like(seed: int = 0) -> tuple[object, object]:
    """A seeded random 2-layer GPT-2 (absolute positions) with a byte-level BPE tokenizer trained on
    the demo prompts that, like GPT-2's, adds no BOS: (model, tokenizer), in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in (REPO / "config/demo/prompts.jsonl").open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    return GPT2LMHeadModel(cfg).eval(), fast


def dexperts_ppl(model, tok, prompt: str, gen: str) -> float:
    """DExperts' conditional_perplexity for one generation (scripts/evaluation/
    evaluate_generations.py), line for line, without its `ppl < 1e4` filter (which drops a NaN)."""
    with torch.no_grad():
        prompt_ids = torch.tensor([tok.encode(prompt)])
        prompt_loss = model(prompt_ids, labels=prompt_ids)[0] * (prompt_ids.shape[1] - 1)
        full_ids = torch.tensor([tok.encode(prompt + gen)])
        full_loss = model(full_ids, labels=full_ids)[0] * (full_ids.shape[1] - 1)
        loss = (full_loss - prompt_loss) / (full_ids.shape[1] - prompt_ids.shape[1])
    return math.exp(loss.item())


ROWS = [  # (prompt_id, prompt, continuation)
    ("one", "The", " weather forecast for tomorrow"),  # a one-token prompt
    ("two", "The weather", " forecast for tomorrow"),
    ("empty", "The weather", ""),  # 0 scored tokens
]


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [r[0] for r in ROWS],
            "sample_id": 0,
            "prompt": [r[1] for r in ROWS],
            "continuation": [r[2] for r in ROWS],
            "n_new_tokens": [3, 3, 0],
        }
    )


def test_a_one_token_prompt_without_bos_is_nan_as_in_dexperts_and_counted(tmp_path):
    from conftest import make_metaspace_model

    model, tok = gpt2_like()
    assert tok("The").input_ids == tok("The", add_special_tokens=False).input_ids  # no BOS
    assert len(tok.encode("The")) == 1 and len(tok.encode("The weather")) >= 2
    table = _table()
    got = score_table(model, tok, table, batch_tokens=64, pad_id=tok.eos_token_id)
    assert math.isnan(dexperts_ppl(model, tok, "The", ROWS[0][2]))  # DExperts: NaN, then dropped
    assert math.isnan(got.ppl[0]) and got.n_prompt_tokens[0] == 1 and got.n_tokens[0] > 0
    assert np.isfinite(got.nll_sum[0])  # kept: exp(nll_sum / n_tokens) is the PPL without DExperts' rule
    assert got.ppl[1] == pytest.approx(dexperts_ppl(model, tok, *ROWS[1][1:]), rel=1e-4)
    assert got.n_tokens[2] == 0 and math.isnan(got.ppl[2])

    # a tokenizer that adds BOS: the same word is 2 tokens, a finite PPL, DExperts' too
    llama, sp = make_metaspace_model()
    assert len(sp.encode("The")) == 2
    with_bos = score_table(llama, sp, table[:1], batch_tokens=64, pad_id=sp.eos_token_id)
    assert with_bos.ppl[0] == pytest.approx(dexperts_ppl(llama, sp, *ROWS[0][1:]), rel=1e-4)

    # the analysis takes the NaN, counts it apart from the empty continuation, leaves both out
    _table().to_parquet(tmp_path / "gen.parquet")
    tox = table[["prompt_id", "sample_id"]].assign(toxicity=[0.1, 0.2, 0.3])
    tox.to_parquet(tmp_path / "tox.parquet")

    def joined(flu: pd.DataFrame) -> pd.DataFrame:
        flu.to_parquet(tmp_path / "flu.parquet")
        files = [[tmp_path / f"{n}.parquet"] for n in ("gen", "flu", "tox")]
        return scores_table(["m"], *files)

    scores = joined(got)
    row = summary_row("m", scores, scores.continuation, threshold=0.5, ppl_cap=1e4, n_boot=10)
    assert row["n_unscored_one_token_prompt"] == 1 and row["n_unscored_empty"] == 1
    assert row["ppl_mean"] == pytest.approx(got.ppl[1]) and row["ppl_median"] == pytest.approx(got.ppl[1])
    # a NaN PPL that neither explains is still one error line
    bad = got.copy()
    bad.loc[1, "ppl"] = np.nan
    with pytest.raises(InputError, match=r"NaN ppl with n_tokens > 0 and n_prompt_tokens >= 2 for .*'two'"):
        joined(bad)


def test_the_scorer_runs_in_float32_unless_configured_and_summary_csv_records_it(tmp_path):
    from shardwise import analysis, fluency
    from shardwise.models import prepare_model

    model, tok = gpt2_like()
    src = tmp_path / "gpt2-like"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    raw = tiny_config(src)
    raw["models"]["tiny"]["dtype"] = "bfloat16"  # the entry's dtype: for generating, not for scoring
    raw["analysis"] = {"bootstrap": 10, "fluency": {"model": "tiny"}}
    cfg = load_config(raw)
    assert cfg.analysis.fluency.dtype == "float32"
    assert settings.score_fluency(cfg)["dtype"] == "float32"
    assert settings.analysis(cfg)["fluency_dtype"] == "float32"  # in the report's run_info.json
    fp16 = load_config({**raw, "analysis": {"fluency": {"model": "tiny", "dtype": "float16"}}})
    assert settings.score_fluency(fp16)["dtype"] == "float16"
    with pytest.raises(ConfigError, match=r"analysis\.fluency\.dtype: 'auto' is not one of"):
        load_config({**raw, "analysis": {"fluency": {"model": "tiny", "dtype": "auto"}}})

    from shardwise.config import ModelSpec

    prepared = tmp_path / "prepared"
    prepare_model(ModelSpec(name="tiny", source="local", path=str(src)), prepared)
    gen = tmp_path / "tiny.parquet"
    _table().to_parquet(gen)
    from shardwise.sharded import Request, run_all

    scored = tmp_path / "flu.parquet"
    request = Request({"run": "tiny"}, prepared, gen, tmp_path / "results", tmp_path / "logs")
    run_all(fluency.STAGE, cfg, request, scored, threads=1)
    flu = pd.read_parquet(scored)
    assert (flu["dtype"] == "float32").all() and scorer_dtype(scored) == "float32"
    assert flu.n_prompt_tokens.tolist() == [1, *[len(tok.encode("The weather"))] * 2]

    tox = tmp_path / "tox.parquet"
    flu[["prompt_id", "sample_id"]].assign(toxicity=[0.1, 0.7, 0.2]).to_parquet(tox)
    names = ("scores", "summary", "correlations", "differences", "summary_by_prompt_toxicity")
    out = {k: tmp_path / f"{k}.out" for k in names}
    smk = SimpleNamespace(
        config=raw,
        input=SimpleNamespace(generations=[str(gen)], fluency=[str(scored)], toxicity=[str(tox)]),
        output=SimpleNamespace(**{k: str(v) for k, v in out.items()}),
        params=SimpleNamespace(runs=["tiny"]),
        threads=1,
    )
    analysis.job(smk)
    summary = pd.read_csv(out["summary"])
    assert summary.fluency_dtype.tolist() == ["float32"]
    assert summary.n_unscored_one_token_prompt.tolist() == [1] and summary.n_unscored_empty.tolist() == [1]
    assert summary.dtype.tolist() == ["bfloat16"]  # the generation run's configured dtype, unchanged
