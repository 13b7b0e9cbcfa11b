"""The converter's readers (Criteo TSV, Avazu CSV, generic CSV/Parquet) and TorchRec's npy days.

The real samples in ../shared/data must convert to exactly the IDs, labels and dense values the
in-memory readers gave before issue 11 (frozen in fixtures/readers_before_issue11.npz, written by
those readers with vocab 1000 before they were replaced).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from torchrec_adaptive.apps.dlrm.data.convert import convert_files, reader
from torchrec_adaptive.apps.dlrm.data.criteo_npy import NpySource, npy_paths
from torchrec_adaptive.apps.dlrm.data.format import Chunk, DataError, IdCounts
from torchrec_adaptive.apps.dlrm.data.stream import ParquetSource
from torchrec_adaptive.apps.dlrm.data.tabular import TabularSchema, read_schema

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CRITEO, AVAZU = SHARED / "criteo_kaggle_sample.tsv", SHARED / "avazu_sample.csv"
FROZEN = Path(__file__).with_name("fixtures") / "readers_before_issue11.npz"
AVAZU_CATS = ("C1", "banner_pos", "site_id", "app_id", "device_model", "C14")


def _need(path: Path) -> Path:
    assert path.exists(), f"{path} is missing: the real data samples live in ../shared/data beside the checkout"
    return path


def _rows(split: Path) -> Chunk:
    src = ParquetSource(split)
    return Chunk.concat([src.read(u, 0, n) for u, n in src.units])


def _read(kind: str, path: Path, vocab: int = 1000, schema: Path | None = None) -> Chunk:
    """A file's rows through the converter's reader (what a conversion writes)."""
    _, chunks = reader(kind, path, vocab, schema)
    return Chunk.concat(list(chunks(path)))


def _schema_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "schema.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("kind", ["criteo", "avazu", "tabular"])
def test_conversion_of_the_real_samples_reproduces_the_old_readers(tmp_path, kind):
    frozen = np.load(FROZEN)
    src = _need(CRITEO if kind == "criteo" else AVAZU)
    schema = _schema_file(tmp_path, f"label: click\ncategorical: {list(AVAZU_CATS)}\ndense: [hour]\n"
                                    "dense_transform: log1p\n") if kind == "tabular" else None
    train, test = convert_files(kind, [src], tmp_path / "out", test_fraction=0.1, vocab_size=1000, schema=schema,
                                progress=False)
    rows = Chunk.concat([_rows(tmp_path / "out" / "train"), _rows(tmp_path / "out" / "test")])
    n = len(frozen[f"{kind}_labels"])
    assert (train.rows, test.rows) == (n - round(n * 0.1), round(n * 0.1))  # the last 10% held out, as before
    np.testing.assert_array_equal(rows.sparse, frozen[f"{kind}_sparse"])
    np.testing.assert_array_equal(rows.labels, frozen[f"{kind}_labels"])
    np.testing.assert_array_equal(rows.dense, frozen[f"{kind}_dense"])
    # the training ID counts beside the data are the counts of the training rows only
    counts = IdCounts.load(tmp_path / "out" / "train" / "_counts.npz", train.vocab_sizes).counts
    tr = rows.sparse[: train.rows]
    for f in range(tr.shape[1]):
        np.testing.assert_array_equal(counts[f], np.bincount(tr[:, f], minlength=train.vocab_sizes[f]))


def test_criteo_gzip_large_ids_and_trailing_blank_lines(tmp_path):
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["ffffffff"] * 26) + "\n"
    gz = tmp_path / "day_0.gz"
    with gzip.open(gz, "wt") as f:
        f.write(line * 3 + "\n\n")  # a file ending in blank lines is a whole file, not a bad one
    vocab = 2**31 - 1  # IDs far above 2^24: no float32 staging may round them
    data = _read("criteo", gz, vocab)
    assert len(data) == 3 and int(data.sparse[0, 0]) == 1 + 0xFFFFFFFF % (vocab - 1)
    assert data.dense[0, 0] == pytest.approx(np.log1p(3.0))
    plain = tmp_path / "day_1.tsv"
    plain.write_text(CRITEO.read_text() + "\n")
    assert len(_read("criteo", plain)) == 1999


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("", "no rows"),
        ("x\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["a"] * 26) + "\n", r"row 1: column 1 \(label\)"),
        ("0\t" + "\t".join(["1"] * 12) + "\tq\t" + "\t".join(["a"] * 26) + "\n", r"row 1: column 14 \(I13\) is not an integer"),
        ("0\t1\t2\n", "Expected 40 columns, got 3"),
        ("0\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["a"] * 26) + "\n"
         + "0\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["zz"] * 26) + "\n", r"row 2: column 15 \(C1\) is not hex: 'zz'"),
    ],
)
def test_criteo_bad_data_names_file_row_column(tmp_path, content, pattern):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(DataError, match=pattern):
        _read("criteo", p)
    with pytest.raises(DataError, match="bad.tsv"):
        convert_files("criteo", [p], tmp_path / "out", test_inputs=[p], progress=False)
    assert not list((tmp_path / "out").glob("*/part-*.parquet"))  # nothing half-written is left as a part


def test_avazu_sample_fields():
    data = _read("avazu", _need(AVAZU), 500)
    meta, _ = reader("avazu", AVAZU, 500, None)
    assert len(data) == 100 and data.sparse.shape[1] == 21 + 2 and data.dense.shape == (100, 2)
    assert meta.field_names[0] == "C1" and meta.field_names[-2:] == ("hour_of_day", "weekday")
    assert int(data.sparse[0, -2]) == 1 + 0  # 14102100: midnight
    assert int(data.sparse[0, -1]) == 1 + 1  # 2014-10-21 was a Tuesday


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("", "empty file"),
        ("id,hour,C1\n1,14102100,5\n", r"missing column\(s\) \['click'\]"),
        ("id,click,hour,C1\n1,yes,14102100,5\n", "row 1: column 'click' must be 0 or 1"),
        ("id,click,hour,C1\n1,0,14102100,5\n1,0,notanhour,5\n", "row 2: column 'hour' must be YYMMDDHH"),
        ("id,click,hour,C1\n", "no data rows"),
    ],
)
def test_avazu_bad_data(tmp_path, content, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=pattern):
        _read("avazu", p)


def test_tabular_parquet_equals_csv(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(_need(AVAZU), newline="") as f:
        rows = list(csv.DictReader(f))
    table = pa.table({
        "click": pa.array([bool(int(r["click"])) for r in rows]),  # a boolean label column
        "hour": pa.array([float(r["hour"]) for r in rows]),  # a number column, read as dense
        # integer columns as Parquet ints, the rest as strings: both must hash like the CSV text
        **{c: pa.array([int(r[c]) for r in rows] if all(r[c].isdigit() for r in rows) else [r[c] for r in rows])
           for c in AVAZU_CATS},
    })
    pq.write_table(table, tmp_path / "clicks.parquet", row_group_size=30)
    schema = _schema_file(tmp_path, f"label: click\ncategorical: {list(AVAZU_CATS)}\ndense: [hour]\n"
                                    "dense_transform: log1p\n")
    from_parquet = _read("tabular", tmp_path / "clicks.parquet", 5000, schema)
    from_csv = _read("tabular", AVAZU, 5000, schema)
    np.testing.assert_array_equal(from_parquet.sparse, from_csv.sparse)
    np.testing.assert_array_equal(from_parquet.labels, from_csv.labels)
    np.testing.assert_allclose(from_parquet.dense, from_csv.dense)
    assert from_csv.dense[0, 0] == pytest.approx(np.log1p(float(rows[0]["hour"])), rel=1e-6)


def test_schema_file_and_its_errors(tmp_path):
    p = tmp_path / "schema.yaml"
    p.write_text("label: y\ncategorical: [a, b]\ndense: [x]\nvocab_size: 50\n")
    s = read_schema(p)
    assert (s.label, s.categorical, s.dense, s.vocab_size) == ("y", ("a", "b"), ("x",), 50)
    p.write_text("label: y\ncategoricals: [a]\n")
    with pytest.raises(DataError, match=r"schema.yaml: unknown schema key\(s\) \['categoricals'\]"):
        read_schema(p)
    p.write_text("label: y\ncategorical: [a, y]\n")
    with pytest.raises(DataError, match=r"column\(s\) \['y'\] named twice"):
        read_schema(p)
    shipped = read_schema(Path(__file__).resolve().parents[2] / "configs" / "tabular" / "schema.yaml")
    assert shipped.label == "click" and "site_id" in shipped.categorical


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("", "empty file"),
        ("y,a\n", "no data rows"),
        ("y,b\n1,2\n", r"t.csv: missing column\(s\) \['a'\]"),
        ("y,a,x\n1,u,2\nyes,v,3\n", r"t.csv: row 2: column 'y' \(label\) must be 0 or 1, got 'yes'"),
        ("y,a,x\n1,u,abc\n", r"t.csv: row 1: column 'x' \(dense\) is not a number: 'abc'"),
        ("y,a,x\n1,u,inf\n", r"t.csv: row 1: column 'x' \(dense\) is not finite: 'inf'"),
        ("y,a,x\n1,u\n", r"t.csv: .*Expected 3 columns"),
    ],
)
def test_tabular_bad_csv_names_file_row_column(tmp_path, content, pattern):
    p = tmp_path / "t.csv"
    p.write_text(content)
    schema = _schema_file(tmp_path, "label: y\ncategorical: [a]\n" + ("dense: [x]\n" if "x" in content else ""))
    with pytest.raises(DataError, match=pattern):
        _read("tabular", p, schema=schema)


# --- TorchRec's npy layout ----------------------------------------------------------------

def _torchrec_npy(tmp_path: Path, tsv: Path, name: str = "day_0") -> Path:
    from torchrec.datasets.criteo import BinaryCriteoUtils

    prefix = tmp_path / name
    dense, sparse, labels = npy_paths(prefix)
    BinaryCriteoUtils.tsv_to_npys(str(tsv), str(dense), str(sparse), str(labels))
    return prefix


def _npy_rows(src: NpySource) -> Chunk:
    return Chunk.concat([src.read(u, 0, n) for u, n in src.units])


def test_criteo_npy_from_torchrecs_converter_matches_the_tsv(tmp_path):
    prefix = _torchrec_npy(tmp_path, _need(CRITEO))
    npy = _npy_rows(NpySource(prefix, vocab_size=1000, chunk_rows=300))  # several units, read memory-mapped
    tsv = _read("criteo", CRITEO)
    assert len(npy) == len(tsv) == 1999
    np.testing.assert_array_equal(npy.sparse, tsv.sparse)  # same hashing of the same raw IDs
    np.testing.assert_array_equal(npy.labels, tsv.labels)
    np.testing.assert_array_equal(npy.dense, np.load(npy_paths(prefix)[0]))  # the file's own log transform
    # a directory of days, in day order (day_2 before day_10)
    (tmp_path / "days").mkdir()
    for d in ("day_10", "day_2"):
        for a, b in zip(npy_paths(prefix), npy_paths(tmp_path / "days" / d)):
            b.write_bytes(a.read_bytes())
    days = NpySource(tmp_path / "days", vocab_size=1000)
    assert [p.name for p, *_ in days.days] == ["day_2", "day_10"] and days.meta.rows == 2 * 1999


def test_criteo_npy_ids_above_2_24_stay_exact(tmp_path):
    prefix = tmp_path / "day_3"
    dense_p, sparse_p, labels_p = npy_paths(prefix)
    raw = np.array([[2**24 + 1 + i for i in range(26)], [0xFFFFFFFF] * 26], dtype=np.int64)
    np.save(dense_p, np.zeros((2, 13), np.float32))
    np.save(sparse_p, raw)
    np.save(labels_p, np.array([[1], [0]], np.int32))
    vocab = 2**31 - 1
    data = _npy_rows(NpySource(prefix, vocab_size=vocab))
    assert data.sparse[0].tolist() == [1 + (2**24 + 1 + i) % (vocab - 1) for i in range(26)]
    assert int(data.sparse[1, 0]) == 1 + 0xFFFFFFFF % (vocab - 1)
    with pytest.raises(DataError, match=r"day_3_sparse.npy: row 0, column C1: ID 16777217 outside \[0, 1000\)"):
        _npy_rows(NpySource(prefix, vocab_size=1000, ids="contiguous"))


def test_criteo_npy_bad_files(tmp_path):
    prefix = tmp_path / "day_1"
    dense_p, sparse_p, labels_p = npy_paths(prefix)
    np.save(dense_p, np.zeros((2, 13), np.float32))
    np.save(sparse_p, np.zeros((2, 26), np.int64))
    with pytest.raises(DataError, match="day_1_labels.npy: missing"):
        NpySource(prefix, 100)
    np.save(labels_p, np.array([[1], [2]], np.int32))
    with pytest.raises(DataError, match=r"day_1_labels.npy: row 1: label must be 0 or 1, got 2"):
        _npy_rows(NpySource(prefix, 100))
    np.save(sparse_p, np.zeros((2, 25), np.int64))
    with pytest.raises(DataError, match=r"day_1_sparse.npy: expected shape \[rows, 26\], got \[2, 25\]"):
        NpySource(prefix, 100)
