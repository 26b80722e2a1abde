"""The format against independent readers: zarr-python decodes both profiles' arrays itself,
tensorstore the portable one, bit for bit; convert keeps every bit; the read plan covers a
selection exactly once."""

import json

import numpy as np
import pytest
import zarr
from compaction_wait import wait_for_compaction
from hypothesis import given, settings
from hypothesis import strategies as st
from test_store import random_bf16

import wordystore
from wordystore import Kind
from wordystore.format.codecs import Bytes, ChunkCodecs
from wordystore.format.layout import ArrayLayout
from wordystore.format.metadata import Metadata
from wordystore.read import reading
from wordystore.tools.convert import convert

KINDS = {
    "embeddings": Kind((300, 8), "bfloat16", ("token", "dim")),
    "logits": Kind((300,), "bfloat16", ("token",)),
    "losses": Kind((), "float32", ()),
}


def fill(path, rows, profile, rng, close=True, **rows_args):
    ref = {
        name: (
            random_bf16(rng, (rows, *k.shape))
            if k.dtype == "bfloat16"
            else rng.standard_normal((rows, *k.shape)).astype(np.float32)
        )
        for name, k in KINDS.items()
    }
    w = wordystore.create(path, KINDS, profile=profile, token_sets={"low": np.arange(50)}, **rows_args)
    for i in range(rows):
        w.append(3 * i, **{name: v[i] for name, v in ref.items()})
    if close:
        w.close()
    return w, ref


def bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("profile", ["compact", "portable"])
def test_zarr_python_reads_every_main_array_bit_for_bit(tmp_path, profile):
    _, ref = fill(tmp_path / "t.zarr", 45, profile, np.random.default_rng(1), block_rows=4, chunk_rows=8)
    for name, data in ref.items():
        array = zarr.open_array(tmp_path / "t.zarr" / name, mode="r")
        assert array.shape == data.shape
        assert np.array_equal(bits(array[:]), bits(data))
        assert array.metadata.data_type.to_json(3) == KINDS[name].dtype  # never bits under a kind's name
        inner = [c["name"] for c in array.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]]
        assert ("wordystore.bf16_bits" in inner) == (profile == "compact" and KINDS[name].dtype == "bfloat16")
    steps = zarr.open_array(tmp_path / "t.zarr" / "recorded_steps", mode="r")[:]
    np.testing.assert_array_equal(steps, np.arange(45) * 3)


def test_tensorstore_reads_the_portable_profile(tmp_path):
    ts = pytest.importorskip("tensorstore")
    _, ref = fill(tmp_path / "t.zarr", 40, "portable", np.random.default_rng(2), block_rows=4, chunk_rows=8)
    for name, data in ref.items():
        array = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "t.zarr" / name)}}
        ).result()
        assert np.array_equal(bits(array.read().result()), bits(data)), name


@pytest.mark.parametrize("source_profile, target_profile", [("compact", "portable"), ("portable", "compact")])
def test_convert_keeps_every_bit_and_all_metadata(tmp_path, source_profile, target_profile):
    _, ref = fill(tmp_path / "a.zarr", 37, source_profile, np.random.default_rng(3), block_rows=2, chunk_rows=8)
    t = convert(tmp_path / "a.zarr", tmp_path / "b.zarr", profile=target_profile, progress=False)
    assert t.profile == target_profile and len(t) == 37 and t.commit_record.compacted_rows == 37
    for name, data in ref.items():
        assert np.array_equal(bits(t[name].numpy()), bits(data)), name
    np.testing.assert_array_equal(t.token_set("low"), np.arange(50))
    np.testing.assert_array_equal(t.steps, np.arange(37) * 3)


def test_reads_span_the_hot_and_main_tiers_while_a_writer_runs(tmp_path):
    w, ref = fill(tmp_path / "t.zarr", 29, "compact", np.random.default_rng(4), close=False, block_rows=2, chunk_rows=4)
    w.flush()
    wait_for_compaction(w)
    t = wordystore.open(tmp_path / "t.zarr")
    record = t.commit_record
    assert record.committed_rows == 29 and 0 < record.compacted_rows < 29  # both tiers in use
    assert np.array_equal(bits(t.embeddings.numpy((slice(None), [0, 299, 7]))), bits(ref["embeddings"][:, [0, 299, 7]]))
    w.close()
    assert np.array_equal(bits(t.embeddings.numpy()), bits(ref["embeddings"]))  # hot copies gone: caught up


