"""The streaming, rank-sharded input: shares, step counts, shuffling, evaluation coverage, prefetch,
the converter's resumability, and the chunked synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from torchrec_adaptive.apps.dlrm.data import SyntheticConfig, write_synthetic
from torchrec_adaptive.apps.dlrm.data.convert import convert_files
from torchrec_adaptive.apps.dlrm.data.format import Chunk, DatasetMeta, IdCounts, SplitWriter
from torchrec_adaptive.apps.dlrm.data.stream import ParquetSource, Prefetch, eval_chunks, train_chunks, train_steps
from torchrec_adaptive.apps.dlrm.data.synthetic import synthetic_chunks
from torchrec_adaptive.apps.dlrm.inputs import rarest_bucket

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _numbered(tmp_path: Path, n: int, row_group: int, parts: int = 2) -> ParquetSource:
    """n rows whose dense value 0 is the row's number, in ``parts`` files of ``row_group``-row groups."""
    meta = DatasetMeta(("a", "b"), (5, 1000), 2)
    w = SplitWriter(tmp_path / "split", meta, counts=True, row_group_rows=row_group)
    ids = np.arange(n)
    for p, rows in enumerate(np.array_split(ids, parts)):
        w.open_part(f"part-{p:05d}")
        w.write(Chunk(np.stack([rows, -rows], 1).astype(np.float32), np.stack([rows % 5, rows % 1000], 1),
                      (rows % 2).astype(np.float32)))
    w.finish()
    return ParquetSource(tmp_path / "split")


def _ids(chunks) -> list[int]:  # noqa: ANN001
    return [int(x) for c in chunks for x in c.dense[:, 0]]


@pytest.mark.parametrize("n,world,batch,shuffle_rows", [(1000, 2, 16, 64), (997, 3, 10, 1), (1000, 2, 7, 10_000)])
def test_train_shares_are_disjoint_equal_and_reshuffled_per_epoch(tmp_path, n, world, batch, shuffle_rows):
    src = _numbered(tmp_path, n, row_group=64)
    assert len(src.units) > 4  # several row groups in two files
    steps = train_steps(n, batch, world)
    epochs = {}
    for epoch in (1, 2):
        shares = []
        for rank in range(world):
            chunks = list(train_chunks(src, batch, epoch=epoch, seed=0, shuffle=True, rank=rank, world=world,
                                       steps=steps, shuffle_rows=shuffle_rows))
            assert len(chunks) == steps and all(len(c) == batch for c in chunks)  # equal step counts
            shares.append(_ids(chunks))
        every = sum(shares, [])
        assert len(set(every)) == len(every) == steps * batch * world  # no row twice
        assert n - len(every) < world * (batch + 1)  # only the tail is left out
        epochs[epoch] = shares
    again = _ids(train_chunks(src, batch, epoch=1, seed=0, shuffle=True, rank=0, world=world, steps=steps,
                              shuffle_rows=shuffle_rows))
    assert again == epochs[1][0]  # deterministic by (seed, epoch)
    assert epochs[2][0] != epochs[1][0]


def test_without_shuffle_rows_come_in_file_order(tmp_path):
    src = _numbered(tmp_path, 200, row_group=30)
    got = [_ids(train_chunks(src, 10, epoch=1, seed=0, shuffle=False, rank=r, world=2, steps=10, shuffle_rows=50))
           for r in range(2)]
    assert got == [list(range(100)), list(range(100, 200))]


