"""Where each table lives in the kernel's one flat buffer.

Tables are laid out sorted by embedding dim (stable), so all tables of one dim form
one contiguous block that can be viewed as a single 2-D ``[rows, dim]`` matrix:
one ``embedding_bag`` call and one optimizer update per distinct dim instead of
one per table. The same layout is used for every per-row and per-element state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class TableSpec:
    """One embedding table (or one shard of a table) held by a kernel.

    ``lr_multiplier`` is the per-table kappa_t. The ``global_*`` and offset fields
    place a shard inside its whole table, so that things defined per global row
    (MEDA's re-initialization) come out the same under any sharding plan.
    """

    name: str
    num_rows: int
    dim: int
    lr_multiplier: float = 1.0
    global_name: str | None = None  # the whole table's name (default: name)
    row_offset: int = 0  # global row id of this shard's row 0
    col_offset: int = 0  # global column of this shard's column 0
    global_num_rows: int | None = None  # default: num_rows
    global_dim: int | None = None  # default: dim
    # U(lo, hi) of the table's initializer; default TorchRec's +-sqrt(1 / global rows)
    init_bounds: tuple[float, float] | None = None

    @property
    def table_name(self) -> str:
        return self.global_name or self.name

    @property
    def bounds(self) -> tuple[float, float]:
        if self.init_bounds is not None:
            return self.init_bounds
        b = (1.0 / (self.global_num_rows or self.num_rows)) ** 0.5
        return (-b, b)

    def __post_init__(self) -> None:
        if self.num_rows <= 0:
            raise ValueError(f"table {self.name!r}: num_rows must be > 0, got {self.num_rows}")
        if self.dim <= 0:
            raise ValueError(f"table {self.name!r}: dim must be > 0, got {self.dim}")
        if self.row_offset < 0 or self.col_offset < 0:
            raise ValueError(f"table {self.name!r}: shard offsets must be >= 0")
        if self.row_offset + self.num_rows > (self.global_num_rows or self.num_rows) or self.col_offset + self.dim > (
            self.global_dim or self.dim
        ):
            raise ValueError(f"table {self.name!r}: the shard does not fit in its global table")
        if not self.lr_multiplier > 0:
            raise ValueError(f"table {self.name!r}: lr_multiplier must be > 0, got {self.lr_multiplier}")


@dataclass(frozen=True)
class DimGroup:
    """The contiguous block of all tables with embedding dim ``dim``."""

    dim: int
    row_start: int  # first row of the block in the kernel's row space
    num_rows: int
    elem_start: int  # first element of the block in the flat weight buffer
    tables: tuple[int, ...]  # table indices, in layout order
    table_row_starts: tuple[int, ...]  # each table's first row, relative to row_start
    features: tuple[int, ...]  # feature indices (in input order) looked up in this block


@dataclass(frozen=True)
class TableLayout:
    tables: tuple[TableSpec, ...]
    feature_table_map: tuple[int, ...]
    row_start: tuple[int, ...]  # per table, in the kernel's row space
    elem_start: tuple[int, ...]  # per table, in the flat buffer
    groups: tuple[DimGroup, ...]
    total_rows: int
    total_elems: int

    @property
    def feature_group(self) -> tuple[int, ...]:
        """Index into ``groups`` of each feature."""
        where = {f: g for g, grp in enumerate(self.groups) for f in grp.features}
        return tuple(where[f] for f in range(len(self.feature_table_map)))

    def feature_name(self, f: int) -> str:
        return f"feature {f} (table {self.tables[self.feature_table_map[f]].name!r})"


def plan_layout(tables: Sequence[TableSpec], feature_table_map: Sequence[int] | None) -> TableLayout:
    tables = tuple(tables)
    if not tables:
        raise ValueError("a kernel needs at least one table")
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"table names must be unique, got {names}")
    ftm = tuple(range(len(tables))) if feature_table_map is None else tuple(int(t) for t in feature_table_map)
    if not ftm:
        raise ValueError("feature_table_map is empty: no feature to look up")
    bad = [t for t in ftm if not 0 <= t < len(tables)]
    if bad:
        raise ValueError(f"feature_table_map names tables {bad} but there are {len(tables)} tables")

    order = sorted(range(len(tables)), key=lambda t: tables[t].dim)
    row_start = [0] * len(tables)
    elem_start = [0] * len(tables)
    rows = elems = 0
    for t in order:
        row_start[t], elem_start[t] = rows, elems
        rows += tables[t].num_rows
        elems += tables[t].num_rows * tables[t].dim

    groups = []
    for dim in sorted({t.dim for t in tables}):
        members = tuple(t for t in order if tables[t].dim == dim)
        g_row = row_start[members[0]]
        groups.append(
            DimGroup(
                dim=dim,
                row_start=g_row,
                num_rows=sum(tables[t].num_rows for t in members),
                elem_start=elem_start[members[0]],
                tables=members,
                table_row_starts=tuple(row_start[t] - g_row for t in members),
                features=tuple(f for f, t in enumerate(ftm) if tables[t].dim == dim),
            )
        )
    return TableLayout(tables, ftm, tuple(row_start), tuple(elem_start), tuple(groups), rows, elems)