def test_a_format_3_store_with_the_earlier_lz4_hot_tier_reads_and_appends_as_it_is(tmp_path, monkeypatch):
    """Format-3 stores written before the raw hot tier have blosc lz4 hot arrays: they open, their hot
    rows read bit for bit, and a resumed writer appends in their layout, bound."""
    path, rng = tmp_path / "t.zarr", np.random.default_rng(5)
    earlier = Metadata.hot_layouts
    with monkeypatch.context() as m:  # what those writers wrote: the lz4 hot layout
        m.setattr(Metadata, "hot_layouts", lambda self, name, rows=0: earlier(self, name, rows)[::-1])
        _, ref = fill(path, 6, "compact", rng, block_rows=2, chunk_rows=4)
    hot = ArrayLayout.from_zarr_json("hot/embeddings", json.loads((path / "hot/embeddings/zarr.json").read_text()))
    assert type(hot.codecs.compressors[0]).__name__ == "Blosc"
    more = {
        name: (
            random_bf16(rng, (3, *k.shape))
            if k.dtype == "bfloat16"
            else rng.standard_normal((3, *k.shape)).astype(np.float32)
        )
        for name, k in KINDS.items()
    }
    with wordystore.resume(path, compaction_threads=0) as w:  # rows 6..8 stay hot until close
        for i in range(3):
            w.append(3 * (6 + i), **{name: v[i] for name, v in more.items()})
        w.flush()
        t = wordystore.open(path)
        assert (t.commit_record.compacted_rows, len(t)) == (6, 9)
        assert np.array_equal(bits(t.embeddings.numpy()), bits(np.concatenate([ref["embeddings"], more["embeddings"]])))
        assert json.loads((path / "hot/embeddings/zarr.json").read_text())["codecs"] == hot.to_zarr_json()["codecs"]
    assert wordystore.verify(path).ok and len(wordystore.open(path)) == 9


def test_a_hot_shard_is_bound_to_its_place(tmp_path):
    """A raw hot shard (one chunk) carries a binding record like every bound shard: a block's shard
    copied over another block's reads as an error, never as other rows."""
    path = tmp_path / "t.zarr"
    w, _ = fill(
        path, 4, "compact", np.random.default_rng(6), close=False, block_rows=2, chunk_rows=4, compaction_threads=0
    )
    try:
        w.flush()
        shard = (path / "hot/embeddings/c/1/0/0").read_bytes()
        assert shard[-(56 + 20) : -20].startswith(b"WYSTBIND")  # its record (one chunk: 56 bytes), then its index
        (path / "hot/embeddings/c/1/0/0").write_bytes((path / "hot/embeddings/c/0/0/0").read_bytes())
        with pytest.raises(
            wordystore.CorruptChunkError, match=r"'hot/embeddings/c/1/0/0'.*binding record names another"
        ):
            wordystore.open(path).embeddings.numpy(slice(2, 4))
    finally:
        w.abandon()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_read_plan_covers_the_selection_exactly_once(data):
    """Pure planning, no I/O: every selected position of every axis lands once in the output."""
    rows, vocab = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 50))
    chunk_rows, tok = data.draw(st.sampled_from([1, 2, 4, 8])), data.draw(st.integers(1, 9))
    compacted = data.draw(st.integers(0, rows))
    layout = ArrayLayout(
        "x",
        "int64",
        (rows, vocab),
        (chunk_rows, tok * 2),
        (chunk_rows, tok),
        ChunkCodecs(None, Bytes(), ()),
        ("step", "token"),
    )
    hot = ArrayLayout(
        "hot/x",
        "int64",
        (rows, vocab),
        (2, tok * 2),
        (2, tok),
        ChunkCodecs(None, Bytes(), ()),
        ("step", "token"),
    )
    start = data.draw(st.integers(0, rows - 1))
    sel_rows = slice(start, data.draw(st.integers(start + 1, rows)), data.draw(st.integers(1, 3)))
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, vocab - 1), min_size=1))), dtype=np.int64)
    reads = reading.plan_reads(
        [reading.Tier(layout, 0, compacted), reading.Tier(hot, compacted, rows)], (sel_rows, ids)
    )
    full = np.arange(rows * vocab).reshape(rows, vocab)
    out = np.full((len(range(*sel_rows.indices(rows))), len(ids)), -1)
    for r in reads:
        origin = [c * n for c, n in zip(r.coords, r.layout.chunk)]
        chunk = full[origin[0] : origin[0] + r.layout.chunk[0], origin[1] : origin[1] + r.layout.chunk[1]]
        chunk = np.pad(chunk, [(0, a - b) for a, b in zip(r.layout.chunk, chunk.shape)], constant_values=-2)
        assert (out[r.out] == -1).all()  # each output position written once
        out[r.out] = chunk[
            np.ix_(*[np.arange(n)[s] if isinstance(s, slice) else s for s, n in zip(r.local, r.layout.chunk)])
        ]
        rows_read = origin[0] + np.arange(r.layout.chunk[0])[r.local[0]]
        assert (rows_read < compacted).all() if r.layout is layout else (rows_read >= compacted).all()
    np.testing.assert_array_equal(out, full[sel_rows][:, ids])