def test_the_shuffle_buffer_mixes_across_row_groups(tmp_path):
    src = _numbered(tmp_path, 4096, row_group=64)
    first = _ids(list(train_chunks(src, 256, epoch=1, seed=0, shuffle=True, rank=0, world=1, steps=16,
                                      shuffle_rows=2048))[:1])
    groups = {i // 64 for i in first}
    assert len(groups) > 20  # one batch draws from most of the ~32 row groups in the buffer


@pytest.mark.parametrize("n,world,batch", [(37, 2, 5), (3, 2, 8), (1, 2, 4), (200, 3, 16)])
def test_eval_covers_every_row_once_with_equal_batch_counts(tmp_path, n, world, batch):
    src = _numbered(tmp_path, n, row_group=7, parts=1)
    counts, rows = set(), []
    for rank in range(world):
        out = list(eval_chunks(src, batch, rank=rank, world=world))
        counts.add(len(out))
        rows += [int(x) for c, valid in out for x in c.dense[:valid, 0]]
    assert len(counts) == 1 and sorted(rows) == list(range(n))


def test_prefetch_hands_over_items_and_errors():
    assert list(Prefetch(lambda: iter(range(10)), depth=2)) == list(range(10))

    def broken():  # noqa: ANN202
        yield 1
        raise ValueError("bad row 7")

    it = Prefetch(broken, depth=1)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad row 7"):
        next(it)
    endless = Prefetch(lambda: iter(int, 1), depth=2)  # a consumer may stop early
    next(endless)
    endless.close()


def test_rarest_bucket_is_the_bucket_of_the_rarest_id():
    counts = [np.array([5, 0, 2]), np.array([1, 100, 9, 10])]
    from torchrec_adaptive.apps.dlrm.data.format import id_buckets

    b = id_buckets(counts, [1, 10])  # [0,1) [1,10) [10,inf)
    assert [x.tolist() for x in b] == [[1, 0, 1], [1, 2, 1, 2]]
    sparse = np.array([[0, 1], [1, 1], [2, 2], [0, 3]])
    rarest = np.minimum(counts[0][sparse[:, 0]], counts[1][sparse[:, 1]])
    assert rarest.tolist() == [5, 0, 2, 5]
    assert rarest_bucket(b, sparse).tolist() == np.searchsorted([1, 10], rarest, side="right").tolist()


def test_converter_resumes_per_input_file(tmp_path, monkeypatch):
    day = (SHARED / "criteo_kaggle_sample.tsv").read_text().splitlines(keepends=True)
    files = []
    for i in range(3):
        p = tmp_path / f"day_{i}.tsv"
        p.write_text("".join(day[i * 600:(i + 1) * 600]))
        files.append(p)
    whole = convert_files("criteo", files, tmp_path / "whole", test_fraction=0.25, vocab_size=1000, progress=False)
    import torchrec_adaptive.apps.dlrm.data.convert as conv

    real, calls = conv._convert_one, []

    def dies_on_the_second(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(a[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "_convert_one", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        convert_files("criteo", files, tmp_path / "resumed", test_fraction=0.25, vocab_size=1000, progress=False)
    calls.clear()
    monkeypatch.setattr(conv, "_convert_one", lambda *a, **k: (calls.append(a[4]), real(*a, **k))[1])
    resumed = convert_files("criteo", files, tmp_path / "resumed", test_fraction=0.25, vocab_size=1000,
                            progress=False)
    assert calls == [1, 2]  # file 0 was done and is skipped
    assert resumed == whole and (whole[0].rows, whole[1].rows) == (1350, 450)
    for split in ("train", "test"):
        a, b = ParquetSource(tmp_path / "whole" / split), ParquetSource(tmp_path / "resumed" / split)
        ra = Chunk.concat([a.read(u, 0, n) for u, n in a.units])
        rb = Chunk.concat([b.read(u, 0, n) for u, n in b.units])
        np.testing.assert_array_equal(ra.sparse, rb.sparse)
    z1, z2 = (IdCounts.load(tmp_path / d / "train/_counts.npz", whole[0].vocab_sizes).counts for d in ("whole", "resumed"))
    assert all(np.array_equal(a, b) for a, b in zip(z1, z2)) and sum(z1[0]) == 1350
    from torchrec_adaptive.apps.dlrm.data.format import DataError

    with pytest.raises(DataError, match="other inputs or options"):  # a changed command does not mix outputs
        convert_files("criteo", files, tmp_path / "resumed", test_fraction=0.25, vocab_size=999, progress=False)
    assert json.loads((tmp_path / "resumed/_state/options.json").read_text())["vocab_size"] == 1000


def test_synthetic_is_deterministic_chunked_long_tailed_and_calibrated(tmp_path):
    cfg = SyntheticConfig(train_rows=70_000, test_rows=5_000, max_vocab=5_000)
    train_dir, test_dir = write_synthetic(cfg, tmp_path / "a")
    src = ParquetSource(train_dir)
    rows = Chunk.concat([src.read(u, 0, n) for u, n in src.units])
    again = Chunk.concat(list(synthetic_chunks(cfg, "train")))
    np.testing.assert_array_equal(rows.sparse, again.sparse)
    np.testing.assert_array_equal(rows.labels, again.labels)
    other = Chunk.concat(list(synthetic_chunks(SyntheticConfig(train_rows=70_000, test_rows=5_000, max_vocab=5_000,
                                                               seed=1), "train")))
    assert not np.array_equal(rows.sparse, other.sparse)
    assert ParquetSource(test_dir).meta.rows == 5_000 and cfg.vocab_sizes[-1] == 5_000
    assert abs(float(rows.labels.mean()) - 0.15) < 0.02
    counts = IdCounts.load(train_dir / "_counts.npz", cfg.vocab_sizes).counts[-1]
    np.testing.assert_array_equal(counts, np.bincount(rows.sparse[:, -1], minlength=5_000))
    top = np.sort(counts)[::-1]
    assert top[0] > 50 * max(top[500], 1)  # Zipf head vs tail
    assert float((counts == 0).mean()) > 0.2 or float((counts < 3).mean()) > 0.3  # a long tail of rare IDs


def test_npy_days_stream_and_count_their_ids_without_a_counts_file(tmp_path):
    from torchrec_adaptive.apps.dlrm.data.criteo_npy import NpySource, npy_paths
    from torchrec_adaptive.apps.dlrm.data.format import id_buckets
    from torchrec_adaptive.apps.dlrm.inputs import ClickSource

    g = np.random.default_rng(0)
    for day, n in (("day_0", 300), ("day_1", 200)):
        d, s, lab = npy_paths(tmp_path / day)
        np.save(d, g.standard_normal((n, 13)).astype(np.float32))
        np.save(s, g.integers(0, 2**40, (n, 26)))
        np.save(lab, g.integers(0, 2, (n, 1)).astype(np.int32))
    src = NpySource(tmp_path, vocab_size=50, chunk_rows=64)
    rows = Chunk.concat([src.read(u, 0, n) for u, n in src.units])
    assert len(rows) == 500 and rows.sparse.max() < 50
    got = ClickSource(src, src, None).id_buckets([1, 3])  # counted in a pass over the training rows
    want = id_buckets([np.bincount(rows.sparse[:, f], minlength=50) for f in range(26)], [1, 3])
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    shares = [[float(x) for c in train_chunks(src, 32, epoch=3, seed=1, shuffle=True, rank=r, world=2, steps=7,
                                              shuffle_rows=100) for x in c.dense[:, 0]] for r in range(2)]
    assert len(set(shares[0] + shares[1])) == 2 * 7 * 32 and set(shares[0]) <= {float(x) for x in rows.dense[:, 0]}
