"""Input tables (JSONL / CSV / Parquet): reading with one-line errors, and validation.

Used by every stage that takes a user table: prompts (generate), a text corpus (teacher logits),
labelled texts (probes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from shardwise.errors import InputError

SUFFIXES = (".jsonl", ".csv", ".parquet")


def _decode(path: Path, what: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{what} file {path}: not valid UTF-8 (byte {exc.start}, line {line})") from None


def read_table(path: str | Path, what: str = "input") -> pd.DataFrame:
    """Read a table by its suffix; every failure is an InputError naming the file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"{what} file {path}: unsupported format (use {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise InputError(f"{what} file {path}: not found")
    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise InputError(f"{what} file {path}: not a readable Parquet file ({exc})") from None
    text = _decode(path, what)
    if path.suffix == ".csv":
        if not text.strip():
            raise InputError(f"{what} file {path}: empty")
        try:
            from io import StringIO

            return pd.read_csv(StringIO(text), keep_default_na=False, dtype=str)
        except pd.errors.ParserError as exc:
            raise InputError(f"{what} file {path}: not valid CSV ({exc})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{what} file {path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{what} file {path}: line {number}: expected a JSON object")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _plain(value: object) -> object:
    """numpy scalars as Python values, so messages read `1`, not `np.int64(1)`."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _require_column(df: pd.DataFrame, column: str, path: Path, what: str) -> None:
    if column not in df.columns:
        cols = ", ".join(map(str, df.columns)) or "none"
        raise InputError(f"{what} file {path}: no {column!r} column (columns: {cols})")


def _require_text_column(df: pd.DataFrame, column: str, path: Path, what: str, id_col: str) -> None:
    _require_column(df, column, path, what)
    values = df[column]
    bad = values.isna() | ~values.map(lambda v: isinstance(v, str)) | (values.astype(str).str.strip() == "")
    if bad.any():
        rows = list(df.index[bad])
        ids = ", ".join(repr(_plain(df[id_col].iloc[r])) for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise InputError(
            f"{what} file {path}: empty or non-text {column!r} in {len(rows)} row(s): {id_col} {ids}{more}"
        )


def _ensure_ids(df: pd.DataFrame, id_col: str, path: Path, what: str) -> pd.DataFrame:
    if id_col not in df.columns:
        return df.assign(**{id_col: range(len(df))})
    ids = df[id_col]
    if ids.isna().any():
        row = int(df.index[ids.isna()][0])
        raise InputError(f"{what} file {path}: missing {id_col} in row {row}")
    # ids of two kinds (1 and "p2") pass here but fail when a stage writes them (pyarrow
    # ArrowTypeError, after generation): refused now, in one line
    kinds = ids.map(lambda v: "number" if isinstance(_plain(v), (int, float)) else type(_plain(v)).__name__)
    if kinds.nunique() > 1:
        first, other = kinds.iloc[0], kinds[kinds != kinds.iloc[0]].index[0]
        raise InputError(
            f"{what} file {path}: {id_col} mixes kinds: row 0 has {first} {_plain(ids.iloc[0])!r}, row "
            f"{other} has {kinds[other]} {_plain(ids[other])!r} (give every row the same kind)"
        )
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = _plain(ids[dup].iloc[0])
        rows = list(df.index[ids == first])
        raise InputError(
            f"{what} file {path}: duplicate {id_col} {first!r} (rows {', '.join(map(str, rows))})"
        )
    return df


def load_prompts(path: str | Path) -> pd.DataFrame:
    """The validated prompts table: `prompt_id` (unique; the row number when absent), `prompt`,
    and any extra columns, in file order."""
    path = Path(path)
    df = read_table(path, "prompts")
    if len(df) == 0:
        raise InputError(f"prompts file {path}: no rows")
    _require_column(df, "prompt", path, "prompts")
    df = _ensure_ids(df.reset_index(drop=True), "prompt_id", path, "prompts")
    _require_text_column(df, "prompt", path, "prompts", "prompt_id")
    front = ["prompt_id", "prompt"]
    return df[front + [c for c in df.columns if c not in front]]


def load_texts(path: str | Path, what: str = "corpus") -> pd.DataFrame:
    """A validated text table: `id` (unique integers; the row number when absent), `text`, and any
    extra columns, in file order."""
    path = Path(path)
    df = read_table(path, what)
    if len(df) == 0:
        raise InputError(f"{what} file {path}: no rows")
    _require_column(df, "text", path, what)
    df = _ensure_ids(df.reset_index(drop=True), "id", path, what)
    try:
        ids = pd.to_numeric(df["id"], errors="raise", downcast=None)
        if not (ids == ids.round()).all():
            raise ValueError
    except (ValueError, TypeError):
        bad = next(v for v in df["id"] if not str(v).lstrip("-").isdigit())
        raise InputError(
            f"{what} file {path}: id {_plain(bad)!r} is not an integer (ids are stored as int64)"
        ) from None
    df["id"] = ids.astype("int64")
    _require_text_column(df, "text", path, what, "id")
    front = ["id", "text"]
    return df[front + [c for c in df.columns if c not in front]]


_BINARY = {0: 0, 1: 1, "0": 0, "1": 1, "false": 0, "true": 1, "False": 0, "True": 1}  # False == 0, True == 1


def load_labelled(
    path: str | Path, labels: list[str] | tuple[str, ...], what: str = "probes data"
) -> pd.DataFrame:
    """A validated labelled table: `id` (unique integers, else the row number), `text`, `group`
    (the row's own id when absent), each label column as 0/1 ints, and `control_type` (str) when the
    file has it. Every label must be binary (0/1, true/false) and have both classes; control_type
    needs at least two types and must not decide any label (a label constant within every type)."""
    path = Path(path)
    df = load_texts(path, what)
    if not labels:
        raise InputError(f"{what} file {path}: no label columns configured (probes.labels)")
    if "group" not in df.columns:
        df["group"] = df["id"]
    for label in labels:
        _require_column(df, label, path, what)
        values = df[label].map(lambda v: _BINARY.get(v, _BINARY.get(str(v).strip())))
        if values.isna().any():
            bad = sorted({repr(_plain(v)) for v in df[label][values.isna()]})[:3]
            raise InputError(
                f"{what} file {path}: label column {label!r} is not binary (values {', '.join(bad)})"
            )
        df[label] = values.astype("int64")
        if df[label].nunique() < 2:
            raise InputError(
                f"{what} file {path}: label {label!r} has one class only (all {int(df[label].iloc[0])})"
            )
    extra = []
    if "control_type" in df.columns:  # Hewitt & Liang control task: one random label per type
        df["control_type"] = df["control_type"].astype(str)
        n_types = df["control_type"].nunique()
        if n_types < 2:
            raise InputError(
                f"{what} file {path}: column 'control_type' has {n_types} type only; the control task "
                "needs several types (or drop the column)"
            )
        sizes = df["control_type"].map(df["control_type"].value_counts())
        shared = df[sizes >= 2]  # a type seen once is constant trivially
        for label in labels:
            per_type = shared.groupby("control_type")[label].nunique()
            if len(per_type) >= 2 and len(shared) >= 10 and (per_type == 1).all():
                raise InputError(
                    f"{what} file {path}: label {label!r} is constant within every control_type (the "
                    "type decides it), so its control task is a relabelling of the same types and "
                    "selectivity is 0 by construction; use a control_type that does not decide the label"
                )
        extra = ["control_type"]
    return df[["id", "text", "group", *labels, *extra]]


GENERATION_COLUMNS = ("prompt_id", "sample_id", "prompt", "continuation")


def _generations_schema(path: str | Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types
        raise InputError(f"generations file {path}: not a readable Parquet file ({exc})") from None


def load_generations(path: str | Path, needed: Sequence[str] = GENERATION_COLUMNS) -> pd.DataFrame:
    """The columns `needed` of a generations table, and only those: a run of the Snellius example
    is 2.5M rows, with its prompts and every column carried through from the prompts file."""
    names = _generations_schema(path)
    missing = [c for c in needed if c not in names]
    if missing:
        raise InputError(
            f"generations file {path}: missing column(s) {', '.join(missing)} "
            f"(columns: {', '.join(map(str, names))})"
        )
    try:
        return pd.read_parquet(path, columns=list(needed))
    except Exception as exc:
        raise InputError(f"generations file {path}: not a readable Parquet file ({exc})") from None


def count_generations(path: str | Path) -> int:
    """Rows of a generations table, from its footer (nothing else is read)."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as exc:  # pyarrow raises several types
        raise InputError(f"generations file {path}: not a readable Parquet file ({exc})") from None


def scorer_name(path: str | Path) -> str:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"shardwise.scorer", b'"unknown"'))


def scorer_dtype(path: str | Path) -> str:
    """The dtype a merged scores file was computed in (its ``dtype`` column; several joined by
    ", ", which a verified merge does not let happen); "unknown" for a file without the column."""
    import pyarrow.parquet as pq

    if "dtype" not in pq.read_schema(path).names:
        return "unknown"
    values = pq.read_table(path, columns=["dtype"]).column("dtype").unique().to_pylist()
    return ", ".join(sorted(str(v) for v in values))
