"""Reading a trajectory: lazy, labelled views over its arrays.

>>> from wordystore import trajectory
>>> t = trajectory.open("runs/wb1b.zarr")
>>> t.embeddings[0:200, "untrained"]          # torch.bfloat16 [200, 45087, 64]
>>> t.embeddings.loc[100:200, 42]             # by training step number, inclusive

Nothing is read until a view is sliced. A reader sees the committed prefix of the trajectory as of
``open`` or its last ``refresh()``, even while a writer appends.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import zarr

from wordystore import indexing, layout
from wordystore.errors import CorruptChunkError, ReadOnlyError
from wordystore.kinds import Kind, numpy_to_torch
from wordystore.storage import as_store, describe


def open(where) -> "Trajectory":  # noqa: A001 - the natural name, as zarr.open and h5py.File
    """Open the trajectory at ``where`` (a directory path, a URL or a zarr store) for reading."""
    store = as_store(where, read_only=True)
    try:
        group = zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise FileNotFoundError(f"no trajectory at {describe(store)}: {exc}") from None
    return Trajectory(store, group)


class Trajectory:
    """One recorded run: kinds as attributes (``t.embeddings``), token sets, steps and config."""

    def __init__(self, store, group: zarr.Group):
        self._store, self._group = store, group
        self._meta = layout.read_metadata(group, describe(store))
        self._kinds = {name: Kind.from_json(spec) for name, spec in self._meta["kinds"].items()}
        self._views = {name: KindView(self, name, kind, group[name]) for name, kind in self._kinds.items()}
        self._token_sets: dict[str, np.ndarray] = {}
        self.refresh()

    def refresh(self) -> "Trajectory":
        """Re-read the commit record, to see steps a writer committed since."""
        self._length = layout.read_committed_steps(self._store)
        steps_array = zarr.open_array(self._store, path=layout.STEPS_ARRAY, mode="r")
        self._steps = steps_array[: self._length] if self._length else np.zeros(0, dtype=np.int64)
        for view in self._views.values():
            view._reopen()
        return self

    # -- what the trajectory holds ---------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    @property
    def steps(self) -> np.ndarray:
        """The training step each row holds (``recorded_steps``)."""
        return self._steps.copy()

    @property
    def kinds(self) -> dict[str, Kind]:
        return dict(self._kinds)

    @property
    def config(self) -> dict:
        return self._meta["config"]

    @property
    def metadata(self) -> dict:
        """The whole metadata document: format version, library versions, creation time, config."""
        return self._meta

    @property
    def segments(self) -> list[dict]:
        """The runs this trajectory joins (see ``wordystore stitch``): source, rows [start, stop),
        first and last step, config. An ordinary recording is one segment."""
        if "segments" in self.config:
            return self.config["segments"]
        span = [int(self._steps[0]), int(self._steps[-1])] if self._length else []
        return [{"source": describe(self._store), "rows": [0, self._length], "steps": span, "config": self.config}]

    @property
    def token_sets(self) -> dict[str, np.ndarray]:
        """Named token-id sets (sorted int64), read on first use."""
        return {name: self.token_set(name) for name in self._meta["token_sets"]}

    def token_set(self, name: str) -> np.ndarray:
        if name not in self._meta["token_sets"]:
            raise KeyError(f"no token set {name!r}; this trajectory has {self._meta['token_sets']}")
        if name not in self._token_sets:
            self._token_sets[name] = self._group[layout.TOKEN_SETS_GROUP][name][:]
        return self._token_sets[name]

    def __getattr__(self, name: str) -> "KindView":
        views = self.__dict__.get("_views", {})
        if name in views:
            return views[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or kind {name!r}; kinds are {list(views)}")

    def __getitem__(self, kind: str) -> "KindView":
        if kind not in self._views:
            raise KeyError(f"no kind {kind!r}; this trajectory records {list(self._views)}")
        return self._views[kind]

    def __dir__(self):
        return [*super().__dir__(), *self._views]

    def __repr__(self) -> str:
        span = f"steps {self._steps[0]}..{self._steps[-1]}" if self._length else "no steps yet"
        lines = [f"<wordystore.Trajectory {describe(self._store)}: {self._length} rows, {span}>"]
        for name, kind in self._kinds.items():
            dims = ", ".join(f"{d}={n}" for d, n in zip(("step", *kind.dims), (self._length, *kind.shape)))
            lines.append(f"  {name:<18} {kind.dtype:<9} [{dims}]")
        sets = ", ".join(f"{name} ({len(self.token_set(name))})" for name in self._meta["token_sets"])
        lines.append(f"  token sets: {sets or 'none'}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from wordystore.display import trajectory_html

        return trajectory_html(self)

    # -- out-of-core analysis --------------------------------------------------------------------

    def to_xarray(self):
        """An ``xarray.Dataset`` of dask-backed variables, coordinates ``step`` (training step) and ``token``."""
        import xarray as xr

        variables = {name: (view.dims, view.to_dask()) for name, view in self._views.items()}
        coords = {"step": self.steps}
        vocab = {kind.shape[kind.dims.index("token")] for kind in self._kinds.values() if "token" in kind.dims}
        if len(vocab) == 1:
            coords["token"] = np.arange(vocab.pop())
        return xr.Dataset(variables, coords=coords, attrs={"config": str(self.config)})


class KindView:
    """A lazy [step, ...] view of one kind; index it like a numpy array to read a torch tensor."""

    def __init__(self, trajectory: Trajectory, name: str, kind: Kind, array: zarr.Array):
        self._t, self.name, self.kind, self._array = trajectory, name, kind, array

    def _reopen(self) -> None:
        self._array = zarr.open_array(self._t._store, path=self.name, mode="r")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._t), *self.kind.shape)

    @property
    def dims(self) -> tuple[str, ...]:
        return ("step", *self.kind.dims)

    @property
    def dtype(self) -> torch.dtype:
        return self.kind.torch_dtype

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape))
        return f"<KindView {self.name!r} {self.kind.dtype} [{dims}]>"

    def _repr_html_(self) -> str:
        from wordystore.display import kind_html

        return kind_html(self)

    def __getitem__(self, index) -> torch.Tensor:
        return numpy_to_torch(self.numpy(index))

    def __setitem__(self, index, value) -> None:
        raise ReadOnlyError(f"trajectory views are read-only; to record steps use wordystore.resume(path).append(...)")

    def numpy(self, index=()) -> np.ndarray:
        """Like indexing, but returns a numpy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
        plan = indexing.plan(index, self.shape, self.dims, self._resolve_token_set)
        return indexing.finish(self._read(plan.fetch, plan.fetch_shape), plan)

    @property
    def loc(self) -> "_StepLabelIndexer":
        """Select by training step number instead of row: ``loc[100]``, ``loc[100:200]`` (inclusive, as
        pandas and xarray ``.loc``), ``loc[[0, 50, 100]]``; other axes index as usual."""
        return _StepLabelIndexer(self)

    def to_dask(self):
        """A dask array over the committed rows, one dask chunk per stored shard."""
        import dask.array as da

        shards = self._array.shards or self._array.chunks
        chunks = tuple(min(c, max(n, 1)) for c, n in zip(shards, self.shape))
        return da.from_array(_CommittedRows(self), chunks=chunks, asarray=True, fancy=False,
                             name=f"wordystore-{self.name}-{len(self)}-{id(self._t)}")

    # -- internals -------------------------------------------------------------------------------

    def _resolve_token_set(self, name: str, axis: str) -> np.ndarray:
        if axis != "token":
            raise IndexError(f"token-set name {name!r} used on axis '{axis}'; names index the 'token' axis only")
        return self._t.token_set(name)

    def _read(self, fetch: tuple, fetch_shape: tuple[int, ...]) -> np.ndarray:
        if 0 in fetch_shape:
            return np.zeros(fetch_shape, dtype=self.kind.numpy_dtype)
        selection = tuple(f for f in fetch)
        try:
            if all(isinstance(f, slice) for f in selection):
                return self._array[selection]
            return self._array.oindex[selection]
        except Exception as exc:  # find which chunk is broken, and say so
            bad = self._find_corrupt_chunk(fetch)
            if bad is None:
                raise
            raise CorruptChunkError(bad) from exc

    def _find_corrupt_chunk(self, fetch: tuple) -> str | None:
        """Decode each chunk the selection touches, one by one; describe the first that fails."""
        chunks = self._array.chunks
        ranges = []
        for f, size, n in zip(fetch, chunks, self._array.shape):
            positions = np.arange(*f.indices(n)) if isinstance(f, slice) else f
            ranges.append(sorted(set((positions // size).tolist())))
        for coords in itertools.product(*ranges):
            region = tuple(slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(coords, chunks, self._array.shape))
            try:
                self._array[region]
            except Exception as exc:
                where = ", ".join(f"{d} {r.start}..{r.stop - 1}" for d, r in zip(self.dims, region))
                return (f"corrupt chunk in array '{self.name}' of {describe(self._t._store)}: chunk {coords} "
                        f"({where}) cannot be decoded: {exc}")
        return None


class _StepLabelIndexer:
    def __init__(self, view: KindView):
        self._view = view

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        rows = _rows_for_steps(self._view._t._steps, index[0])
        return self._view[(rows, *index[1:])]


def _rows_for_steps(steps: np.ndarray, label):
    """Rows holding the given training step number(s)."""
    if isinstance(label, slice):
        lo = -math.inf if label.start is None else label.start
        hi = math.inf if label.stop is None else label.stop
        rows = np.flatnonzero((steps >= lo) & (steps <= hi))
        if label.step is not None:
            first = steps[rows[0]] if rows.size else 0
            rows = rows[(steps[rows] - first) % label.step == 0]
        # Evenly spaced rows (always, unless a stride skips irregularly) act as a slice: orthogonal
        # to the other axes' indices, as a slice in numpy.
        stride = int(rows[1] - rows[0]) if rows.size > 1 else 1
        if rows.size == 0:
            return slice(0, 0)
        if np.all(np.diff(rows) == stride):
            return slice(int(rows[0]), int(rows[-1]) + 1, stride)
        return rows
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    wanted = np.asarray(label)
    if wanted.dtype.kind not in "iu":
        raise TypeError(f"loc takes training step numbers (ints, slices, int arrays), got {label!r}")
    rows = np.searchsorted(steps, wanted)
    found = (rows < len(steps)) & (steps[np.minimum(rows, len(steps) - 1)] == wanted) if len(steps) else wanted != wanted
    if not np.all(found):
        missing = np.atleast_1d(wanted)[~np.atleast_1d(found)][:5].tolist()
        raise KeyError(f"training step(s) {missing} not recorded; recorded steps run {steps[:1].tolist()}..{steps[-1:].tolist()}")
    return int(rows) if rows.ndim == 0 else rows


class _CommittedRows:
    """The committed rows of one kind as an array-like for dask (numpy in, numpy out)."""

    def __init__(self, view: KindView):
        self._view = view
        self.shape, self.dtype, self.ndim = view.shape, view.kind.numpy_dtype, len(view.shape)

    def __getitem__(self, index):
        return self._view.numpy(index)


