"""Prompt tables: every malformed input is one line naming the file."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from shardwise.errors import InputError
from shardwise.tables import load_prompts

pytestmark = pytest.mark.unit


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.jsonl", None, "not found"),
        ("empty.jsonl", "", "no rows"),
        ("empty.csv", "", "empty"),
        ("nocol.jsonl", jsonl({"text": "hi"}), "no 'prompt' column (columns: text)"),
        ("blank.jsonl", jsonl({"prompt": "a"}, {"prompt": "  "}, {"prompt": ""}), "empty or non-text"),
        ("null.jsonl", jsonl({"prompt": "a"}, {"prompt": None}), "empty or non-text 'prompt' in 1 row"),
        ("num.jsonl", jsonl({"prompt": 3}), "empty or non-text"),
        (
            "dup.jsonl",
            jsonl({"prompt_id": "x", "prompt": "a"}, {"prompt_id": "x", "prompt": "b"}),
            "duplicate prompt_id 'x' (rows 0, 1)",
        ),
        (
            "mixed.jsonl",  # failed with ArrowTypeError after generation (issue 25)
            jsonl(
                {"prompt_id": 1, "prompt": "a"},
                {"prompt_id": 2, "prompt": "b"},
                {"prompt_id": "p3", "prompt": "c"},
            ),
            "prompt_id mixes kinds: row 0 has number 1, row 2 has str 'p3'",
        ),
        ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "not valid UTF-8 (byte 15, line 1)"),
        ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2: not valid JSON"),
        ("list.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
        ("prompts.txt", "hello\n", "unsupported format"),
        ("bad.parquet", b"not parquet", "not a readable Parquet file"),
    ],
)
def test_bad_prompts_are_one_line_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(InputError) as err:
        load_prompts(path)
    message = str(err.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


def test_ids_default_to_row_numbers_and_extra_columns_are_kept(tmp_path):
    path = write(tmp_path / "p.jsonl", jsonl({"prompt": "a", "topic": "x"}, {"prompt": "b", "topic": "y"}))
    df = load_prompts(path)
    assert list(df.columns) == ["prompt_id", "prompt", "topic"]
    assert list(df.prompt_id) == [0, 1]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet(tmp_path, suffix):
    df = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["hello", "world, again"], "n": ["1", "2"]})
    path = tmp_path / f"p{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    got = load_prompts(path)
    assert list(got.prompt) == ["hello", "world, again"]
    assert list(got.prompt_id) == ["a", "b"]
