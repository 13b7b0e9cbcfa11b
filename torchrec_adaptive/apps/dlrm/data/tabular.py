"""Any click log as CSV or Parquet, described by a small YAML schema.

Schema (YAML)::

    label: click                 # 0/1 column
    categorical: [site, app, device]
    dense: [price, age]          # optional; numbers, empty -> 0
    dense_transform: log1p       # none | log1p (log(1 + max(x, 0)), as DLRM does for Criteo)
    vocab_size: 100000           # optional, per schema (default: the data config's)

Categorical values are hashed as strings with CRC32 to 1 + crc % (vocab - 1) (0 is
"missing"), the same rule as the Avazu reader, so "12" and "12.0" are different IDs:
a column's string form is its identity. DLRM needs a dense input; without dense
columns a constant 0 feature is added. CSV goes through the ``csv`` module (so an
error can name its line); Parquet through pyarrow (errors name the row).
"""

from __future__ import annotations

import csv
import gzip
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from .dataset import ClickData, DataError


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


def _hash(value: str, vocab: int) -> int:
    return 1 + zlib.crc32(value.encode()) % (vocab - 1) if value != "" else 0


def _rows_csv(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:  # type: ignore[operator]
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file (no header)")
        yield "header", {c: c for c in reader.fieldnames}
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} columns")
            yield f"{path}:{reader.line_num}", row


def _rows_parquet(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    import pyarrow.parquet as pq  # only Parquet users need pyarrow at import time

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    yield "header", {c: c for c in table.column_names}
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    for i in range(table.num_rows):
        yield f"{path}: row {i}", {c: ("" if v[i] is None else _text(v[i])) for c, v in columns.items()}


def _text(v: Any) -> str:
    """A Parquet value's string form, matching how the same value reads from a CSV."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def read_tabular(path: str | Path, schema: TabularSchema, vocab_size: int = 100_000,
                 max_rows: int | None = None) -> ClickData:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    vocab = schema.vocab_size or vocab_size
    parquet = path.suffix == ".parquet"
    rows = _rows_parquet(path) if parquet else _rows_csv(path)
    _, header = next(rows)
    missing = [c for c in (schema.label, *schema.categorical, *schema.dense) if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (the schema {schema.source} names them; "
                        f"the file has {sorted(header)})")
    labels: list[float] = []
    dense: list[list[float]] = []
    sparse: list[list[int]] = []
    for where, row in rows:
        if max_rows is not None and len(labels) >= max_rows:
            break
        y = row[schema.label].strip()
        if y not in ("0", "1", "0.0", "1.0", "true", "false", "True", "False"):
            raise DataError(f"{where}: column {schema.label!r} (label) must be 0 or 1, got {row[schema.label]!r}")
        labels.append(1.0 if y in ("1", "1.0", "true", "True") else 0.0)
        d = []
        for c in schema.dense:
            v = row[c].strip()
            try:
                x = float(v) if v else 0.0
            except ValueError:
                raise DataError(f"{where}: column {c!r} (dense) is not a number: {row[c]!r}") from None
            if not math.isfinite(x):
                raise DataError(f"{where}: column {c!r} (dense) is not finite: {row[c]!r}")
            d.append(math.log1p(max(x, 0.0)) if schema.dense_transform == "log1p" else x)
        dense.append(d or [0.0])
        sparse.append([_hash(row[c], vocab) for c in schema.categorical])
    if not labels:
        raise DataError(f"{path}: no data rows")
    return ClickData(torch.tensor(dense, dtype=torch.float32), torch.tensor(sparse, dtype=torch.int64),
                     torch.tensor(labels), tuple(schema.categorical), (vocab,) * len(schema.categorical))


def schema_columns(schema: TabularSchema) -> Sequence[str]:
    return (schema.label, *schema.categorical, *schema.dense)
