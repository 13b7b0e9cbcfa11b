"""Convert raw click logs to the app's Parquet format, in one streaming pass per input file.

    python -m torchrec_adaptive.apps.dlrm.data.convert criteo --out data/criteo_pq \\
        --train day_{0..22}.gz --test day_23.gz --vocab-size 40000000
    python -m torchrec_adaptive.apps.dlrm.data.convert avazu --out data/avazu_pq --train train.csv --test-fraction 0.1
    python -m torchrec_adaptive.apps.dlrm.data.convert tabular --schema configs/tabular/schema.yaml ...
    python -m torchrec_adaptive.apps.dlrm.data.convert synthetic --out data/syn --set train_rows=50000000

Writes ``<out>/train`` and ``<out>/test`` (``format.py``): one Parquet part per input file,
the training counts of every ID beside the train split. Inputs are read block by block
with pyarrow's multi-threaded CSV reader and hashed with vectorized numpy (``hashing.py``),
so memory stays at a few blocks whatever the file size.

Resumable per input file: a finished input leaves ``<out>/_state/<split>-<i>.json`` (and
its ID counts); run the same command again after an interruption and finished inputs
are skipped. ``--test-fraction`` holds out the last fraction of all training rows (click
logs are time-ordered), counted in a first pass over the inputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .format import COUNTS, ROW_GROUP_ROWS, Chunk, DataError, DatasetMeta, IdCounts, SplitWriter

KINDS = ("criteo_tsv", "avazu", "tabular")
_ALIASES = {"criteo": "criteo_tsv"}


def reader(kind: str, first_input: Path, vocab_size: int, schema: Optional[Path]
           ) -> tuple[DatasetMeta, Callable[[Path], Iterator[Chunk]]]:
    """The data set's fields and a function from an input file to its Chunks: the one reader per format."""
    kind = _ALIASES.get(kind, kind)
    if kind == "criteo_tsv":
        from .criteo import criteo_meta, criteo_tsv_chunks

        meta = criteo_meta(vocab_size)
        return meta, lambda p: criteo_tsv_chunks(p, meta)
    if kind == "avazu":
        from .avazu import avazu_chunks, avazu_meta

        meta = avazu_meta(first_input, vocab_size)
        return meta, lambda p: avazu_chunks(p, meta)
    if kind == "tabular":
        from .tabular import read_schema, tabular_chunks, tabular_meta

        if schema is None:
            raise DataError("tabular data needs a schema (a YAML file naming the label, categorical and dense columns)")
        sch = read_schema(schema)
        meta = tabular_meta(sch, vocab_size)
        return meta, lambda p: tabular_chunks(p, sch, meta)
    raise DataError(f"unknown input kind {kind!r}; known: {KINDS}")


def _limited(chunks: Iterator[Chunk], max_rows: Optional[int]) -> Iterator[Chunk]:
    seen = 0
    for c in chunks:
        if max_rows is not None and seen + len(c) >= max_rows:
            yield c.take(slice(0, max_rows - seen))
            return
        seen += len(c)
        yield c


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def convert_files(kind: str, inputs: Sequence[Path], out: Path, *, test_inputs: Sequence[Path] = (),
                  test_fraction: Optional[float] = None, vocab_size: int = 100_000, schema: Optional[Path] = None,
                  max_rows: Optional[int] = None, progress: bool = True,
                  row_group_rows: int = ROW_GROUP_ROWS) -> tuple[DatasetMeta, DatasetMeta]:
    """Converts ``inputs`` (train) and ``test_inputs`` (or the last ``test_fraction`` of the train rows)."""
    from tqdm import tqdm

    kind = _ALIASES.get(kind, kind)
    inputs, test_inputs, out = [Path(p) for p in inputs], [Path(p) for p in test_inputs], Path(out)
    if not inputs:
        raise DataError("no training input files given")
    if bool(test_inputs) == (test_fraction is not None):
        raise DataError("give either test input files or a test fraction")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    for p in [*inputs, *test_inputs]:
        if not p.exists():
            raise DataError(f"data file not found: {p}")
    meta, chunks_of = reader(kind, inputs[0], vocab_size, schema)
    state = out / "_state"
    options = {"kind": kind, "vocab_size": vocab_size, "schema": schema.read_text() if schema else None,
               "max_rows": max_rows, "test_fraction": test_fraction, "meta": [meta.field_names, meta.vocab_sizes],
               "train": [_identity(p) for p in inputs], "test": [_identity(p) for p in test_inputs],
               "row_group_rows": row_group_rows}
    state.mkdir(parents=True, exist_ok=True)
    opt_file = state / "options.json"
    if opt_file.exists() and json.loads(opt_file.read_text()) != json.loads(json.dumps(options)):
        raise DataError(f"{out} holds a conversion with other inputs or options ({opt_file}); "
                        f"convert into a new --out or delete it")
    opt_file.write_text(json.dumps(options, indent=1))

    cut = None
    if test_fraction is not None:
        total = sum(_rows(kind, p, chunks_of, max_rows) for p in inputs)
        cut = total - max(1, int(round(total * test_fraction)))
        if cut < 1:
            raise DataError(f"{total} rows are too few to hold out a test set")
    jobs = [("train", i, p) for i, p in enumerate(inputs)] + [("test", len(inputs) + j, p)
                                                              for j, p in enumerate(test_inputs)]
    done_rows = {"train": 0, "test": 0}
    counts = IdCounts(meta.vocab_sizes)
    offset = 0  # rows of the training inputs before this one (for the held-out cut)
    bar = tqdm(total=len(jobs), unit="file", desc=f"convert {kind}", disable=not progress)
    for split, i, path in jobs:
        marker = state / f"{split}-{i:05d}.json"
        if marker.exists():  # finished by an earlier run
            rec = json.loads(marker.read_text())
        else:
            rec = _convert_one(chunks_of(path), meta, out, split, i, offset, cut, max_rows, row_group_rows,
                               state, progress)
            rec["input"] = _identity(path)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            tmp.replace(marker)
        if split == "train":
            counts.merge(IdCounts.load(state / f"train-{i:05d}.counts.npz", meta.vocab_sizes))
            offset += rec["train"] + rec["test"]
        done_rows["train"] += rec["train"]
        done_rows["test"] += rec["test"]
        bar.update(1)
        bar.set_postfix(rows=sum(done_rows.values()))
    bar.close()
    if done_rows["test"] == 0 or done_rows["train"] == 0:
        raise DataError(f"{out}: no {'test' if done_rows['test'] == 0 else 'training'} rows")
    train_meta = SplitWriter(out / "train", meta, counts=False).finish(rows=done_rows["train"], counts=counts)
    test_meta = SplitWriter(out / "test", meta, counts=False).finish(rows=done_rows["test"])
    return train_meta, test_meta


