"""Round trips through a real zarr store against an in-memory numpy reference."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wordystore
from wordystore import Kind, trajectory
from wordystore.format.kinds import numpy_to_torch

BF16 = np.dtype(ml_dtypes.bfloat16)


def random_bf16(rng, shape):
    """Random bit patterns: every bfloat16 value, NaN payloads, infinities and -0 included."""
    return rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(BF16)


def write(path, n_steps, vocab, dim, steps_per_chunk=3, rng=None, step_numbers=None):
    rng = rng or np.random.default_rng(0)
    kinds = {
        "embeddings": Kind((vocab, dim), "bfloat16", ("token", "dim")),
        "logits": Kind((vocab,), "bfloat16", ("token",)),
        "losses": Kind((), "float32", ()),
    }
    ref = {
        "embeddings": random_bf16(rng, (n_steps, vocab, dim)),
        "logits": random_bf16(rng, (n_steps, vocab)),
        "losses": rng.standard_normal(n_steps).astype(np.float32),
    }
    steps = step_numbers if step_numbers is not None else np.arange(n_steps) * 5
    sets = {"even": np.arange(0, vocab, 2), "odd": np.arange(1, vocab, 2)}
    with wordystore.create(
        path,
        kinds,
        token_sets=sets,
        config={"vocab": vocab},
        block_rows=steps_per_chunk,
        chunk_rows=2 * steps_per_chunk,
    ) as w:
        for i in range(n_steps):
            w.append(
                int(steps[i]),
                embeddings=numpy_to_torch(ref["embeddings"][i]),
                logits=ref["logits"][i],
                losses=float(ref["losses"][i]),
            )
    return ref, steps, sets


def same_bits(a, b):
    a = a.view(torch.int16) if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a
    b = numpy_to_torch(np.asarray(b))
    b = b.view(torch.int16) if b.dtype == torch.bfloat16 else b
    return a.shape == b.shape and torch.equal(a, b)


@st.composite
def axis_index(draw, length):
    choice = draw(st.sampled_from(["int", "slice", "array", "mask", "list"]))
    if choice == "int":
        return draw(st.integers(-length, length - 1))
    if choice == "slice":
        bound = st.one_of(st.none(), st.integers(-length - 2, length + 2))
        return slice(draw(bound), draw(bound), draw(st.one_of(st.none(), st.integers(-4, 4).filter(bool))))
    if choice == "mask":
        return np.array(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
    values = draw(st.lists(st.integers(-length, length - 1), max_size=6))
    return values if choice == "list" else np.array(values, dtype=np.int64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n_steps=st.integers(1, 9),
    vocab=st.integers(1, 20),
    dim=st.integers(1, 5),
    steps_per_chunk=st.integers(1, 4),
)
def test_random_index_expressions_match_numpy(tmp_path_factory, data, n_steps, vocab, dim, steps_per_chunk):
    path = tmp_path_factory.mktemp("h") / "t.zarr"
    ref, steps, _ = write(path, n_steps, vocab, dim, steps_per_chunk, np.random.default_rng(n_steps * vocab))
    t = trajectory.open(path)
    assert len(t) == n_steps and t.embeddings.shape == (n_steps, vocab, dim)
    for _ in range(6):
        n_axes = data.draw(st.integers(0, 3))
        index = tuple(data.draw(axis_index(length)) for length in (n_steps, vocab, dim)[:n_axes])
        try:
            expected = ref["embeddings"][index]
        except IndexError:  # e.g. integer arrays that do not broadcast: numpy's error, ours too
            with pytest.raises(IndexError):
                t.embeddings[index]
            continue
        got = t.embeddings[index]
        assert got.dtype == torch.bfloat16
        assert same_bits(got, expected), index
    np.testing.assert_array_equal(t.steps, steps)


def test_bfloat16_is_stored_bit_for_bit_and_read_as_bfloat16(tmp_path):
    ref, _, _ = write(tmp_path / "t.zarr", 7, 33, 4)
    t = trajectory.open(tmp_path / "t.zarr")
    assert same_bits(t.embeddings[:], ref["embeddings"]) and same_bits(t.logits[:], ref["logits"])
    assert t.embeddings[:].dtype == torch.bfloat16 and t.losses[:].dtype == torch.float32


def test_token_set_names_torch_masks_and_step_labels(tmp_path):
    ref, steps, sets = write(tmp_path / "t.zarr", 6, 10, 3)
    t = trajectory.open(tmp_path / "t.zarr")
    E = ref["embeddings"]
    assert same_bits(t.embeddings[:, "odd"], E[:, sets["odd"]])
    assert same_bits(t.embeddings[1:4, torch.tensor(sets["even"])], E[1:4][:, sets["even"]])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 7]] = True
    assert same_bits(t.embeddings[-1, mask], E[-1, [1, 7]])
    assert same_bits(t.embeddings.loc[10], E[2])  # steps are 0, 5, 10, ...
    assert same_bits(t.embeddings.loc[5:15, "even"], E[1:4][:, sets["even"]])  # inclusive, as .loc
    assert same_bits(t.embeddings.loc[[0, 25]], E[[0, 5]])
    with pytest.raises(KeyError, match="not recorded"):
        t.embeddings.loc[3]
    with pytest.raises(KeyError, match="no token set 'rare'"):
        t.embeddings[:, "rare"]
    with pytest.raises(IndexError, match="token' axis only"):
        t.embeddings[:, :, "odd"]
    with pytest.raises(IndexError, match="out of range for axis 'token'"):
        t.embeddings[:, 10]
    with pytest.raises(IndexError, match="boolean mask of shape"):
        t.embeddings[:, np.ones(3, dtype=bool)]


def test_metadata_repr_and_lazy_views(tmp_path):
    write(tmp_path / "t.zarr", 4, 8, 2)
    t = trajectory.open(tmp_path / "t.zarr")
    assert set(t.kinds) == {"embeddings", "logits", "losses"} and t.config == {"vocab": 8}
    text = repr(t)
    assert "embeddings" in text and "step=4, token=8, dim=2" in text and "even (4)" in text
    assert t.embeddings.dims == ("step", "token", "dim")
    with pytest.raises(wordystore.ReadOnlyError):
        t.embeddings[0] = torch.zeros(8, 2, dtype=torch.bfloat16)


def test_dask_and_xarray_views(tmp_path):
    ref, steps, _ = write(tmp_path / "t.zarr", 7, 9, 2)
    t = trajectory.open(tmp_path / "t.zarr")
    d = t.embeddings.to_dask()
    assert d.shape == (7, 9, 2)
    assert np.array_equal(d[2:5, 3].compute().view(np.uint16), ref["embeddings"][2:5, 3].view(np.uint16))
    ds = t.to_xarray()
    assert list(ds.embeddings.dims) == ["step", "token", "dim"]
    np.testing.assert_array_equal(ds.step.values, steps)
    np.testing.assert_array_equal(ds.losses.sel(step=10).values, ref["losses"][2])


def test_reader_sees_a_committed_prefix_and_refreshes(tmp_path):
    kinds = {"x": Kind((4,), "float32", ("token",))}
    w = wordystore.create(tmp_path / "t.zarr", kinds, block_rows=2, chunk_rows=4)
    for step in range(3):
        w.append(step, x=np.full(4, step, dtype=np.float32))
    w.flush()
    t = trajectory.open(tmp_path / "t.zarr")
    assert len(t) == 3
    for step in range(3, 7):
        w.append(step, x=np.full(4, step, dtype=np.float32))
    assert len(t) == 3 and t.x[:].shape == (3, 4)  # not refreshed: the same prefix
    w.close()
    t.refresh()
    assert len(t) == 7 and float(t.x[6, 0]) == 6.0


def test_resume_appends_after_the_last_committed_step(tmp_path):
    kinds = {"x": Kind((2,), "float32", ("token",))}
    with wordystore.create(tmp_path / "t.zarr", kinds, block_rows=4, chunk_rows=8) as w:
        for step in range(5):
            w.append(step, x=np.full(2, step, dtype=np.float32))
    with wordystore.resume(tmp_path / "t.zarr") as w:
        assert w.last_step == 4 and w.committed == 5
        for step in range(5, 12):
            w.append(step, x=np.full(2, step, dtype=np.float32))
    t = trajectory.open(tmp_path / "t.zarr")
    np.testing.assert_array_equal(t.x[:, 0].numpy(), np.arange(12))
    np.testing.assert_array_equal(t.steps, np.arange(12))


def test_writer_memory_does_not_grow_with_steps(tmp_path):
    """The ring buffer is allocated once: block_rows + 1 slots per kind (one block: no GPU here)."""
    kinds = {"m": Kind((256, 64), "bfloat16", ("token", "dim"))}
    w = wordystore.create(tmp_path / "t.zarr", kinds, block_rows=4, chunk_rows=8)
    buffers = [id(b) for b in w._ring.slots.values()]
    for step in range(40):
        w.append(step, m=torch.randn(256, 64).bfloat16())
    assert [id(b) for b in w._ring.slots.values()] == buffers and w._ring.slots["m"].shape[0] == 5
    w.close()
    assert len(trajectory.open(tmp_path / "t.zarr")) == 40
