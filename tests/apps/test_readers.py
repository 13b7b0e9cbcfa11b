"""Criteo npy (TorchRec's layout, made by TorchRec's own converter) and generic CSV/Parquet readers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_adaptive.apps.dlrm.data import DataError, read_avazu, read_criteo_tsv
from torchrec_adaptive.apps.dlrm.data.criteo_npy import npy_paths, read_criteo_npy
from torchrec_adaptive.apps.dlrm.data.tabular import TabularSchema, read_schema, read_tabular

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CRITEO, AVAZU = SHARED / "criteo_kaggle_sample.tsv", SHARED / "avazu_sample.csv"


def _need(path: Path) -> Path:
    assert path.exists(), f"{path} is missing: the real data samples live in ../shared/data beside the checkout"
    return path


def _torchrec_npy(tmp_path: Path, tsv: Path) -> Path:
    from torchrec.datasets.criteo import BinaryCriteoUtils

    prefix = tmp_path / "day_0"
    dense, sparse, labels = npy_paths(prefix)
    BinaryCriteoUtils.tsv_to_npys(str(tsv), str(dense), str(sparse), str(labels))
    return prefix


def test_criteo_npy_from_torchrecs_converter_matches_the_tsv(tmp_path):
    prefix = _torchrec_npy(tmp_path, _need(CRITEO))
    npy = read_criteo_npy(prefix, vocab_size=1000)
    tsv = read_criteo_tsv(CRITEO, vocab_sizes=1000)
    assert len(npy) == len(tsv) == 1999
    assert torch.equal(npy.sparse, tsv.sparse)  # same hashing of the same raw IDs
    assert torch.equal(npy.labels, tsv.labels)
    # dense: the file's own (TorchRec's log transform) values, unchanged
    assert torch.equal(npy.dense, torch.from_numpy(np.load(npy_paths(prefix)[0])))
    assert torch.equal(read_criteo_npy(str(prefix) + "_sparse.npy", vocab_size=1000, max_rows=10).sparse, tsv.sparse[:10])


def test_criteo_npy_ids_above_2_24_stay_exact(tmp_path):
    prefix = tmp_path / "day_3"
    dense_p, sparse_p, labels_p = npy_paths(prefix)
    raw = np.array([[2**24 + 1 + i for i in range(26)], [0xFFFFFFFF] * 26], dtype=np.int64)
    np.save(dense_p, np.zeros((2, 13), np.float32))
    np.save(sparse_p, raw)
    np.save(labels_p, np.array([[1], [0]], np.int32))
    vocab = 2**31 - 1
    data = read_criteo_npy(prefix, vocab_size=vocab)
    assert data.sparse[0].tolist() == [1 + (2**24 + 1 + i) % (vocab - 1) for i in range(26)]
    assert int(data.sparse[1, 0]) == 1 + 0xFFFFFFFF % (vocab - 1)
    np.save(sparse_p, raw)
    with pytest.raises(DataError, match=r"day_3_sparse.npy: row 0, column C1: ID 16777217 outside \[0, 1000\)"):
        read_criteo_npy(prefix, vocab_size=1000, ids="contiguous")


def test_criteo_npy_bad_files(tmp_path):
    prefix = tmp_path / "day_1"
    dense_p, sparse_p, labels_p = npy_paths(prefix)
    np.save(dense_p, np.zeros((2, 13), np.float32))
    np.save(sparse_p, np.zeros((2, 26), np.int64))
    with pytest.raises(DataError, match="day_1_labels.npy: missing"):
        read_criteo_npy(prefix)
    np.save(labels_p, np.array([[1], [2]], np.int32))
    with pytest.raises(DataError, match=r"day_1_labels.npy: row 1: label must be 0 or 1, got 2"):
        read_criteo_npy(prefix)
    np.save(sparse_p, np.zeros((2, 25), np.int64))
    with pytest.raises(DataError, match=r"day_1_sparse.npy: expected shape \[rows, 26\], got \[2, 25\]"):
        read_criteo_npy(prefix)


AVAZU_CATS = ("C1", "banner_pos", "site_id", "app_id", "device_model", "C14")


def _schema(**kw) -> TabularSchema:
    return TabularSchema(**{"label": "click", "categorical": AVAZU_CATS, **kw})


def test_tabular_csv_on_the_avazu_sample_hashes_like_the_avazu_reader():
    _need(AVAZU)
    tab = read_tabular(AVAZU, _schema(), vocab_size=5000)
    ava = read_avazu(AVAZU, vocab_size=5000)
    cols = [ava.field_names.index(c) for c in AVAZU_CATS]
    assert len(tab) == 100 and torch.equal(tab.sparse, ava.sparse[:, cols])
    assert torch.equal(tab.labels, ava.labels)
    assert tab.dense.shape == (100, 1) and not tab.dense.any()  # no dense columns: one constant feature


def test_tabular_parquet_equals_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _need(AVAZU)
    with open(AVAZU, newline="") as f:
        rows = list(csv.DictReader(f))
    table = pa.table({
        "click": pa.array([int(r["click"]) for r in rows], pa.int8()),
        "hour": pa.array([float(r["hour"]) for r in rows]),  # a number column, read as dense
        # integer columns as Parquet ints, the rest as strings: both must hash like the CSV text
        **{c: pa.array([int(r[c]) for r in rows] if all(r[c].isdigit() for r in rows) else [r[c] for r in rows])
           for c in AVAZU_CATS},
    })
    pq.write_table(table, tmp_path / "clicks.parquet")
    schema = _schema(dense=("hour",), dense_transform="log1p")
    from_parquet = read_tabular(tmp_path / "clicks.parquet", schema, vocab_size=5000)
    from_csv = read_tabular(AVAZU, schema, vocab_size=5000)
    assert torch.equal(from_parquet.sparse, from_csv.sparse) and torch.equal(from_parquet.labels, from_csv.labels)
    assert torch.allclose(from_parquet.dense, from_csv.dense)
    assert float(from_csv.dense[0, 0]) == pytest.approx(np.log1p(float(rows[0]["hour"])), rel=1e-6)


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
        ("y,a,x\n1,u,2\nyes,v,3\n", r"t.csv:3: column 'y' \(label\) must be 0 or 1, got 'yes'"),
        ("y,a,x\n1,u,abc\n", r"t.csv:2: column 'x' \(dense\) is not a number: 'abc'"),
        ("y,a,x\n1,u\n", r"t.csv:2: expected 3 columns"),
    ],
)
def test_tabular_bad_csv_names_file_line_column(tmp_path, content, pattern):
    p = tmp_path / "t.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_tabular(p, TabularSchema(label="y", categorical=("a",), dense=("x",) if "x" in content else ()))
