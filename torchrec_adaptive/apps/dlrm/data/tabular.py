"""Any click log as CSV or Parquet, described by a small YAML schema.

Schema (YAML)::

    label: click                 # 0/1 column
    categorical: [site, app, device]
    dense: [price, age]          # optional; numbers, empty -> 0
    dense_transform: log1p       # none | log1p (log(1 + max(x, 0)), as DLRM does for Criteo)
    vocab_size: 100000           # optional, per schema (default: the data config's)

Categorical values are hashed as strings with CRC32 to 1 + crc % (vocab - 1) (0 is
"missing"), the same rule as the Avazu reader, so "12" and "12.0" are different IDs:
a column's string form is its identity (Parquet numbers take the text Arrow prints
for them, 12.0 -> "12"; booleans "1"/"0"). DLRM needs a dense input; without dense
columns a constant 0 feature is added. CSV is read with pyarrow's streaming CSV
reader, Parquet with ``pyarrow.dataset``, a block at a time; errors name the file,
the data row (from 1) and the column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import yaml

from .csvblocks import csv_blocks, header, label_values
from .format import Chunk, DataError, DatasetMeta, log1p_clipped
from .hashing import hashed_ids


@dataclass(frozen=True)
class TabularSchema:
    label: str
    categorical: tuple[str, ...]
    dense: tuple[str, ...] = ()
    dense_transform: str = "none"
    vocab_size: int | None = None
    source: str = field(default="schema", compare=False)

    def __post_init__(self) -> None:
        if not self.categorical:
            raise DataError(f"{self.source}: 'categorical' must name at least one column")
        if self.dense_transform not in ("none", "log1p"):
            raise DataError(f"{self.source}: dense_transform must be 'none' or 'log1p', got {self.dense_transform!r}")
        cols = [self.label, *self.categorical, *self.dense]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise DataError(f"{self.source}: column(s) {dup} named twice")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise DataError(f"{self.source}: vocab_size must be >= 2, got {self.vocab_size}")


_SCHEMA_KEYS = {"label", "categorical", "dense", "dense_transform", "vocab_size"}


def read_schema(path: str | Path) -> TabularSchema:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"schema file not found: {path}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a schema is a mapping with keys {sorted(_SCHEMA_KEYS)}")
    unknown = sorted(set(raw) - _SCHEMA_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown schema key(s) {unknown}; known: {sorted(_SCHEMA_KEYS)}")
    if "label" not in raw or "categorical" not in raw:
        raise DataError(f"{path}: a schema needs 'label' and 'categorical'")
    return TabularSchema(label=str(raw["label"]), categorical=tuple(map(str, raw["categorical"])),
                         dense=tuple(map(str, raw.get("dense") or ())),
                         dense_transform=str(raw.get("dense_transform", "none")),
                         vocab_size=raw.get("vocab_size"), source=str(path))


def tabular_meta(schema: TabularSchema, vocab_size: int) -> DatasetMeta:
    vocab = schema.vocab_size or vocab_size
    return DatasetMeta(tuple(schema.categorical), (vocab,) * len(schema.categorical), max(1, len(schema.dense)))


def _blocks(path: Path, schema: TabularSchema) -> Iterator[Any]:
    """Tables of string columns (CSV text as is; Parquet values in the text a CSV of them would hold)."""
    cols = list(schema_columns(schema))
    if path.suffix != ".parquet":
        have = header(path, ",")
        _check_columns(path, schema, have)
        yield from csv_blocks(path, include=cols)
        return
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    try:
        data = ds.dataset(str(path), format="parquet")
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    _check_columns(path, schema, data.schema.names)
    for batch in data.to_batches(columns=cols):
        out = {}
        for c in cols:
            col = batch.column(c)
            if pa.types.is_boolean(col.type):
                col = col.cast(pa.int8())  # True -> "1", as a CSV of it would say
            out[c] = pc.fill_null(col.cast(pa.string()), "")  # 12.0 -> "12": Arrow prints the shortest form
        yield pa.table(out)


def _check_columns(path: Path, schema: TabularSchema, have: Sequence[str]) -> None:
    missing = [c for c in schema_columns(schema) if c not in have]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (the schema {schema.source} names them; "
                        f"the file has {sorted(have)})")


_LABELS = ("0", "1", "0.0", "1.0", "true", "false", "True", "False")


def tabular_chunks(path: str | Path, schema: TabularSchema, meta: DatasetMeta) -> Iterator[Chunk]:
    import pyarrow.compute as pc

    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    rows = 0
    for block in _blocks(path, schema):
        n = block.num_rows
        where = lambda i: f"{path}: row {rows + i + 1}"  # noqa: E731
        y = block.column(schema.label)
        labels, bad = label_values(y, _LABELS, ones=("1", "1.0", "true", "True"))
        if bad is not None:
            raise DataError(f"{where(bad)}: column {schema.label!r} (label) must be 0 or 1, got {y[bad].as_py()!r}")
        dense = np.zeros((n, meta.num_dense), np.float32)
        for j, c in enumerate(schema.dense):
            text = pc.utf8_trim_whitespace(block.column(c))
            try:
                x = pc.cast(pc.if_else(pc.equal(text, ""), "0", text), "float64").to_numpy(zero_copy_only=False)
            except Exception:  # find the row Arrow would not name
                i = next(i for i, v in enumerate(text.to_pylist()) if not _is_number(v))
                raise DataError(f"{where(i)}: column {c!r} (dense) is not a number: {block.column(c)[i].as_py()!r}") from None
            if not np.isfinite(x).all():
                i = int(np.nonzero(~np.isfinite(x))[0][0])
                raise DataError(f"{where(i)}: column {c!r} (dense) is not finite: {block.column(c)[i].as_py()!r}")
            dense[:, j] = log1p_clipped(x) if schema.dense_transform == "log1p" else x
        sparse = np.zeros((n, len(schema.categorical)), np.int64)
        for j, c in enumerate(schema.categorical):
            sparse[:, j] = hashed_ids(block.column(c), meta.vocab_sizes[j], "crc32")[0]
        rows += n
        yield Chunk(dense, sparse, labels)
    if rows == 0:
        raise DataError(f"{path}: no data rows")


def _is_number(v: str) -> bool:
    try:
        float(v or "0")
        return True
    except ValueError:
        return False


def schema_columns(schema: TabularSchema) -> Sequence[str]:
    return (schema.label, *schema.categorical, *schema.dense)
