"""How a stage's chunks are written and joined into a shard file, and its shards into the merged
output: the :class:`Codec` protocol and the Parquet codec of the table stages (the HDF5 codecs are
in their stages' modules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Codec(Protocol):
    """How a stage's chunks are written and joined into a shard file."""

    @property
    def ext(self) -> str:
        """The shard files' extension."""
        ...

    def write(self, obj: Any, path: Path) -> None: ...

    def combine(self, parts: Sequence[Path], path: Path) -> None: ...


@dataclass(frozen=True)
class ParquetCodec:
    """Chunks are pandas DataFrames; a shard is their concatenation as one Parquet file."""

    ext: str = "parquet"

    def write(self, obj: Any, path: Path) -> None:
        obj.to_parquet(path, index=False)

    def combine(self, parts: Sequence[Path], path: Path) -> None:
        """Stream the parts into one file, one part in memory at a time (a row group each): a
        merged run of the Snellius example is 2.5M generations, ~0.6 GB as one Arrow table. Schemas
        are unified as ``pa.concat_tables(promote_options="default")`` does (a column that is all
        None in one chunk has type null there; a column missing from a part is null in its rows)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="default")
        empty = schema.empty_table()
        with pq.ParquetWriter(path, schema) as writer:
            for part in parts:
                table = pa.concat_tables([empty, pq.read_table(part)], promote_options="default")
                writer.write_table(table)
