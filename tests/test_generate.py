"""Generation: seeded per (prompt_id, sample_id), independent of batching; the sampler's filters."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from shardwise.config import Sampling
from shardwise.generate import SeededSampler, generate_table, row_seed
from shardwise.models import load_model

pytestmark = pytest.mark.unit

SAMPLING = Sampling(
    samples_per_prompt=3, max_new_tokens=10, min_new_tokens=0, temperature=1.0, top_p=0.9, top_k=0, seed=7
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def prompts():
    texts = ["the cat", "a big dog ran over the small house", "why", "how the river ran quickly", "the"]
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(5)], "prompt": texts, "topic": list("abcde")})


def test_table_has_the_contract_columns_and_one_row_per_sample(model_and_tokenizer, prompts):
    model, tok = model_and_tokenizer
    table = generate_table(model, tok, prompts, SAMPLING, batch_size=4)
    assert list(table.columns[:8]) == [
        "prompt_id",
        "sample_id",
        "prompt",
        "continuation",
        "n_prompt_tokens",
        "n_new_tokens",
        "finish_reason",
        "seed",
    ]
    assert list(table.topic) == [t for t in "abcde" for _ in range(3)]  # extra columns carried
    expected = [(f"p{i}", s) for i in range(5) for s in range(3)]
    assert list(zip(table.prompt_id, table.sample_id, strict=True)) == expected
    assert set(table.finish_reason) <= {"stop", "length"}
    assert (table[table.finish_reason == "length"].n_new_tokens == 10).all()
    assert (table[table.finish_reason == "stop"].n_new_tokens < 10).all()
    assert table.seed.nunique() == 15
    assert (table.n_prompt_tokens == [len(tok(p).input_ids) for p in prompts.prompt for _ in range(3)]).all()


def test_same_texts_whatever_the_batch_size_or_the_split(model_and_tokenizer, prompts):
    model, tok = model_and_tokenizer
    reference = generate_table(model, tok, prompts, SAMPLING, batch_size=15)
    for batch_size in (1, 2, 7):
        got = generate_table(model, tok, prompts, SAMPLING, batch_size=batch_size)
        pd.testing.assert_frame_equal(got, reference)
    split = pd.concat(
        [generate_table(model, tok, prompts.iloc[a:b], SAMPLING, batch_size=4) for a, b in ((0, 2), (2, 5))],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(split, reference)


def test_other_seed_other_texts(model_and_tokenizer, prompts):
    model, tok = model_and_tokenizer
    a = generate_table(model, tok, prompts, SAMPLING, batch_size=8)
    b = generate_table(model, tok, prompts, Sampling(**{**SAMPLING.__dict__, "seed": 8}), batch_size=8)
    assert (a.continuation != b.continuation).sum() > 5


def test_top_k_1_is_greedy_decoding(model_and_tokenizer, prompts):
    model, tok = model_and_tokenizer
    greedy = Sampling(**{**SAMPLING.__dict__, "top_k": 1, "samples_per_prompt": 1})
    table = generate_table(model, tok, prompts.iloc[:2], greedy, batch_size=2)
    for row in table.itertuples():
        ids = tok(row.prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=tok.eos_token_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        prompt = tok.decode(ids[0], skip_special_tokens=True)
        assert row.continuation == tok.decode(ids[0].tolist() + new, skip_special_tokens=True)[len(prompt) :]


def test_continuations_keep_the_space_at_the_prompt_boundary():
    """A SentencePiece-style tokenizer (Llama-2, Mistral) drops the leading space of a text it
    decodes: decoded on its own, " ran" would come back as "ran", glued to the prompt."""
    from conftest import make_metaspace_model

    model, tok = make_metaspace_model()
    texts = ["The weather forecast for tomorrow says", "After three weeks of rain, the farmers", "The"]
    prompts = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": texts})
    table = generate_table(model, tok, prompts, SAMPLING, batch_size=4)
    starts_with_space = table.continuation.str.startswith(" ").sum()
    assert starts_with_space >= 2  # the random model starts words too; their space is kept
    spaced = table[table.continuation.str.startswith(" ")]
    for row in spaced.itertuples():  # re-tokenised, the text gives the prompt's tokens, then a word start
        ids = tok(row.prompt + row.continuation).input_ids
        n = len(tok(row.prompt).input_ids)
        assert tok.convert_ids_to_tokens(ids[n]).startswith("\u2581")


def test_row_seed_depends_on_base_prompt_and_sample_only():
    assert row_seed(0, "p1", 0) == row_seed(0, "p1", 0)
    assert len({row_seed(0, "p1", 0), row_seed(0, "p1", 1), row_seed(0, "p2", 0), row_seed(1, "p1", 0)}) == 4
    assert 0 <= row_seed(0, "x", 0) < 2**63


def sample_many(scores, sampling, n=2000, step_offset=0):
    """Draw n tokens from one row of `scores` with uniform draws spread over [0, 1)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    uniforms = u.view(n, 1).expand(n, step_offset + 1)  # the same draw at every step
    sampler = SeededSampler(uniforms, prompt_len=1 - step_offset, sampling=sampling, eos_ids=[0])
    out = sampler(torch.zeros((n, 1), dtype=torch.long), scores.expand(n, -1).clone())
    assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one token allowed per row
    return out.argmax(-1)


