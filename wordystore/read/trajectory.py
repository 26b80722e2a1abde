"""Reading a trajectory: lazy, labelled views over its arrays.

>>> from wordystore import trajectory
>>> t = trajectory.open("runs/wb1b.zarr")
>>> t.embeddings[0:200, "untrained"]          # torch.bfloat16 [200, 45087, 64]
>>> t.embeddings.loc[100:200, 42]             # by training step number, inclusive

Nothing is read until a view is sliced. A reader sees the committed prefix of the trajectory as of
``open`` or its last ``refresh()``, even while a writer appends.

Trajectories and views pickle as where to reopen them: the store's location (a local path made
absolute, a URL as given, with the ``storage_options`` that name no secret) and the open options,
never their data, cache or threads, nor any credentials (a worker finds its own in its environment);
a zarr ``Store`` object given to ``open`` pickles as that store does (its options with it).
Unpickling reopens the store, as ``open`` does (and so imports this module, which registers zarr's
bfloat16 data type), so dask can send them to other processes.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import torch
from zarr.abc.store import Store

from wordystore.errors import MissingExtraError, ReadOnlyError
from wordystore.format.kinds import DTYPES, Kind, numpy_to_torch
from wordystore.format.layout import ArrayLayout
from wordystore.format.prediction import AdamPrediction
from wordystore.format.records import CommitRecord
from wordystore.optional import install_hint
from wordystore.read import indexing, reading
from wordystore.store.storage import as_store, describe


def open(
    where,
    *,
    cache_bytes: int = reading.DEFAULT_CACHE_BYTES,  # noqa: A001 - as zarr.open
    storage_options: dict | None = None,
) -> Trajectory:
    """Open the trajectory at ``where`` for reading.

    Parameters
    ----------
    where : str, os.PathLike or zarr store
        A directory path, an ``s3://``, ``gs://``, ``az://`` or ``file://`` URL, or a zarr store.
    cache_bytes : int, optional
        Bound on the cache of decoded chunks (default 2 GiB, or ``WORDYSTORE_CACHE_BYTES``); 0
        caches nothing.
    storage_options : dict, optional
        A URL's endpoint, region and credentials (default: from the environment;
        :func:`wordystore.store.objectstore.open_url`).

    Returns
    -------
    Trajectory
        The committed rows as of now (:meth:`Trajectory.refresh` sees rows a writer commits later).

    Examples
    --------
    A small run, recorded by ``wordystore train runs/quick.zarr --steps 4 --vocab-size 8192 --hidden-dim 16``:

    >>> from wordystore import trajectory
    >>> t = trajectory.open("runs/quick.zarr")
    >>> t.steps
    array([0, 1, 2, 3, 4])
    >>> t.embeddings[0:5, "untrained"].shape
    torch.Size([5, 4083, 16])
    """
    return Trajectory(
        as_store(where, read_only=True, storage_options=storage_options) if storage_options else where, cache_bytes
    )


class Trajectory:
    """One recorded run: kinds as attributes (``t.embeddings``), token sets, steps and config.

    A face over a :class:`wordystore.read.reading.StoreReader`, which does every read. Tools that work
    on the store itself use the public surface: :attr:`store`, :attr:`layouts`,
    :attr:`commit_record`, :attr:`metadata`, :attr:`predictions` and :meth:`read_into`.

    Parameters
    ----------
    where : str, os.PathLike or zarr store
        Where the trajectory is, as :func:`open` takes it (which is the usual way to make one).
    cache_bytes : int, optional
        Bound on the cache of decoded chunks.

    Attributes
    ----------
    steps : numpy.ndarray
        The training step of each committed row (int64).
    kinds : dict of str to Kind
        Every recorded kind; each is also an attribute and an item (``t.embeddings``,
        ``t["embeddings"]``), a :class:`KindView`.
    token_sets : dict of str to numpy.ndarray
        Named token ids (``trained``, ``untrained``), usable as an index on the token axis.
    config : dict
        The run's config as the writer stored it.

    Examples
    --------
    >>> import wordystore
    >>> t = wordystore.open("runs/quick.zarr")
    >>> len(t), list(t.kinds)[:3]
    (5, ['embeddings', 'grads', 'momentum'])
    >>> t.token_set("untrained")[:3]
    array([ 3, 48, 94])
    >>> t.embeddings.loc[4].shape  # by training step, as xarray's .loc
    torch.Size([8192, 16])
    """

    def __init__(self, where, cache_bytes: int = reading.DEFAULT_CACHE_BYTES):
        self._where, self._cache_bytes = _location(where), cache_bytes
        self._reader = reading.StoreReader.open(as_store(self._where, read_only=True), cache_bytes)
        self._steps = self._reader.read_steps()
        self._views = {name: KindView(self, name, kind) for name, kind in self._reader.meta.kinds.items()}
        self._token_sets: dict[str, np.ndarray] = {}

    def refresh(self) -> Trajectory:
        """Re-read the commit record, to see steps a writer committed since."""
        self._reader.refresh()
        self._steps = self._reader.read_steps()
        return self

    def read_into(self, name: str, fetch: tuple, out: np.ndarray) -> None:
        """Fill ``out`` with the orthogonal selection ``fetch`` (per axis a slice with step >= 1 or
        sorted unique positions) of array ``name``: the primitive under every read, export and convert."""
        self._reader.read_into(name, fetch, out)

    # -- the store underneath --------------------------------------------------------------------

    @property
    def store(self):
        """The zarr store the trajectory is read from."""
        return self._reader.store

    @property
    def layouts(self) -> dict[str, tuple[ArrayLayout, ArrayLayout]]:
        """Per array (every kind and ``recorded_steps``): its (main, hot) tier layouts."""
        return dict(self._reader.layouts)

    @property
    def commit_record(self) -> CommitRecord:
        return self._reader.record

    @property
    def metadata(self) -> dict:
        """The whole metadata document: format version, library versions, creation time, config."""
        return self._reader.meta.to_json()

    @property
    def predictions(self) -> dict[str, AdamPrediction]:
        """The kinds stored as residuals of Adam's replayed update (see :func:`wordystore.adam_predictions`)."""
        return dict(self._reader.meta.predictions)

    # -- what the trajectory holds ---------------------------------------------------------------

    def __len__(self) -> int:
        return self._reader.record.committed_rows

    @property
    def steps(self) -> np.ndarray:
        """The training step each row holds (``recorded_steps``)."""
        return self._steps.copy()

    @property
    def kinds(self) -> dict[str, Kind]:
        return dict(self._reader.meta.kinds)

    @property
    def config(self) -> dict:
        return self._reader.meta.config

    @property
    def profile(self) -> str:
        """``compact`` or ``portable`` (see docs/format.md)."""
        return self._reader.meta.profile

    @property
    def segments(self) -> list[dict]:
        """The runs this trajectory joins (see ``wordystore stitch``): source, rows [start, stop),
        first and last step, config. An ordinary recording is one segment."""
        if "segments" in self.config:
            return self.config["segments"]
        span = [int(self._steps[0]), int(self._steps[-1])] if len(self) else []
        return [{"source": describe(self.store), "rows": [0, len(self)], "steps": span, "config": self.config}]

    @property
    def token_sets(self) -> dict[str, np.ndarray]:
        """Named token-id sets (sorted int64), read on first use."""
        return {name: self.token_set(name) for name in self._reader.meta.token_sets}

    def token_set(self, name: str) -> np.ndarray:
        names = self._reader.meta.token_sets
        if name not in names:
            raise KeyError(f"no token set {name!r}; this trajectory has {list(names)}")
        if name not in self._token_sets:
            self._token_sets[name] = self._reader.read_token_set(name)
        return self._token_sets[name]

    def __getattr__(self, name: str) -> KindView:
        views = self.__dict__.get("_views", {})
        if name in views:
            return views[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or kind {name!r}; kinds are {list(views)}")

    def __getitem__(self, kind: str) -> KindView:
        if kind not in self._views:
            raise KeyError(f"no kind {kind!r}; this trajectory records {list(self._views)}")
        return self._views[kind]

    def __dir__(self):
        return [*super().__dir__(), *self._views]

    def __repr__(self) -> str:
        span = f"steps {self._steps[0]}..{self._steps[-1]}" if len(self) else "no steps yet"
        lines = [f"<wordystore.Trajectory {describe(self.store)}: {len(self)} rows, {span}, {self.profile} profile>"]
        for name, kind in self.kinds.items():
            dims = ", ".join(f"{d}={n}" for d, n in zip(("step", *kind.dims), (len(self), *kind.shape)))
            lines.append(f"  {name:<18} {kind.dtype:<9} [{dims}]")
        sets = ", ".join(f"{name} ({len(ids)})" for name, ids in self.token_sets.items())
        lines.append(f"  token sets: {sets or 'none'}")
        return "\n".join(lines)

    def uncached(self) -> Trajectory:
        """The same rows, read without the chunk cache: for one-pass scans (analyses, exports)
        whose memory must not grow with the store."""
        other = object.__new__(Trajectory)
        other.__dict__.update(self.__dict__)
        other._reader, other._cache_bytes = self._reader.uncached(), 0
        other._views = {name: KindView(other, name, view.kind) for name, view in self._views.items()}
        return other

    def close(self) -> None:
        """Stop the read threads and drop the chunk cache (also done when the object is collected)."""
        self._reader.close()

    def __enter__(self) -> Trajectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        from wordystore.read.display import trajectory_html

        return trajectory_html(self)

    # -- pickling and out-of-core analysis -------------------------------------------------------

    def __reduce__(self):
        """Pickled as where to reopen it and how (see the module's docstring)."""
        return Trajectory, (self._where, self._cache_bytes)

    def __dask_tokenize__(self):
        """The same token for the same rows of the same store: committed rows never change, and a
        store created anew at the same place has another creation time."""
        return "wordystore.Trajectory", describe(self.store), self._reader.meta.created, len(self)

    def to_xarray(self, chunks=None, decode_bf16: bool = True):
        """The trajectory as an ``xarray.Dataset``: what ``xr.open_dataset(path, engine="wordystore")``
        returns (:mod:`wordystore.read.xarray_backend`), lazily reading only what a selection touches.
        ``chunks={}`` makes its variables dask arrays of the store's chunking (needs dask);
        ``decode_bf16=False`` keeps bfloat16 kinds as ``ml_dtypes.bfloat16`` (default: float32, exact)."""
        xr = _optional("xarray", "to_xarray()")
        return xr.open_dataset(self, engine="wordystore", chunks=chunks, decode_bf16=decode_bf16)


class BFloat16Tensor(torch.Tensor):
    """A bfloat16 tensor read from a store, which numpy (and so matplotlib, pandas) take as float32.

    ``np.asarray`` of a plain bfloat16 tensor fails (numpy has no bfloat16); every bfloat16 value is
    a float32 value, so this conversion is exact, and ``plt.plot(t.steps, t.losses[:])`` works as
    written. The tensor itself stays bfloat16 with its exact bits, and what is computed from it is a
    plain tensor (``__torch_function__`` disabled): call ``.float()`` on those before numpy.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __array__(self, dtype=None, copy=None):
        return torch.Tensor.__array__(self.float(), dtype)

    def __repr__(self, **kwargs) -> str:
        return torch.Tensor.__repr__(self.as_subclass(torch.Tensor), **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickled (and ``torch.save``-d) as the plain tensor it is, which ``torch.load`` takes with
        ``weights_only=True`` and a process without wordystore unpickles."""
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


class KindView:
    """A lazy [step, ...] view of one kind; index it like a numpy array to read a torch tensor.

    Indexing reads only the chunks the selection touches. The first axis is the row (``.loc``
    selects by training step); on the token axis a token-set name selects that set's tokens.
    Views are read-only.

    ``view.float()`` and ``view.to(dtype)`` are views too, reading the same values converted
    (``t.losses.float()[:]``: float32, exact from bfloat16); ``view.numpy(index, dtype=...)`` reads
    a numpy array in ``dtype``.

    Parameters
    ----------
    trajectory : Trajectory
        The trajectory it reads from (views come from it: ``t.embeddings``, ``t["grads"]``).
    name : str
        The kind's name.
    kind : Kind
        Its per-step shape, dtype and dimension names.
    dtype : str, optional
        The dtype reads return, converted from the kind's (``view.float()``, ``view.to(dtype)``).

    Returns
    -------
    torch.Tensor
        From indexing (``view[index]``), the selected values, dtype and bits as recorded;
        :meth:`numpy` returns a numpy array, :meth:`to_dask` a dask array.

    Examples
    --------
    >>> import wordystore
    >>> t = wordystore.open("runs/quick.zarr")
    >>> t.embeddings
    <KindView 'embeddings' bfloat16 [step=5, token=8192, dim=16]>
    >>> t.embeddings[-1, "untrained"].shape  # the last row, untrained tokens only
    torch.Size([4083, 16])
    >>> t.losses.numpy(slice(1, None)).dtype
    dtype(bfloat16)
    """

    def __init__(self, trajectory: Trajectory, name: str, kind: Kind, dtype: str | None = None):
        self._t, self.name, self.kind = trajectory, name, kind
        self._dtype = dtype or kind.dtype  # what reads return: the kind's dtype, or one it is converted to

    @property
    def trajectory(self) -> Trajectory:
        return self._t

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._t), *self.kind.shape)

    @property
    def dims(self) -> tuple[str, ...]:
        return ("step", *self.kind.dims)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype reads return: the kind's, unless this view converts (:meth:`to`)."""
        return DTYPES[self._dtype][1]

    @property
    def numpy_dtype(self) -> np.dtype:
        """:attr:`dtype` in numpy (bfloat16 as ``ml_dtypes.bfloat16``)."""
        return DTYPES[self._dtype][0]

    def to(self, dtype) -> KindView:
        """The same view, read in ``dtype`` (a torch or numpy dtype, or its name): lazy, as ``loc``.
        ``t.embeddings.to(torch.float32)[-1]``; converting as numpy's ``astype`` does."""
        return KindView(self._t, self.name, self.kind, _dtype_name(dtype))

    def float(self) -> KindView:
        """The same view, read as float32 (exact from bfloat16 and float16): ``t.losses.float()[:]``."""
        return self.to("float32")

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape))
        converted = f" as {self._dtype}" if self._dtype != self.kind.dtype else ""
        return f"<KindView {self.name!r} {self.kind.dtype}{converted} [{dims}]>"

    def _repr_html_(self) -> str:
        from wordystore.read.display import kind_html

        return kind_html(self)

    def __getitem__(self, index) -> torch.Tensor:
        return _tensor(self.numpy(index))

    def __setitem__(self, index, value) -> None:
        raise ReadOnlyError("trajectory views are read-only; to record steps use wordystore.resume(path).append(...)")

    def __iter__(self):
        """Row after row (each a torch tensor), reading a main chunk's worth of rows at a time, so
        every chunk is decoded once (memory: one block of ``chunk_rows`` rows)."""
        block_rows = self._t.layouts[self.name][0].chunk[0]
        for start in range(0, len(self), block_rows):
            block = self.numpy(slice(start, start + block_rows))
            yield from (_tensor(block[row, ...]) for row in range(len(block)))  # a 0-d array, not a scalar

    def numpy(self, index=(), orthogonal: bool = False, dtype=None) -> np.ndarray:
        """Like indexing, but returns a numpy array (bfloat16 as ``ml_dtypes.bfloat16``), in ``dtype``
        if given (``t.losses.numpy(dtype="float32")``: every step's loss as float32, in one call).
        ``orthogonal=True``: index arrays select along their own axis each (zarr's ``oindex``):
        ``numpy(([0, 5], [1, 2, 3]), orthogonal=True)`` has shape ``(2, 3, ...)``."""
        want = DTYPES[_dtype_name(dtype)][0] if dtype is not None else self.numpy_dtype
        plan = indexing.plan(index, self.shape, self.dims, self._resolve_token_set, orthogonal)
        values = indexing.finish(self._t._reader.read(self.name, plan.fetch, plan.fetch_shape), plan)
        return values if values.dtype == want else values.astype(want)

    @property
    def loc(self) -> _StepLabelIndexer:
        """Select by training step number instead of row: ``loc[100]``, ``loc[100:200]`` (inclusive, as
        pandas and xarray ``.loc``; ``loc[100:200:10]`` every 10th row, ``loc[::-1]`` reversed),
        ``loc[[0, 50, 100]]``; other axes index as usual. Rules: :func:`indexing.step_rows`."""
        return _StepLabelIndexer(self)

    @property
    def chunks(self) -> tuple[int, ...]:
        """The chunking dask and xarray are given: a main chunk of rows by a shard of the other axes."""
        main = self._t.layouts[self.name][0]
        return tuple(min(c, max(n, 1)) for c, n in zip((main.chunk[0], *main.shard[1:]), self.shape))

    def to_dask(self):
        """A dask array over the committed rows, one dask chunk per :attr:`chunks`. A computation
        reads only the dask chunks it needs (dask passes slices into the read; a list of indices
        picks from whole dask chunks). Its tasks pickle (see the module's docstring), so any dask
        scheduler runs them."""
        da = _optional("dask.array", "to_dask()")
        from dask.base import tokenize

        return da.from_array(
            _CommittedRows(self),
            chunks=self.chunks,
            asarray=True,
            fancy=True,
            name=f"wordystore-{self.name}-{tokenize(self._t)}",
        )

    def __dask_tokenize__(self):
        """Its trajectory's token (see :meth:`Trajectory.__dask_tokenize__`) and its kind."""
        return self._t, self.name, self._dtype

    # -- internals -------------------------------------------------------------------------------

    def _resolve_token_set(self, name: str, axis: str) -> np.ndarray:
        if axis != "token":
            raise IndexError(f"token-set name {name!r} used on axis '{axis}'; names index the 'token' axis only")
        return self._t.token_set(name)


