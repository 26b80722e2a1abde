"""What a plain zarr or xarray reader sees in a store (no trap for them): never stored
residuals or raw bits under a kind's name. With ``import wordystore`` (which registers the
``bfloat16`` data type and the ``wordystore.bf16_bits`` codec with zarr-python) every kind's array
reads its true values; a predicted kind's residuals are only under ``<kind>.residuals``, saying what
they are. Without wordystore, a bfloat16 array fails loudly; the others read their true values."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import wordystore

KINDS = wordystore.seed_kinds(12, 2)
ROWS = 11


def reference() -> dict[str, np.ndarray]:
    """Random rows, the first all zeros as a trainer's initial row (zeros must not read as missing)."""
    rng = np.random.default_rng(0)
    data = {
        name: rng.standard_normal((ROWS, *kind.shape)).astype(np.float32).astype(kind.numpy_dtype)
        for name, kind in KINDS.items()
    }
    for name in ("grads", "momentum", "variance", "logits"):
        data[name][0] = 0
    return data


@pytest.fixture(scope="module", params=["compact", "portable"])
def store(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "t.zarr"
    data = reference()
    with wordystore.create(
        path,
        KINDS,
        profile=request.param,
        block_rows=2,
        chunk_rows=4,
        predictions=wordystore.adam_predictions(0.9, 0.999, 1.0) if request.param == "compact" else None,
    ) as w:
        for r in range(ROWS):
            w.append(r, **{name: values[r] for name, values in data.items()})
    return request.param, path, data


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def test_xarray_reads_every_kind_as_its_true_values_and_residuals_only_under_their_own_name(store):
    profile, path, data = store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's: numcodecs.pcodec is not in the spec; no consolidated metadata
        ds = xr.open_zarr(path, consolidated=False)
    predicted = {"momentum", "variance"} if profile == "compact" else set()
    assert set(ds.data_vars) == {*(set(KINDS) - predicted), *(f"{k}.residuals" for k in predicted), "recorded_steps"}
    for name in set(KINDS) - predicted:
        assert ds[name].dtype == KINDS[name].numpy_dtype and ds[name].dims == ("step", *KINDS[name].dims)
        assert np.array_equal(bits(ds[name].values), bits(data[name])), name
    for name in predicted:
        residuals = ds[f"{name}.residuals"]
        assert residuals.dtype == np.int16 and residuals.attrs["wordystore"]["residuals_of"] == name
        assert residuals.attrs["wordystore"]["prediction"]["name"] == "adam"
    np.testing.assert_array_equal(ds.recorded_steps.values, np.arange(ROWS))


def test_zarr_python_reads_every_kind_as_its_true_values(store):
    profile, path, data = store
    group = zarr.open_group(path, mode="r")
    for name in KINDS:
        if profile == "compact" and name in ("momentum", "variance"):
            assert name not in group  # its residuals are not under its name
            continue
        array = group[name]
        assert array.metadata.data_type.to_json(3) == KINDS[name].dtype
        assert np.array_equal(bits(array[:]), bits(data[name])), name


PLAIN = """
import json, sys, warnings
warnings.simplefilter("ignore")
import zarr, xarray as xr
path, names = sys.argv[1], json.loads(sys.argv[2])
seen = {}
for name in names:
    try:
        array = zarr.open_array(f"{path}/{name}", mode="r")
        seen[name] = [str(array.dtype), array[:].tobytes().hex()]
    except Exception as exc:
        seen[name] = ["error", str(exc)]
try:
    xr.open_zarr(path, consolidated=False)
    seen["xarray"] = "opened"
except Exception as exc:
    seen["xarray"] = str(exc)
seen["wordystore imported"] = "wordystore" in sys.modules
print(json.dumps(seen))
"""


def test_without_wordystore_a_plain_reader_fails_loudly_rather_than_read_bits(store):
    profile, path, data = store
    names = sorted(set(KINDS) - {"momentum", "variance"}) + (
        ["momentum.residuals", "variance.residuals"] if profile == "compact" else ["momentum", "variance"]
    )
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(path), json.dumps(names)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["wordystore imported"] is False
    for name in names:
        kind = KINDS.get(name)
        if kind is not None and kind.dtype == "bfloat16":
            assert seen[name] == ["error", "No Zarr data type found that matches 'bfloat16'"], (name, seen[name])
        elif kind is not None:  # float32 kinds: their true values
            assert seen[name] == [kind.dtype, data[name].tobytes().hex()], name
        else:  # a predicted kind's residuals, named so
            assert seen[name][0] == "int16", name
    assert seen["xarray"] == "No Zarr data type found that matches 'bfloat16'"


def test_compact_bfloat16_arrays_name_the_codec_that_hands_their_bits_to_pcodec(store):
    """A zarr reader that knows bfloat16 but not wordystore's codec fails on it, by name."""
    profile, path, _ = store
    doc = json.loads((path / "embeddings" / "zarr.json").read_text())
    inner = [c["name"] for c in doc["codecs"][0]["configuration"]["codecs"]]
    assert doc["data_type"] == "bfloat16" and inner == (
        ["transpose", "wordystore.bf16_bits", "numcodecs.pcodec", "crc32c"]
        if profile == "compact"
        else ["transpose", "bytes", "blosc", "crc32c"]
    )