PROBS = torch.tensor([[0.05, 0.5, 0.3, 0.15]])


def test_sampler_follows_the_distribution():
    s = Sampling(1, 1, 0, 1.0, 1.0, 0, 0)
    tokens = sample_many(PROBS.log(), s)
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(freq, PROBS[0], atol=1e-3)


def test_sampler_top_p_keeps_the_smallest_nucleus():
    s = Sampling(1, 1, 0, 1.0, 0.8, 0, 0)  # 0.5 + 0.3 reach 0.8: tokens 1 and 2 only
    freq = torch.bincount(sample_many(PROBS.log(), s), minlength=4) / 2000
    assert torch.allclose(freq, torch.tensor([0.0, 0.625, 0.375, 0.0]), atol=1e-3)


def test_sampler_top_k_and_temperature():
    s = Sampling(1, 1, 0, 1.0, 1.0, 2, 0)
    freq = torch.bincount(sample_many(PROBS.log(), s), minlength=4) / 2000
    assert torch.allclose(freq, torch.tensor([0.0, 0.625, 0.375, 0.0]), atol=1e-3)
    cold = Sampling(1, 1, 0, 0.01, 1.0, 0, 0)
    assert (sample_many(PROBS.log(), cold) == 1).all()


def test_sampler_suppresses_eos_before_min_new_tokens():
    eos_heavy = torch.tensor([[0.9, 0.05, 0.03, 0.02]]).log()
    s = Sampling(1, 1, 2, 1.0, 1.0, 0, 0)
    assert (sample_many(eos_heavy, s, step_offset=0) != 0).all()  # step 0 < min_new_tokens 2
    assert (sample_many(eos_heavy, s, step_offset=2) == 0).float().mean() > 0.85  # step 2: allowed


def test_the_models_own_generation_config_does_not_change_the_samples(model_and_tokenizer, prompts):
    """transformers 5 fills every field a generate() call leaves unset from model.generation_config
    and runs those processors before ours: repetition_penalty 3 + no_repeat_ngram_size 2 in the
    model's config changed 10 of 12 continuations."""
    model, tok = model_and_tokenizer
    reference = generate_table(model, tok, prompts, SAMPLING, batch_size=4)
    saved = model.generation_config
    shipped = copy.deepcopy(saved)
    shipped.repetition_penalty, shipped.no_repeat_ngram_size = 3.0, 2
    shipped.temperature, shipped.top_k, shipped.top_p, shipped.do_sample = 0.3, 5, 0.5, True
    model.generation_config = shipped
    try:
        got = generate_table(model, tok, prompts, SAMPLING, batch_size=4)
    finally:
        model.generation_config = saved
    pd.testing.assert_frame_equal(got, reference)
    assert model.generation_config is saved  # left as it was
