"""xarray (``engine="wordystore"``), dask and pickling, on real stores against the arrays written.

The reference for values is the numpy arrays each store was written from; for the displacement,
numpy on those arrays and ``measures.embedding_stats``. Decoded chunks are counted at the chunk
cache, every lookup of which is one chunk a read needs; fetched shards at the store's API.
"""

import json
import pickle
import subprocess
import sys
import textwrap

import dask
import ml_dtypes
import numpy as np
import pytest
import torch
import xarray as xr
from zarr.storage import LocalStore, WrapperStore

import wordystore
from wordystore import Kind
from wordystore.analysis import measures
from wordystore.errors import MissingExtraError
from wordystore.format.kinds import numpy_to_torch
from wordystore.optional import install_hint
from wordystore.read import reading

BF16 = np.dtype(ml_dtypes.bfloat16)
MATRIX = ("embeddings", "grads", "momentum", "variance")
VOCAB, DIM, ROWS = 300, 8, 13
SETS = {
    "trained": np.arange(0, VOCAB, 3),
    "untrained": np.setdiff1d(np.arange(VOCAB), np.arange(0, VOCAB, 3)),
    "grads": np.array([5, 7]),
}  # a set named like a kind: its coordinate is token_set_grads
CONFIG = {
    "device": "cpu",
    "flag": True,
    "run": {"steps": 24, "learning_rate": 1e-3, "seed": 42, "note": None},
    "nested": {"a": [1, 2]},
}