class _StepLabelIndexer:
    """``view.loc[...]``: the first axis by training step (see :func:`indexing.step_rows`), the rest as usual."""

    def __init__(self, view: KindView):
        self._view = view

    def __getitem__(self, index):
        index = list(indexing.full_index(index, self._view.dims))
        at = 1 if index[0] is Ellipsis else 0  # an ellipsis standing for no axis: the step axis is next
        index[at] = indexing.step_rows(self._view._t._steps, index[at])
        return self._view[tuple(index)]


class _CommittedRows:
    """The committed rows of one kind as an array-like for dask (numpy in, numpy out)."""

    def __init__(self, view: KindView):
        self._view = view
        self.shape, self.dtype, self.ndim = view.shape, view.numpy_dtype, len(view.shape)

    def __getitem__(self, index):
        return self._view.numpy(index)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A read's torch tensor: bfloat16 as a :class:`BFloat16Tensor`, so that numpy takes it."""
    tensor = numpy_to_torch(array)
    return tensor.as_subclass(BFloat16Tensor) if tensor.dtype == torch.bfloat16 else tensor


def _dtype_name(dtype) -> str:
    """The name (a key of the dtype table) of a torch dtype, a numpy dtype or a name."""
    if isinstance(dtype, torch.dtype):
        names = [name for name, (_, torch_dtype) in DTYPES.items() if torch_dtype == dtype]
    else:
        try:
            names = [np.dtype(dtype).name]
        except TypeError:
            names = []
    if not names or names[0] not in DTYPES:
        raise ValueError(
            f"cannot read as {dtype!r}; expected one of {sorted(DTYPES)} (a name, or its torch or numpy dtype)"
        )
    return names[0]


def _location(where):
    """Where a pickled trajectory reopens: a zarr store as itself, a URL as given, a local path
    made absolute (the unpickling process may have another working directory)."""
    if isinstance(where, Store):
        return where
    text = os.fspath(where)
    return text if "://" in text else os.path.abspath(text)


def _optional(module: str, needs: str):
    """An optional module (the ``analysis`` extra), or one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]
        raise MissingExtraError(
            f"{needs} needs {package}, which is not installed; {install_hint('analysis')}"
        ) from None