def test_predicted_moments_round_trip_bit_for_bit(tmp_path):
    """Moments from torch's own bfloat16 Adam update (clipped), plus some bits flipped so that
    residuals are not all zero: stored as residuals, read back exactly, in any order, uncached."""
    import torch

    vocab, dim, rows = 300, 8, 45
    kinds = wordystore.seed_kinds(vocab, dim)
    gen = torch.Generator().manual_seed(0)
    m = torch.zeros(vocab, dim, dtype=torch.bfloat16)
    v = torch.zeros(vocab, dim, dtype=torch.bfloat16)
    ref = {name: [] for name in ("grads", "momentum", "variance", "grad_norm")}
    for r in range(rows):
        g = (torch.randn(vocab, dim, generator=gen) * 0.1).bfloat16()
        norm = g.float().pow(2).sum().sqrt()
        clipped = g * torch.clamp(1.0 / (norm.bfloat16() + 1e-6), max=1.0)
        m.lerp_(clipped, 0.1)
        v.mul_(0.999).addcmul_(clipped, clipped, value=0.001)
        if r % 7 == 3:  # an update the replay cannot predict
            m.view(torch.int16)[r % vocab] ^= 1
        for name, value in (("grads", g), ("momentum", m), ("variance", v), ("grad_norm", norm)):
            ref[name].append(value.clone())
    ref = {name: torch.stack(values) for name, values in ref.items()}
    w = wordystore.create(
        tmp_path / "t.zarr",
        kinds,
        predictions=wordystore.adam_predictions(0.9, 0.999, 1.0),
        chunk_rows=16,
        block_rows=4,
    )
    for r in range(rows):
        w.append(
            r,
            embeddings=ref["momentum"][r],
            grads=ref["grads"][r],
            momentum=ref["momentum"][r],
            variance=ref["variance"][r],
            logits=torch.zeros(vocab, dtype=torch.bfloat16),
            losses=0.0,
            learning_rate=0.0,
            grad_norm=ref["grad_norm"][r],
            grad_norm_clipped=0.0,
        )
    w.close()
    raw = zarr.open_array(tmp_path / "t.zarr" / "momentum.residuals", mode="r")  # named for what it holds
    assert raw.metadata.data_type.to_json(3) == "int16" and (raw[:] == 0).mean() > 0.5  # mostly predicted
    assert not (tmp_path / "t.zarr" / "momentum").exists()
    for order in (["momentum", "variance"], ["variance", "momentum"]):
        t = wordystore.open(tmp_path / "t.zarr", cache_bytes=0)
        for name in order:
            got = t[name][:, 17:260]
            assert torch.equal(got.view(torch.int16), ref[name][:, 17:260].view(torch.int16)), (order, name)
    portable = convert(tmp_path / "t.zarr", tmp_path / "p.zarr", profile="portable", progress=False)
    assert zarr.open_array(tmp_path / "p.zarr" / "momentum", mode="r").metadata.data_type.to_json(3) == "bfloat16"
    assert torch.equal(portable.variance[:].view(torch.int16), ref["variance"].view(torch.int16))


def test_a_failed_overwriting_build_keeps_the_old_store_and_leaves_no_debris(tmp_path):
    _, ref = fill(tmp_path / "old.zarr", 20, "compact", np.random.default_rng(5), block_rows=2, chunk_rows=4)
    fill(tmp_path / "bad.zarr", 20, "compact", np.random.default_rng(6), block_rows=2, chunk_rows=4)
    shard = tmp_path / "bad.zarr" / "embeddings" / "c" / "2" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-30])  # truncated: its index is gone
    with pytest.raises(wordystore.CorruptChunkError, match="shard index"):
        convert(tmp_path / "bad.zarr", tmp_path / "old.zarr", overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zarr", "old.zarr"]  # no partial store left
    assert np.array_equal(bits(wordystore.open(tmp_path / "old.zarr").embeddings.numpy()), bits(ref["embeddings"]))


def test_a_live_store_can_be_listed_and_measured_while_its_writer_compacts(tmp_path):
    """The trainer's progress bar and `info` size a store whose writer deletes hot shards and their
    emptied directories meanwhile (a walk that fails on a vanished directory once ended a run)."""
    import threading

    from wordystore.store import storage

    w = wordystore.create(tmp_path / "t.zarr", {"e": KINDS["embeddings"]}, block_rows=1, chunk_rows=2)
    store, errors, done = storage.as_store(tmp_path / "t.zarr", read_only=True), [], threading.Event()

    def watch():
        while not done.is_set():
            try:
                storage.size(store)
                storage.list_prefix(store, "hot/")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    rng = np.random.default_rng(7)
    for row in range(120):
        w.append(row, e=random_bf16(rng, (300, 8)))
    w.close()
    done.set()
    watcher.join()
    assert errors == [] and storage.list_prefix(store, "hot/e/c/") == []  # compacted: no hot chunks left