def seed_like_store(path):
    """The seed's kinds with Adam's moments stored as residuals (compact profile), recorded every 2 steps."""
    gen = torch.Generator().manual_seed(0)
    m = torch.zeros(VOCAB, DIM, dtype=torch.bfloat16)
    v = torch.zeros(VOCAB, DIM, dtype=torch.bfloat16)
    e = (torch.randn(VOCAB, DIM, generator=gen) * 0.02).bfloat16()
    ref = {name: [] for name in (*MATRIX, "logits", "losses", "learning_rate", "grad_norm", "grad_norm_clipped")}
    with wordystore.create(
        path,
        wordystore.seed_kinds(VOCAB, DIM),
        token_sets=SETS,
        config=CONFIG,
        predictions=wordystore.adam_predictions(0.9, 0.999, 1.0),
        block_rows=2,
        chunk_rows=4,
    ) as w:
        for r in range(ROWS):
            g = (torch.randn(VOCAB, DIM, generator=gen) * 0.1).bfloat16()
            g[SETS["untrained"][r % 7 :: 5]] = 0  # some untrained tokens get no gradient at some steps
            norm = g.float().pow(2).sum().sqrt()
            clipped = g * torch.clamp(1.0 / (norm.bfloat16() + 1e-6), max=1.0)
            m.lerp_(clipped, 0.1)
            v.mul_(0.999).addcmul_(clipped, clipped, value=0.001)
            e = (e.float() - 1e-3 * m.float() / (v.float().sqrt() + 1e-8)).bfloat16()
            row = {
                "embeddings": e,
                "grads": g,
                "momentum": m,
                "variance": v,
                "logits": torch.randn(VOCAB, generator=gen).bfloat16(),
                "losses": torch.tensor(10.0 - r).bfloat16(),
                "learning_rate": torch.tensor(1e-3 * (1 - r / ROWS)),
                "grad_norm": norm,
                "grad_norm_clipped": torch.clamp(norm, max=1.0),
            }
            w.append(2 * r, **row)
            for name, value in row.items():
                ref[name].append(value.clone())
    ref = {name: torch.stack(values) for name, values in ref.items()}
    return {
        name: value.view(torch.uint16).numpy().view(BF16) if value.dtype == torch.bfloat16 else value.numpy()
        for name, value in ref.items()
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("xr") / "run.zarr"
    return path, seed_like_store(path)


def bits(a):
    """The bits of ``a``'s values as float32 where it is bfloat16 or float32: a bfloat16 value and the
    float32 the dataset decodes it to (exactly, signed zeros and NaN payloads too) have the same."""
    a = np.asarray(a)
    if a.dtype == BF16:
        a = a.astype(np.float32)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def as_bits(ds: xr.Dataset) -> xr.Dataset:
    """The dataset with its float variables as their bits: xarray's comparisons do not take bfloat16."""
    return ds.assign({name: (v.dims, bits(v.values)) for name, v in ds.data_vars.items()})


def displacement(e: np.ndarray) -> np.ndarray:
    """Per row, the largest distance of a token from its first-row embedding, in float32 (the notebook's)."""
    w = e.astype(np.float32)
    return np.sqrt(((w - w[0]) ** 2).sum(-1)).max(-1)


def test_open_dataset_has_every_kind_with_true_values_and_the_store_as_coordinates_and_attrs(store):
    path, ref = store
    t = wordystore.open(path)
    assert set(t.predictions) == {"momentum", "variance"}  # stored as residuals: the dataset rebuilds them
    ds = xr.open_dataset(path, engine="wordystore")
    raw = xr.open_dataset(path, engine="wordystore", decode_bf16=False)
    assert list(ds.data_vars) == list(t.kinds) == list(raw.data_vars)
    for name, kind in t.kinds.items():
        assert ds[name].dims == raw[name].dims == ("step", *kind.dims)
        assert raw[name].dtype == kind.numpy_dtype  # bfloat16 as ml_dtypes.bfloat16, not its bits
        assert np.asarray(raw[name].values).tobytes() == ref[name].tobytes(), name
        if kind.dtype == "bfloat16":  # decoded by default: float32, exactly the stored values
            assert ds[name].dtype == np.float32 and ds[name].attrs["stored_dtype"] == "bfloat16"
            np.testing.assert_array_equal(ds[name].values, ref[name].astype(np.float32), err_msg=name)
            assert ds[name].values.astype(BF16).tobytes() == ref[name].tobytes()
        else:
            assert ds[name].dtype == kind.numpy_dtype and "stored_dtype" not in ds[name].attrs
            np.testing.assert_array_equal(ds[name].values, ref[name], err_msg=name)
    assert float(ds.losses.mean()) == float(ref["losses"].astype(np.float64).mean())  # a reduction, as a user writes

    np.testing.assert_array_equal(ds.step.values, 2 * np.arange(ROWS))
    np.testing.assert_array_equal(ds.token.values, np.arange(VOCAB))
    for name, coordinate in (("trained", "trained"), ("untrained", "untrained"), ("grads", "token_set_grads")):
        np.testing.assert_array_equal(np.flatnonzero(ds[coordinate].values), SETS[name])
        assert ds[coordinate].attrs["token_set"] == name and coordinate in ds.indexes
    untrained = SETS["untrained"]
    np.testing.assert_array_equal(bits(ds.sel(untrained=True).embeddings), bits(ref["embeddings"][:, untrained]))
    np.testing.assert_array_equal(bits(ds.embeddings.isel(token=ds.untrained)), bits(ref["embeddings"][:, untrained]))
    np.testing.assert_array_equal(
        bits(ds.momentum.sel(step=[4, 20], token=[9, 2])), bits(ref["momentum"][[2, 10]][:, [9, 2]])
    )

    assert json.loads(ds.attrs["config"]) == CONFIG
    assert {k: v for k, v in ds.attrs.items() if k.startswith("config.")} == {
        "config.device": "cpu",
        "config.flag": 1,
        "config.run.steps": 24,
        "config.run.learning_rate": 1e-3,
        "config.run.seed": 42,
    }
    assert ds.attrs["profile"] == "compact" and ds.attrs["format_version"] == t.metadata["format_version"]
    xr.testing.assert_identical(as_bits(t.to_xarray()), as_bits(ds))  # one implementation
    assert list(xr.open_dataset(path, engine="wordystore", drop_variables=["grads", "logits"]).data_vars) == [
        name for name in t.kinds if name not in ("grads", "logits")
    ]


def test_the_untrained_displacement_from_xarray_and_dask_equals_the_analysis(store):
    path, ref = store
    expected = displacement(ref["embeddings"][:, SETS["untrained"]])
    stats = measures.embedding_stats(wordystore.open(path), "untrained").table["displacement_max"]
    np.testing.assert_allclose(stats, expected, rtol=1e-6)
    for chunks in (None, {}):  # lazy arrays, then dask arrays of the store's chunking
        w = xr.open_dataset(path, engine="wordystore", chunks=chunks).embeddings.sel(untrained=True).astype("float32")
        got = np.sqrt(((w - w.isel(step=0)) ** 2).sum("dim")).max("token")
        np.testing.assert_allclose(got.values, expected, rtol=1e-6)


class CountingStore(WrapperStore):
    """A store that records the key of every read, to see which shards a selection fetches."""

    def __init__(self, store):
        super().__init__(store)
        self.keys = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


@pytest.fixture
def decoded(monkeypatch):
    """The chunks every read needs (array path, chunk coordinates) that were not in the cache: decoded."""
    chunks = []
    get = reading.ChunkCache.get

    def counting_get(self, key):
        found = get(self, key)
        if found is None:
            chunks.append(key[:2])
        return found

    monkeypatch.setattr(reading.ChunkCache, "get", counting_get)
    return chunks


def test_a_selection_decodes_only_the_chunks_it_touches(tmp_path, decoded):
    """1,000 tokens x 512 dims, 8 rows: main chunks of 4 rows x 32 tokens, shards (and dask chunks) of
    4 rows x 512 tokens. Lazily, a selection decodes exactly the chunks holding what it selects; with
    dask, no chunk outside the dask chunks it touches (dask fuses slices into the read, not lists)."""
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 2**16, (8, 1000, 512), dtype=np.uint16).view(BF16)
    kinds = {"embeddings": Kind((1000, 512), "bfloat16", ("token", "dim"))}
    with wordystore.create(
        tmp_path / "big.zarr", kinds, token_sets={"few": np.array([3, 200, 900])}, block_rows=2, chunk_rows=4
    ) as w:
        for r in range(8):
            w.append(r * 10, embeddings=numpy_to_torch(ref[r]))
    store = CountingStore(LocalStore(tmp_path / "big.zarr", read_only=True))
    t = wordystore.open(store)
    assert t.layouts["embeddings"][0].chunk[:2] == (4, 32) and t.embeddings.chunks == (4, 512, 512)

    cases = [  # selection, its rows and tokens
        (lambda ds: ds.embeddings.isel(step=[1, 6], token=[3, 200]), [1, 6], [3, 200]),
        (lambda ds: ds.embeddings.sel(step=slice(40, 70), few=True), range(4, 8), [3, 200, 900]),
        (lambda ds: ds.embeddings.isel(step=0, token=slice(990, None), dim=slice(0, 8)), [0], range(990, 1000)),
    ]
    for select, rows, tokens in cases:
        touched = {(r // 4, t // 32, 0) for r in rows for t in tokens}
        in_dask_chunks = {
            (r // 4, c, 0) for r in rows for t in tokens for c in range(t // 512 * 16, min(t // 512 * 16 + 16, 32))
        }
        for chunks, most in ((None, touched), ({}, in_dask_chunks)):
            ds = xr.open_dataset(store, engine="wordystore", chunks=chunks, cache_bytes=0)
            in_memory = xr.Dataset({"embeddings": (("step", "token", "dim"), ref)}, coords=ds.coords)
            decoded.clear()
            store.keys.clear()
            got = select(ds).values
            np.testing.assert_array_equal(bits(got), bits(select(in_memory).values))
            chunks_decoded = [coords for path, coords in decoded]
            assert touched <= set(chunks_decoded) <= most and len(set(chunks_decoded)) == len(chunks_decoded), chunks
            shards = {(r // 4, t // 512) for r in rows for t in tokens}
            assert len({key for key in store.keys if "/c/" in key}) == len(shards)  # of the 4 shards


def test_trajectories_and_views_pickle_as_where_to_reopen_them(store, tmp_path, monkeypatch):
    path, ref = store
    monkeypatch.chdir(path.parent)
    t = wordystore.open(path.name)  # a relative path: pickled as an absolute one
    t.embeddings[:]  # fills the chunk cache, which must not travel
    payloads = {
        "trajectory": t,
        "view": t.momentum,
        "uncached": t.uncached().variance,
        "dask": t.embeddings.to_dask()[:, SETS["untrained"]],
        "xarray": t.to_xarray(chunks={}).momentum[:, 5:9],
        "store object": wordystore.open(LocalStore(path, read_only=True)).logits,
    }
    sizes = {name: len(pickle.dumps(value)) for name, value in payloads.items()}
    assert max(sizes.values()) < 12_000, sizes  # locations and options (and a dask graph), no data
    assert pickle.loads(pickle.dumps(t.uncached()))._cache_bytes == 0

    code = textwrap.dedent("""
        import pickle, sys
        payloads = pickle.load(sys.stdin.buffer)
        from zarr.core.dtype import data_type_registry
        assert "bfloat16" in data_type_registry.contents  # registered by unpickling alone
        t = payloads["trajectory"]
        store_object = payloads["store object"]
        out = {"rows": len(t), "steps": t.steps, "view": payloads["view"].numpy(),
               "uncached": payloads["uncached"].numpy(), "dask": payloads["dask"].compute(scheduler="sync"),
               "xarray": payloads["xarray"].values, "store object": store_object.numpy(),
               "store": type(store_object.trajectory.store).__name__}
        pickle.dump(out, sys.stdout.buffer)
    """)
    other = tmp_path / "elsewhere"
    other.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(payloads), capture_output=True, cwd=other)
    assert proc.returncode == 0, proc.stderr.decode()
    got = pickle.loads(proc.stdout)
    assert (
        got["rows"] == ROWS and got["store"] == "GuardedLocalStore"
    )  # a given LocalStore is guarded (docs/security.md)
    np.testing.assert_array_equal(got["steps"], t.steps)
    for name, expected in (
        ("view", ref["momentum"]),
        ("uncached", ref["variance"]),
        ("store object", ref["logits"]),
        ("dask", ref["embeddings"][:, SETS["untrained"]]),
        ("xarray", ref["momentum"][:, 5:9]),
    ):
        np.testing.assert_array_equal(bits(got[name]), bits(expected), err_msg=name)


def test_dask_tokens_name_the_same_rows_of_the_same_store(tmp_path):
    kinds = {"x": Kind((3,), "float32", ("token",))}
    with wordystore.create(tmp_path / "t.zarr", kinds, block_rows=1, chunk_rows=2) as w:
        w.append(0, x=np.zeros(3, np.float32))
    first = wordystore.open(tmp_path / "t.zarr")
    assert dask.base.tokenize(first) == dask.base.tokenize(wordystore.open(tmp_path / "t.zarr"))
    assert first.x.to_dask().name == wordystore.open(tmp_path / "t.zarr").x.to_dask().name
    with wordystore.resume(tmp_path / "t.zarr") as w:
        w.append(1, x=np.ones(3, np.float32))
    assert dask.base.tokenize(first) != dask.base.tokenize(wordystore.open(tmp_path / "t.zarr"))


def test_dask_processes_and_a_local_cluster_compute_what_one_process_does(store):
    distributed = pytest.importorskip("distributed")
    path, ref = store
    t = wordystore.open(path)
    e = t.embeddings.to_dask()[:, t.token_set("untrained")].astype(np.float32)
    disp = np.sqrt(((e - e[0]) ** 2).sum(-1)).max(-1)
    w = t.to_xarray(chunks={}).embeddings.sel(untrained=True).astype("float32")
    disp_xr = np.sqrt(((w - w.isel(step=0)) ** 2).sum("dim")).max("token")
    in_process = disp.compute(scheduler="sync")
    np.testing.assert_allclose(in_process, displacement(ref["embeddings"][:, SETS["untrained"]]), rtol=1e-6)

    by_processes, by_processes_xr = dask.compute(disp, disp_xr, scheduler="processes", num_workers=2)
    np.testing.assert_array_equal(by_processes, in_process)
    np.testing.assert_array_equal(by_processes_xr.values, in_process)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        on_cluster, on_cluster_xr = client.compute([disp, disp_xr], sync=True)
        workers = client.run(lambda: __import__("os").getpid())
    assert len(set(workers.values())) == 2
    np.testing.assert_array_equal(on_cluster, in_process)
    np.testing.assert_array_equal(on_cluster_xr.values, in_process)


def test_attributes_and_token_sets_survive_netcdf_and_zarr(store, tmp_path):
    path, ref = store
    ds = xr.open_dataset(path, engine="wordystore")  # bfloat16 decoded to float32, which netCDF holds
    ds.to_netcdf(tmp_path / "copy.nc", engine="h5netcdf")
    raw = xr.open_dataset(path, engine="wordystore", decode_bf16=False)
    raw.to_zarr(tmp_path / "copy.zarr", consolidated=False)  # bfloat16 as zarr's "bfloat16" (wordystore registers it)
    for back in (
        xr.open_zarr(tmp_path / "copy.zarr", consolidated=False),
        xr.open_dataset(tmp_path / "copy.nc", engine="h5netcdf"),
    ):
        assert back.attrs == ds.attrs
        back = back.set_xindex("untrained")  # indexes are not stored: set it again
        np.testing.assert_array_equal(
            back.sel(untrained=True).embeddings.values.astype(np.float32),
            ref["embeddings"][:, SETS["untrained"]].astype(np.float32),
        )
        assert back.token_set_grads.attrs["token_set"] == "grads"


@pytest.mark.parametrize(
    "blocked, call, extra", [("xarray", "t.to_xarray()", "xarray"), ("dask", "t.embeddings.to_dask()", "dask")]
)
def test_without_xarray_or_dask_one_line_names_the_extra(store, blocked, call, extra):
    path, _ = store
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{blocked!r}] = None
        import wordystore
        t = wordystore.open(sys.argv[1])
        try:
            {call}
        except wordystore.errors.MissingExtraError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        f"{call.removeprefix('t.').removeprefix('embeddings.')} needs {extra}, which is not installed; "
        f"{install_hint('analysis')}"
    ]
    assert issubclass(MissingExtraError, ImportError)