def _rows(kind: str, path: Path, chunks_of: Callable[[Path], Iterator[Chunk]], max_rows: Optional[int]) -> int:
    """Data rows of a file, as its reader will see them (a first pass, only for --test-fraction)."""
    from .csvblocks import csv_blocks

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
    elif kind == "criteo_tsv":
        n = sum(b.num_rows for b in csv_blocks(path, column_names=[f"c{i}" for i in range(40)], delimiter="\t",
                                              include=["c0"]))
    else:
        from .csvblocks import header

        n = sum(b.num_rows for b in csv_blocks(path, include=[header(path, ",")[0]]))
    return n if max_rows is None else min(n, max_rows)


def _convert_one(chunks: Iterator[Chunk], meta: DatasetMeta, out: Path, split: str, i: int, offset: int,
                 cut: Optional[int], max_rows: Optional[int], row_group_rows: int, state: Path,
                 progress: bool) -> dict[str, int]:
    from tqdm import tqdm

    name = f"part-{i:05d}"
    writers = {s: SplitWriter(out / s, meta, counts=s == "train", row_group_rows=row_group_rows)
               for s in ("train", "test")}
    opened: set[str] = set()
    pos = offset
    with tqdm(unit="rows", desc=f"  {split} part {i}", disable=not progress, leave=False) as bar:
        for c in _limited(chunks, max_rows):
            pieces = [(split, c)]
            if split == "train" and cut is not None:
                k = min(max(cut - pos, 0), len(c))
                pieces = [("train", c.take(slice(0, k))), ("test", c.take(slice(k, None)))]
            for s, piece in pieces:
                if len(piece):
                    if s not in opened:
                        writers[s].open_part(name)
                        opened.add(s)
                    writers[s].write(piece)
            pos += len(c)
            bar.update(len(c))
    for s in opened:
        writers[s].close_part()
    counts = writers["train"].counts
    assert counts is not None
    counts.save(state / f"train-{i:05d}.counts.npz") if split == "train" else None
    return {"train": writers["train"].rows, "test": writers["test"].rows}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("criteo", "criteo_tsv", "avazu", "tabular", "synthetic"))
    ap.add_argument("--out", required=True, help="output directory (gets train/ and test/)")
    ap.add_argument("--train", nargs="+", default=[], help="training input files, in time order")
    ap.add_argument("--test", nargs="+", default=[], help="test input files")
    ap.add_argument("--test-fraction", type=float, help="instead of --test: hold out the last fraction of the rows")
    ap.add_argument("--vocab-size", type=int, default=1_000_000, help="IDs per field (hashed into it)")
    ap.add_argument("--schema", type=Path, help="tabular: the YAML schema")
    ap.add_argument("--max-rows", type=int, help="at most this many rows of each input file")
    ap.add_argument("--row-group-rows", type=int, default=ROW_GROUP_ROWS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="synthetic: a SyntheticConfig field, e.g. train_rows=10000000")
    args = ap.parse_args(argv)
    if args.kind == "synthetic":
        import dataclasses

        import yaml

        from .synthetic import SyntheticConfig, write_synthetic

        kw = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
        cfg = SyntheticConfig(**kw)
        write_synthetic(cfg, Path(args.out), progress=True)
        print(f"wrote {args.out}/train and {args.out}/test: {dataclasses.asdict(cfg)}")
        return
    try:
        train, test = convert_files(args.kind, args.train, Path(args.out), test_inputs=args.test,
                                    test_fraction=args.test_fraction, vocab_size=args.vocab_size, schema=args.schema,
                                    max_rows=args.max_rows, row_group_rows=args.row_group_rows)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}/train ({train.rows} rows, ID counts in {COUNTS}) and {args.out}/test ({test.rows} rows); "
          f"{len(train.field_names)} fields, {train.num_dense} dense features")


if __name__ == "__main__":
    main()
