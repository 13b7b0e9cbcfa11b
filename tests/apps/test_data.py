"""The DLRM app's data readers, on real samples (../shared/data) and small bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from torchrec_adaptive.apps.dlrm.data import DataError, SyntheticConfig, make_synthetic, read_avazu, read_criteo_tsv

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CRITEO, AVAZU = SHARED / "criteo_kaggle_sample.tsv", SHARED / "avazu_sample.csv"


def _sample(path: Path) -> Path:
    assert path.exists(), f"{path} is missing: the real data samples live in ../shared/data beside the checkout"
    return path


def test_criteo_kaggle_sample():
    _sample(CRITEO)
    data = read_criteo_tsv(CRITEO, vocab_sizes=1000)
    assert len(data) == 1999 and data.dense.shape == (1999, 13) and data.sparse.shape == (1999, 26)
    first = CRITEO.read_text().splitlines()[0].split("\t")
    assert data.labels[0] == float(first[0])
    assert data.dense[0, 0] == pytest.approx(torch.log1p(torch.tensor(float(first[1]))))
    assert data.dense[0, 12] == 0.0 or first[13] != ""  # missing int -> 0
    assert data.sparse[0, 0] == 1 + int(first[14], 16) % 999
    assert (data.sparse[:, 21] == 0).any()  # C22 is often missing in this sample: reserved ID 0
    assert 0.1 < float(data.labels.mean()) < 0.5


def test_criteo_gzip_and_large_ids_stay_exact(tmp_path):
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["ffffffff"] * 26) + "\n"
    gz = tmp_path / "day_0.gz"
    with gzip.open(gz, "wt") as f:
        f.write(line * 3)
    vocab = 2**31 - 1  # IDs far above 2^24: no float32 staging may round them
    data = read_criteo_tsv(gz, vocab_sizes=vocab)
    assert len(data) == 3 and int(data.sparse[0, 0]) == 1 + 0xFFFFFFFF % (vocab - 1)


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("", "no rows"),
        ("x\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["a"] * 26) + "\n", r":1: column 1 \(label\)"),
        ("0\t" + "\t".join(["1"] * 12) + "\tq\t" + "\t".join(["a"] * 26) + "\n", r":1: column 14 \(I13\) is not an integer"),
        ("0\t1\t2\n", ":1: expected 40 tab-separated columns"),
        ("0\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["zz"] * 26) + "\n", r"column 15 \(C1\) is not hex"),
    ],
)
def test_criteo_bad_data_names_file_line_column(tmp_path, content, pattern):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_criteo_tsv(p)


def test_avazu_sample():
    _sample(AVAZU)
    data = read_avazu(AVAZU, vocab_size=500)
    assert len(data) == 100 and data.sparse.shape[1] == 21 + 2 and data.dense.shape == (100, 2)
    assert data.field_names[0] == "C1" and data.field_names[-2:] == ("hour_of_day", "weekday")
    assert int(data.sparse[0, -2]) == 1 + 0  # 14102100: midnight
    assert int(data.sparse[0, -1]) == 1 + 1  # 2014-10-21 was a Tuesday


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("", "empty file"),
        ("id,hour,C1\n1,14102100,5\n", r"missing column\(s\) \['click'\]"),
        ("id,click,hour,C1\n1,yes,14102100,5\n", ":2: column 'click' must be 0 or 1"),
        ("id,click,hour,C1\n1,0,notanhour,5\n", ":2: column 'hour' must be YYMMDDHH"),
        ("id,click,hour,C1\n", "no data rows"),
    ],
)
def test_avazu_bad_data(tmp_path, content, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_avazu(p)


def test_synthetic_is_deterministic_long_tailed_and_calibrated():
    cfg = SyntheticConfig(train_rows=20_000, test_rows=5_000, max_vocab=5_000)
    train, test = make_synthetic(cfg)
    again, _ = make_synthetic(cfg)
    assert torch.equal(train.sparse, again.sparse) and torch.equal(train.labels, again.labels)
    other, _ = make_synthetic(SyntheticConfig(train_rows=20_000, test_rows=5_000, max_vocab=5_000, seed=1))
    assert not torch.equal(train.sparse, other.sparse)
    assert cfg.vocab_sizes[0] == 100 and cfg.vocab_sizes[-1] == 5_000
    assert abs(float(torch.cat([train.labels, test.labels]).mean()) - 0.15) < 0.02
    big = train.sparse[:, -1]
    counts = torch.bincount(big, minlength=5_000).sort(descending=True).values
    assert counts[0] > 50 * counts[500].clamp(min=1)  # Zipf head vs tail
    assert float((counts == 0).float().mean()) > 0.2  # many IDs never seen in train


def test_batches_split_ranks_disjointly():
    train, _ = make_synthetic(SyntheticConfig(train_rows=1_000, test_rows=10, max_vocab=500))
    rows = [torch.cat([d[:, 0] for d, _, _ in train.batches(100, shuffle=True, rank=r, world_size=2)]) for r in range(2)]
    assert rows[0].numel() == rows[1].numel() == 500
    assert set(rows[0].tolist()).isdisjoint(rows[1].tolist())  # dense values are distinct floats
