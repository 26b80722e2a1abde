"""xarray's ``engine="wordystore"``: a trajectory as a lazy ``xarray.Dataset``.

>>> ds = xr.open_dataset("runs/wb1b.zarr", engine="wordystore")
>>> e = ds.embeddings.sel(untrained=True, step=[0, 200])   # reads nothing yet
>>> e.values                                                 # decodes only the chunks it touches

What the dataset holds (docs/analysis.md, "xarray and dask"):

- one variable per kind, dims ``("step", *kind.dims)``, over the committed rows, with true values
  (predicted moments rebuilt) in the kind's dtype, except bfloat16: decoded to float32 (exact, and
  what xarray's reductions and plots take), as ``mask_and_scale`` hands decoded values, with the
  attribute ``stored_dtype: "bfloat16"``; ``decode_bf16=False`` keeps it as ``ml_dtypes.bfloat16``;
- coordinates ``step`` (the training step of each row) and ``token`` (0 .. vocabulary - 1), and
  per token set an indexed boolean coordinate along ``token`` named after the set, or
  ``token_set_<name>`` where that name is already a variable's or a dimension's:
  ``ds.sel(untrained=True)`` or ``ds.embeddings.isel(token=ds.untrained)`` selects the set;
- attributes that survive ``to_netcdf`` and ``to_zarr``: the config as a JSON string
  (``config``), its top-level numbers and strings and those of the trainer's parameters as
  ``config.<key>`` and ``config.run.<key>``, and the store's ``source``, ``profile``,
  ``format_version`` and ``created``.

Each variable is a :class:`KindArray`: xarray composes every ``isel``/``sel`` lazily and hands the
final selection to :meth:`wordystore.read.trajectory.KindView.numpy` as one orthogonal index (xarray's
``IndexingSupport.OUTER``), which reads only the chunks it touches. With ``chunks={}`` the
variables are dask arrays of the store's own chunking (:attr:`KindView.chunks`).

xarray imports this module whenever it lists its engines (for any file), so it imports no other
wordystore module until a dataset is opened. ``Trajectory.to_xarray()`` is
``xr.open_dataset(t, engine="wordystore")``.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import numpy as np
from xarray import Dataset, Variable
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

if TYPE_CHECKING:
    from wordystore.read.trajectory import KindView, Trajectory

# Parts of a config also given as flat attributes: the trainer's parameters (its RunConfig) and an
# imported notebook file's scalars.
FLAT_CONFIG = ("run", "seed_scalars")


class WordystoreBackend(BackendEntrypoint):
    """``xr.open_dataset(where, engine="wordystore", cache_bytes=None, decode_bf16=True)``: ``where`` is
    what :func:`wordystore.read.trajectory.open` takes (a path, a URL, a zarr store) or a ``Trajectory``;
    ``decode_bf16=False`` keeps bfloat16 kinds as ``ml_dtypes.bfloat16`` instead of float32."""

    description = "Training trajectories recorded by wordystore: lazy, each selection reads only the chunks it touches"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "cache_bytes", "decode_bf16")

    def open_dataset(
        self, filename_or_obj, *, drop_variables=None, cache_bytes: int | None = None, decode_bf16: bool = True
    ) -> Dataset:
        from wordystore.read import trajectory

        if isinstance(filename_or_obj, trajectory.Trajectory):  # t.to_xarray(): the caller keeps it open
            return dataset(filename_or_obj, drop_variables, decode_bf16)
        options = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
        t = trajectory.open(filename_or_obj, **options)
        ds = dataset(t, drop_variables, decode_bf16)
        ds.set_close(t.close)
        return ds

    def guess_can_open(self, filename_or_obj) -> bool:
        """A Trajectory only: paths need ``engine="wordystore"`` (telling a store apart would import
        wordystore, and torch, whenever xarray guesses an engine for any file)."""
        module = sys.modules.get("wordystore.read.trajectory")
        return module is not None and isinstance(filename_or_obj, module.Trajectory)


def dataset(t: Trajectory, drop_variables=None, decode_bf16: bool = True) -> Dataset:
    """The committed rows of ``t`` as a Dataset (see the module's docstring)."""
    from wordystore.format.keys import vocab_size

    dropped = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
    variables = {}
    for name in t.kinds:
        if name not in dropped:
            view, attrs = t[name], {}
            if decode_bf16 and view.kind.dtype == "bfloat16":
                view, attrs = view.float(), {"stored_dtype": "bfloat16"}
            variables[name] = Variable(
                view.dims,
                indexing.LazilyIndexedArray(KindArray(view)),
                attrs,
                encoding={"preferred_chunks": dict(zip(view.dims, view.chunks))},
            )
    coords = {"step": Variable("step", t.steps, {"long_name": "training step"})}
    sets = {}
    vocab = vocab_size(t.kinds)  # ValueError where kinds disagree: they cannot share one dimension
    if vocab is not None:
        coords["token"] = Variable("token", np.arange(vocab), {"long_name": "token id"})
        taken = {*t.kinds, *coords, *(dim for kind in t.kinds.values() for dim in kind.dims)}
        for name, ids in t.token_sets.items():
            mask = np.zeros(vocab, dtype=bool)
            mask[ids] = True
            sets[_token_set_coordinate(name, taken)] = Variable("token", mask, {"token_set": name})
    ds = Dataset(variables, {**coords, **sets}, attrs=_attributes(t))
    for name in sets:  # indexed: ds.sel(untrained=True), and never made a dask array by chunks=
        ds = ds.set_xindex(name)
    return ds


class KindArray(BackendArray):
    """One kind's committed rows for xarray: every selection is read by :meth:`KindView.numpy`
    as one orthogonal index."""

    def __init__(self, view: KindView):
        self.view, self.shape, self.dtype = view, view.shape, view.numpy_dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        # Slices bound to this array's shape: the view may hold more rows since (a refresh, or a
        # copy that reopened the store after pickling); rows once committed never change.
        key = tuple(slice(*k.indices(n)) if isinstance(k, slice) else k for k, n in zip(key, self.shape))
        return self.view.numpy(key, orthogonal=True)


def _token_set_coordinate(name: str, taken: set[str]) -> str:
    for candidate in (name, f"token_set_{name}"):
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise ValueError(
        f"token set {name!r} has no free coordinate name: both {name!r} and 'token_set_{name}' "
        f"are taken by variables, dimensions or other token sets"
    )


def _attributes(t: Trajectory) -> dict:
    """Attributes a netCDF or zarr file can hold (strings and numbers, bools as 0/1): the store's
    facts, the whole config as JSON, and as ``config.<path>`` the config's top-level numbers and
    strings and those of its flat parts (:data:`FLAT_CONFIG`)."""
    from wordystore.store.storage import describe

    meta = t.metadata
    attrs = {
        "source": describe(t.store),
        "profile": t.profile,
        "format_version": meta["format_version"],
        "created": meta["created"],
        "config": json.dumps(t.config),
    }
    parts = [("config", t.config)] + [
        (f"config.{key}", t.config[key]) for key in FLAT_CONFIG if isinstance(t.config.get(key), dict)
    ]
    for prefix, part in parts:
        for key, value in part.items():
            if isinstance(value, (bool, int, float, str)):
                attrs[f"{prefix}.{key}"] = int(value) if isinstance(value, bool) else value
    return attrs
